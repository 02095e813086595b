"""Wires the cdr service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

import dataclasses

from opentelemetry import trace

from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.core.clock import SystemClock
from numprotect.core.limits import ConcurrencyLimit
from numprotect.core.page_tokens import PageTokenKey
from numprotect.core.redis_client import create_redis
from numprotect.core.replica_wait import ReplicaWait
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.services.cdr.bindings import RedisBindingLookup
from numprotect.services.cdr.counts import CdrCounts
from numprotect.services.cdr.enrich import Enricher
from numprotect.services.cdr.ingest import Ingestor
from numprotect.services.cdr.servicer import CdrServiceServicer
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import CdrStore

FULL_NAME = cdr_pb2.DESCRIPTOR.services_by_name["CdrService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    settings = CdrSettings.from_env(runtime.env)
    page_token_key = PageTokenKey.from_env(runtime.env)
    redis_settings = runtime.redis_settings  # parsed once by the bootstrap
    # Watchers block in XREAD for up to watch_block: their own pool, with a timeout above the block time.
    watch_redis = create_redis(
        dataclasses.replace(
            redis_settings,
            max_connections=settings.max_watchers,
            timeout_seconds=redis_settings.timeout_seconds + settings.watch_block_ms / 1000,
        )
    )
    # Everything else shares the main client and its one bound (ingest scripts, listing, enrichment lookups).
    redis_limit = ConcurrencyLimit.for_redis(redis_settings)
    clock = SystemClock()
    counts = CdrCounts(runtime.metrics)
    store = CdrStore(runtime.redis, settings, redis_limit, ReplicaWait.of(runtime.redis, redis_settings), counts=counts)
    lookup = RedisBindingLookup(runtime.redis, redis_limit, cache_size=settings.binding_cache)
    tracer: trace.Tracer = (
        runtime.telemetry.provider.get_tracer("numprotect.cdr")
        if runtime.telemetry.provider is not None
        else trace.NoOpTracer()
    )
    ingestor = Ingestor(store, Enricher(lookup), settings, tracer, clock=clock, counts=counts)
    servicer = CdrServiceServicer(
        settings,
        store,
        ingestor,
        watch_redis,
        callers=runtime.identity.callers,
        page_token_key=page_token_key,
        clock=clock,
    )
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, cdr_pb2_grpc.add_CdrServiceServicer_to_server),
        ],
        on_shutdown=[servicer.close, watch_redis.aclose],
    )
