"""Resolving creates that did not finish, in every binding process, and the test-only failpoint of the saga.

A create that crashed (or whose Redis failed) after its order claim is on the pending-creates list until it is
resolved: rolled forward when its commit landed, rolled back otherwise (create.py). A retry of the order does
so at once; this loop does it for orders nobody retries, once their deadline has passed, so a create that answered
an error never holds a number or a route for long (docs/binding.md, "Create").
"""

from __future__ import annotations

import logging
import os
import signal

from numprotect.core.errors import Unavailable
from numprotect.core.periodic import Periodic
from numprotect.services.binding.create import BindingCreator, StepHook

log = logging.getLogger(__name__)

# How long after a deadline the recovery acts: the create's routes and unconfirmed reservation lapse at the
# deadline by the servers' clocks; the margin covers the skew between this process's clock and theirs.
RECOVERY_MARGIN_MS = 1000


class CreateRecovery(Periodic):
    """Runs BindingCreator.recover_overdue every `interval_seconds` until stopped (a failed round, e.g. Redis down:
    the next one tries again)."""

    def __init__(self, creator: BindingCreator, interval_seconds: float) -> None:
        super().__init__("binding create recovery", self._round, interval_seconds)
        self.creator = creator

    async def _round(self) -> None:
        await self.creator.recover_overdue(RECOVERY_MARGIN_MS)


def failpoint_hook(failpoint: str) -> StepHook | None:
    """The StepHook of NUMPROTECT_BINDING_FAILPOINT ("<step>:crash" or "<step>:error"; tests only), or None."""
    if not failpoint:
        return None
    at, _, action = failpoint.partition(":")

    async def hook(step: str) -> None:
        if step != at:
            return
        if action == "crash":
            log.warning("failpoint: killing the process", extra={"step": step})
            os.kill(os.getpid(), signal.SIGKILL)
        raise Unavailable(f"failpoint before step {step} (NUMPROTECT_BINDING_FAILPOINT)")

    log.warning("failpoint set: every create fails at one step (tests only)", extra={"failpoint": failpoint})
    return hook
