"""Wires the translation service's dependencies and registers it with the shared bootstrap (thread-pool server)."""

from __future__ import annotations

import logging

from numprotect.core.clock import SystemClock
from numprotect.core.page_tokens import PageTokenKey, PageTokens
from numprotect.core.server import ServiceParts, ServiceRegistration, SyncRuntime
from numprotect.services.translation.blocklist import BlocklistRefresher, BlocklistStore, BlocklistView
from numprotect.services.translation.core import (
    READ_ONLY_SCRIPT,
    SCRIPT,
    DecisionCounts,
    TranslationSettings,
    Translator,
)
from numprotect.services.translation.fastredis import ScriptClient
from numprotect.services.translation.servicer import LIST_BLOCKED_CALLERS, TranslationServiceServicer
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

log = logging.getLogger(__name__)

FULL_NAME = translation_pb2.DESCRIPTOR.services_by_name["TranslationService"].full_name


def build_sync(runtime: SyncRuntime) -> ServiceParts:
    """The service (settings validated here: SettingsError): hot path on ScriptClient, the rest on redis-py."""
    settings = TranslationSettings.from_env(runtime.env)
    page_tokens = PageTokens(PageTokenKey.from_env(runtime.env), LIST_BLOCKED_CALLERS)
    clock = SystemClock()
    view = BlocklistView()
    store = BlocklistStore(runtime.redis, clock, max_entries=settings.blocklist_max_entries)
    translator = Translator(
        settings,
        view,
        clock,
        traced=runtime.telemetry.enabled,
        decisions=DecisionCounts(runtime.metrics),
        tracer=runtime.telemetry.tracer,
    )
    try:  # loaded now so the first call is one round trip; ScriptClient loads them again on NOSCRIPT
        for script in (SCRIPT, READ_ONLY_SCRIPT):
            runtime.redis.script_load(script.source)  # a cluster client loads it on every primary
    except Exception as exc:
        log.warning("translation script not loaded at start", extra={"error": repr(exc)})
    refresher = BlocklistRefresher(store, view, settings.blocklist_refresh_seconds)
    refresher.start()
    client = ScriptClient(
        runtime.redis_settings, SCRIPT, READ_ONLY_SCRIPT, round_trip=runtime.metrics.redis_round_trip("fastredis")
    )
    servicer = TranslationServiceServicer(
        client, translator, store, page_tokens, clock, runtime.telemetry, runtime.identity.callers
    )
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, translation_pb2_grpc.add_TranslationServiceServicer_to_server),
        ],
        on_shutdown=[refresher.stop],
        max_workers=settings.workers,
    )
