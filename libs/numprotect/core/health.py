"""The health state machine both server models share: SERVING while the dependency answers, NOT_SERVING otherwise.

One probe thread per process checks the dependency (Redis PING on a blocking client of its own) every
NUMPROTECT_HEALTH_INTERVAL and publishes a change, and only a change, to the gRPC health service through the
`publish` callback the server model gives it. A thread rather than an asyncio task: a blocking PING cannot lose a
cancellation (redis.asyncio's PING can on Python 3.11, CPython gh-86296, which once left a draining service
waiting for its probe for ever), and the probe is the same code whichever server model runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# How long `stop` waits for a probe in the middle of a check (one PING, bounded by NUMPROTECT_REDIS_TIMEOUT).
STOP_WAIT_SECONDS = 5.0


class HealthProbe:
    """Runs `check` every `interval` seconds on a daemon thread; `publish(serving)` on start and on each change."""

    def __init__(
        self,
        check: Callable[[], bool],
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

    def start(self) -> bool:
        """Checks once (the first status is published before the port takes traffic), then probes in the background."""
        self._update(self._checked())
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()
        return bool(self.serving)

    def _checked(self) -> bool:
        try:
            return self._check()
        except Exception:
            return False

    def _update(self, up: bool) -> None:
        if up == self.serving:
            return
        if self.serving is not None:
            log.warning("redis %s", "reachable again" if up else "unreachable: NOT_SERVING")
        self.serving = up
        self._publish(up)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            up = self._checked()
            if not self._stop.is_set():
                self._update(up)

    def stop(self) -> None:
        """Ends the probe; waits at most `stop_wait` seconds for a check in progress (the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._stop_wait)
            if self._thread.is_alive():
                log.warning("health probe still checking at shutdown; not waiting for it")
