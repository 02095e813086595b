"""A process's identity parts, built and started by the bootstrap and handed to builders in the runtime."""

from __future__ import annotations

import logging
from typing import Any

from numprotect.core.calls import CallConcern
from numprotect.core.clock import SystemClock
from numprotect.core.identity.api_keys import AuthSettings, HashKey
from numprotect.core.identity.audit import AuditLog
from numprotect.core.identity.directory import Directory
from numprotect.core.identity.layer import AuthDenials, Callers, IdentityConcern, PeerIdentity
from numprotect.core.metrics import Metrics
from numprotect.core.redis_client import create_sync_redis
from numprotect.core.settings import RedisSettings

log = logging.getLogger(__name__)


class Identity:
    """`callers` for servicers; `directory` (keys, carrier blocks) and `audit` on a blocking Redis client of their
    own. With NUMPROTECT_AUTH=off (benchmark baselines only) there is no check and `callers` lets everything by.
    `metrics`: the process's, for numprotect_auth_denials (none: not counted)."""

    def __init__(
        self,
        settings: AuthSettings,
        redis_settings: RedisSettings,
        *,
        peer_identity: PeerIdentity | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.peer_identity = peer_identity
        self.directory: Directory | None = None
        self.audit: AuditLog | None = None
        self._redis: Any = None
        self._clock = SystemClock()
        if settings.enabled:
            assert settings.hash_key is not None
            self._redis = create_sync_redis(redis_settings, max_connections=4)
            self.directory = Directory(
                settings.hash_key, self._redis, refresh_seconds=settings.refresh_seconds, now_ms=self._clock.now_ms
            )
            self.audit = AuditLog(settings.hash_key.derive("audit"), self._redis)
        self.callers = Callers(self.directory, AuthDenials(metrics) if metrics is not None else None)

    @property
    def hash_key(self) -> HashKey:
        if self.settings.hash_key is None:
            raise RuntimeError("no auth key: NUMPROTECT_AUTH_KEY_FILE is unset")
        return self.settings.hash_key

    def concerns(self) -> list[CallConcern]:
        if self.directory is None or self.audit is None:
            return []
        return [
            IdentityConcern(
                self.callers, self.directory, self.audit, peer_identity=self.peer_identity, clock=self._clock
            )
        ]

    def start(self) -> None:
        if self.directory is None or self.audit is None:
            log.warning("NUMPROTECT_AUTH=off: every caller may call every method (benchmark baselines only)")
            return
        self.directory.start()
        self.audit.start()

    def stop(self) -> None:
        if self.audit is not None:
            self.audit.stop()
        if self.directory is not None:
            self.directory.stop()
        if self._redis is not None:
            self._redis.close()
