"""The health state machine both server models share: SERVING while the dependencies answer, NOT_SERVING otherwise.

One probe thread per process checks the dependencies (Redis PING on a blocking client of its own, and the service's
own readiness, e.g. the SIP adapter's translation streams) every NUMPROTECT_HEALTH_INTERVAL and publishes a change,
and only a change, to the gRPC health service through the `publish` callback the server model gives it. The check
says why it is not serving (a string), so the log names what changed: WARNING when a serving process stops serving
(and when the reason changes while it is down), INFO when it serves (again); a start not ready yet is INFO.
A thread rather than an asyncio task: a blocking PING cannot lose a cancellation (redis.asyncio's PING can on
Python 3.11, CPython gh-86296, which once left a draining service waiting for its probe for ever), and the probe is
the same code whichever server model runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# How long `stop` waits for a probe in the middle of a check (one PING, bounded by NUMPROTECT_REDIS_TIMEOUT).
STOP_WAIT_SECONDS = 5.0
# The reason logged when a check answers a bare False.
CHECK_FAILED = "the health check failed"

# A check's answer: True (serving), False, or why it is not serving ("redis unreachable").
Check = Callable[[], bool | str]


class HealthProbe:
    """Runs `check` every `interval` seconds on a daemon thread; `publish(serving)` on start and on each change.
    `check` answers True when serving, else False or a string naming what is not ready (logged)."""

    def __init__(
        self,
        check: Check,
        publish: Callable[[bool], None],
        interval: float,
        *,
        stop_wait: float = STOP_WAIT_SECONDS,
    ) -> None:
        self._check = check
        self._stop_wait = stop_wait
        self._publish = publish
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.serving: bool | None = None
        self.reason = ""  # why it is not serving ("" while serving)
        self._served = False  # has served since start: a later NOT_SERVING is a change worth a WARNING

    def start(self) -> bool:
        """Checks once (the first status is published before the port takes traffic), then probes in the background."""
        self._update(self._checked())
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()
        return bool(self.serving)

    def _checked(self) -> str:
        """ "" when serving, else why not."""
        try:
            answer = self._check()
        except Exception as exc:
            return f"{CHECK_FAILED}: {type(exc).__name__}"
        if answer is True:
            return ""
        return answer or CHECK_FAILED

    def _update(self, reason: str) -> None:
        up = not reason
        if up == self.serving and reason == self.reason:
            return
        if up:
            log.info("ready again: SERVING" if self._served else "ready: SERVING")
            self._served = True
        elif self._served:
            log.warning("not ready: NOT_SERVING, %s", reason, extra={"health": "NOT_SERVING", "reason": reason})
        else:
            log.info("not ready yet: NOT_SERVING, %s", reason, extra={"health": "NOT_SERVING", "reason": reason})
        self.reason = reason
        if up != self.serving:
            self.serving = up
            self._publish(up)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            reason = self._checked()
            if not self._stop.is_set():
                self._update(reason)

    def stop(self) -> None:
        """Ends the probe; waits at most `stop_wait` seconds for a check in progress (the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._stop_wait)
            if self._thread.is_alive():
                log.warning("health probe still checking at shutdown; not waiting for it")
