"""WatchCdrs slots per caller: how many watch streams one tenant (or the operator) may hold open in a process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from numprotect.core.errors import ResourceExhausted

SETTING = "NUMPROTECT_CDR_MAX_WATCHERS_PER_TENANT"


class WatchSlots:
    """At most `per_caller` open watches per caller. Every watch runs on the process's one event loop, so the
    counts need no lock; a slot is given back when its stream ends, however it ends (cancel, revocation, error)."""

    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._held: dict[str, int] = {}

    def held(self, caller: str) -> int:
        return self._held.get(caller, 0)

    @contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        held = self._held.get(caller, 0)
        if held >= self.per_caller:
            raise ResourceExhausted(
                f"{SETTING} ({self.per_caller}) WatchCdrs streams of this caller are already open on this server; "
                "close one before opening another",
                subject=SETTING,
            )
        self._held[caller] = held + 1
        try:
            yield
        finally:
            left = self._held[caller] - 1
            if left:
                self._held[caller] = left
            else:
                del self._held[caller]
