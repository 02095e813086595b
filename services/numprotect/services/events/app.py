"""Wires the events service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

import dataclasses

from opentelemetry import trace

from numprotect.core import event_outbox
from numprotect.core.clock import SystemClock
from numprotect.core.page_tokens import PageTokenKey
from numprotect.core.redis_client import create_redis
from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.events.v1 import events_pb2, events_pb2_grpc
from numprotect.services.events.deliveries import Deliveries
from numprotect.services.events.dispatcher import Dispatcher
from numprotect.services.events.endpoints import EndpointStore
from numprotect.services.events.expirer import Expirer
from numprotect.services.events.log import EventLog
from numprotect.services.events.router import Router
from numprotect.services.events.sender import WebhookSender
from numprotect.services.events.servicer import EventServiceServicer
from numprotect.services.events.settings import EventsSettings

FULL_NAME = events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name


async def build(runtime: Runtime, *, background: bool = True) -> ServiceParts:
    """The events service: the API, and (unless `background=False`, for tests of the API alone) the router, the
    expirer and the dispatcher, which every events process runs (they share the work through Redis)."""
    settings = EventsSettings.from_env(runtime.env)  # SettingsError before the server starts
    page_token_key = PageTokenKey.from_env(runtime.env)
    clock = SystemClock()
    endpoints = EndpointStore(runtime.redis, settings, clock)
    redis_settings = runtime.redis_settings
    # Watches block in XREAD for up to watch_block: their own pool (one connection per watch, bounded by
    # max_watchers), with a timeout above the block time.
    watch_redis = create_redis(
        dataclasses.replace(
            redis_settings,
            max_connections=settings.max_watchers,
            timeout_seconds=redis_settings.timeout_seconds + settings.watch_block_s,
        )
    )
    event_log = EventLog(runtime.redis, settings, clock, watch_redis=watch_redis)
    servicer = EventServiceServicer(
        settings,
        endpoints,
        event_log,
        Deliveries(runtime.redis, settings, clock),
        callers=runtime.identity.callers,
        page_token_key=page_token_key,
        clock=clock,
    )
    parts = ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, events_pb2_grpc.add_EventServiceServicer_to_server),
        ],
        # The watches end at their next read before their connections close.
        on_shutdown=[event_log.close, watch_redis.aclose],
    )
    if background:
        # Started last, once everything is built; each close waits a bounded time (periodic.STOP_WAIT_SECONDS, the
        # dispatcher's drain), the dispatcher's before its HTTP client's.
        event_outbox.warm()  # every slot's hash tag (router and expirer name every slot's keys), before serving
        provider = runtime.telemetry.provider
        tracer = provider.get_tracer("numprotect.events") if provider is not None else trace.NoOpTracer()
        router = Router(runtime.redis, settings, endpoints, runtime.metrics, clock, tracer=tracer)
        expirer = Expirer(runtime.redis, settings, runtime.metrics, clock)
        sender = WebhookSender(settings)
        dispatcher = Dispatcher(runtime.redis, settings, endpoints, runtime.metrics, clock, sender, tracer=tracer)
        router.start()
        expirer.start()
        dispatcher.start()
        parts.on_shutdown[:0] = [router.close, expirer.close, dispatcher.close, sender.close]
    return parts
