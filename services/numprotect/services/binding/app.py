"""Wires the binding service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.core.clock import Clock, SystemClock
from numprotect.core.identity.layer import Callers
from numprotect.core.identity.service_token import SERVICE_TOKEN_FILE
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.page_tokens import PageTokenKey
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.redis_mux import MuxRedis
from numprotect.core.replica_wait import ReplicaWait
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.core.settings import SettingsError
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.counts import BindingCounts
from numprotect.services.binding.create import BindingCreator
from numprotect.services.binding.reads import BindingReads
from numprotect.services.binding.recovery import CreateRecovery, failpoint_hook
from numprotect.services.binding.servicer import BindingServiceServicer, RateLimits
from numprotect.services.binding.settings import BindingSettings
from numprotect.services.binding.store import BindingStore
from numprotect.services.binding.update import BindingUpdater

FULL_NAME = binding_pb2.DESCRIPTOR.services_by_name["BindingService"].full_name


def build_servicer(
    redis: RedisClient,
    allocation: AllocationClient,
    settings: BindingSettings,
    calls: ConcurrencyLimit,
    clock: Clock,
    page_token_key: PageTokenKey,
    callers: Callers,
    replicas: ReplicaWait | None = None,
    *,
    counts: BindingCounts | None = None,
) -> BindingServiceServicer:
    """The servicer over its domain objects, all on one store; `callers` tells it who calls (the identity layer);
    `replicas` waits for NUMPROTECT_REDIS_WAIT_REPLICAS after each create, update and delete; `counts` are the
    process's numprotect_bindings_* counters."""
    store = BindingStore.over(redis, settings, replicas)
    reads = BindingReads(store)
    return BindingServiceServicer(
        BindingCreator(store, allocation, settings, clock, failpoint_hook(settings.failpoint), counts=counts),
        BindingUpdater(store, reads, allocation, settings, clock, counts=counts),
        reads,
        settings,
        clock,
        calls,
        page_token_key,
        callers,
        RateLimits.from_settings(settings),
    )


def require_allocation_credential(runtime: Runtime) -> None:
    """Allocation's reservation RPCs answer only the binding service: with auth on, binding needs its service token
    or, in mTLS mode, its workload certificate (spiffe://numprotect/service/binding). Refuses to start without."""
    mtls = runtime.tls.enabled and runtime.tls.client_auth == "require"
    if runtime.identity.settings.enabled and runtime.service_token is None and not mtls:
        raise SettingsError(
            f"{SERVICE_TOKEN_FILE}: required while NUMPROTECT_AUTH=on (a file with binding's ROLE_SERVICE API "
            "token, which allocation's reservation RPCs require), unless NUMPROTECT_TLS_CLIENT_AUTH=require"
        )


async def build(runtime: Runtime) -> ServiceParts:
    settings = BindingSettings.from_env(runtime.env)  # SettingsError before the server starts
    require_allocation_credential(runtime)
    page_token_key = PageTokenKey.from_env(runtime.env)
    allocation = AllocationClient(
        runtime.channel("allocation"),
        settings.allocation_timeout_seconds,
        batching=settings.allocation_batching,
        tracer=runtime.telemetry.tracer if runtime.telemetry.enabled else None,
    )
    # NUMPROTECT_REDIS_CLIENT: multiplexed by default (its round trips in numprotect_redis_round_trip_seconds).
    redis = create_redis(runtime.redis_settings, write_path=True, metrics=runtime.metrics)
    runtime.telemetry.instrument_redis(redis)
    # Every RPC first waits for a place here. With redis.asyncio a call uses up to 3 Redis connections at once and the
    # pool fails rather than queues when exhausted, so there are as many places as the pool serves calls (health has a
    # client of its own); the multiplexing client has no pool to exhaust: as many as the call layer admits. A call
    # waits at most one create lease, then gets UNAVAILABLE.
    places = (
        runtime.server.max_inflight_calls
        if isinstance(redis, MuxRedis)
        else runtime.redis_settings.max_connections // 3
    )
    calls = ConcurrencyLimit(max(1, places), wait_seconds=settings.create_lease_seconds, name="binding calls")
    servicer = build_servicer(
        redis,
        allocation,
        settings,
        calls,
        SystemClock(),
        page_token_key,
        runtime.identity.callers,
        ReplicaWait.of(redis, runtime.redis_settings),
        counts=BindingCounts(runtime.metrics),
    )
    recovery = CreateRecovery(servicer.creator, settings.recovery_interval_seconds)
    recovery.start()
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, binding_pb2_grpc.add_BindingServiceServicer_to_server),
        ],
        on_shutdown=[recovery.stop, redis.aclose],
    )
