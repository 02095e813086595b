"""Wires the translation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

import contextlib

from numprotect.core.server import Runtime, ServiceParts, ServiceRegistration
from numprotect.core.server_sync import SyncRuntime, SyncServiceParts, SyncServiceRegistration
from numprotect.services.translation.blocklist import BlocklistRefresher, BlocklistStore, BlocklistView
from numprotect.services.translation.core import SCRIPT, TranslationSettings, Translator
from numprotect.services.translation.fastredis import ScriptClient
from numprotect.services.translation.servicer import TranslationServiceServicer
from numprotect.services.translation.sync_servicer import SyncTranslationServiceServicer
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

FULL_NAME = translation_pb2.DESCRIPTOR.services_by_name["TranslationService"].full_name


async def build_servicer(runtime: Runtime) -> tuple[TranslationServiceServicer, BlocklistRefresher]:
    """The aio servicer and its running blocklist refresher (settings validated here: SettingsError)."""
    settings = TranslationSettings.from_env(runtime.env)
    view = BlocklistView()
    store = BlocklistStore(runtime.redis)
    refresher = BlocklistRefresher(store, view, settings.blocklist_refresh_seconds)
    translator = Translator(settings, view, traced=runtime.telemetry.enabled)
    with contextlib.suppress(Exception):  # loaded now so the first call is one round trip; retried on NOSCRIPT
        await SCRIPT.load(runtime.redis)
    await refresher.start()
    return TranslationServiceServicer(runtime.redis, translator, store), refresher


async def build(runtime: Runtime) -> ServiceParts:
    servicer, refresher = await build_servicer(runtime)
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, translation_pb2_grpc.add_TranslationServiceServicer_to_server),
        ],
        on_shutdown=[refresher.stop],
    )


def build_sync(sync: SyncRuntime) -> SyncServiceParts:
    """The sync-model service: hot path on ScriptClient, cold RPCs and the blocklist refresher on the loop."""
    cold, refresher = sync.loop.run(build_servicer(sync.runtime))
    client = ScriptClient(sync.redis_settings, SCRIPT)
    servicer = SyncTranslationServiceServicer(client, cold.translator, cold, sync.loop, sync.runtime.telemetry)
    return SyncServiceParts(
        registrations=[
            SyncServiceRegistration(FULL_NAME, servicer, translation_pb2_grpc.add_TranslationServiceServicer_to_server),
        ],
        on_shutdown=[lambda: sync.loop.run(refresher.stop(), 5)],
        max_workers=cold.translator.settings.sync_workers,
    )
