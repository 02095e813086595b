"""Wires the translation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

import contextlib

from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration
from translation.blocklist import BlocklistRefresher, BlocklistStore, BlocklistView
from translation.core import SCRIPT, TranslationSettings, Translator
from translation.servicer import TranslationServiceServicer

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
