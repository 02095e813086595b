"""Wires the allocation service's dependencies and registers it with the shared bootstrap: AllocationService and,
on the same port, AdminService (API keys and the audit trail)."""

from __future__ import annotations

from numprotect.admin.v1 import admin_pb2, admin_pb2_grpc
from numprotect.allocation.v1 import allocation_pb2, allocation_pb2_grpc
from numprotect.core.clock import SystemClock
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.page_tokens import PageTokenKey
from numprotect.core.redis_client import create_redis, create_sync_redis
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.services.allocation.admin import AUDIT_SCAN_LIMIT, ApiKeys, AuditTrail
from numprotect.services.allocation.admin_servicer import AdminServiceServicer
from numprotect.services.allocation.pool_metrics import PoolMetrics
from numprotect.services.allocation.pools import NumberPools
from numprotect.services.allocation.scripts import Scripts
from numprotect.services.allocation.servicer import AllocationServiceServicer
from numprotect.services.allocation.settings import AllocationSettings

FULL_NAME = allocation_pb2.DESCRIPTOR.services_by_name["AllocationService"].full_name
ADMIN_FULL_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = AllocationSettings.from_env(runtime.env)  # SettingsError before the server starts
    page_token_key = PageTokenKey.from_env(runtime.env)
    redis_limit = ConcurrencyLimit.for_redis(runtime.redis_settings)
    # NUMPROTECT_REDIS_CLIENT: multiplexed by default (its round trips in numprotect_redis_round_trip_seconds).
    redis = create_redis(runtime.redis_settings, write_path=True, metrics=runtime.metrics)
    runtime.telemetry.instrument_redis(redis)
    clock = SystemClock()
    callers = runtime.identity.callers
    pools = NumberPools(redis, settings, Scripts.load(), redis_limit=redis_limit)
    servicer = AllocationServiceServicer(pools, settings, page_token_key, callers, clock)
    # numprotect_pool_numbers and numprotect_bindings_expired, every NUMPROTECT_METRICS_POOL_REFRESH (metrics on).
    pool_metrics = PoolMetrics(pools, redis, runtime.metrics, settings.metrics_pool_refresh_seconds)
    if runtime.metrics.enabled:
        pool_metrics.start()
    hash_key = runtime.identity.settings.hash_key  # None only with NUMPROTECT_AUTH=off and no key file
    # VerifyAuditChain walks the chain on a blocking client in a worker thread (audit.verify_redis).
    audit_redis = create_sync_redis(runtime.redis_settings, max_connections=2)
    admin = AdminServiceServicer(
        ApiKeys(redis, hash_key, clock),
        AuditTrail(
            redis,
            audit_redis,
            hash_key.derive("audit") if hash_key is not None else None,
            scan_limit=AUDIT_SCAN_LIMIT,
        ),
        callers,
        clock,
        page_token_key,
    )
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, allocation_pb2_grpc.add_AllocationServiceServicer_to_server),
            ServiceRegistration(ADMIN_FULL_NAME, admin, admin_pb2_grpc.add_AdminServiceServicer_to_server),
        ],
        on_shutdown=[pool_metrics.stop, audit_redis.close, redis.aclose],
    )
