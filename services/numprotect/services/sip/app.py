"""Wires the SIP adapter: settings, the translation client, the transaction table, the listeners and the sweeper,
started by the one bootstrap (run_service("sip", build)); its gRPC port serves health only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from opentelemetry import trace

from numprotect.core.periodic import Periodic
from numprotect.core.server import Runtime, ServiceParts
from numprotect.services.sip.handler import SipHandler, SipMetrics, Translator
from numprotect.services.sip.settings import SipSettings
from numprotect.services.sip.transactions import T1, TransactionTable
from numprotect.services.sip.translation_client import CallSetup, TranslationClient
from numprotect.services.sip.transport import SipServer

log = logging.getLogger(__name__)

# The sweeper's period: timers fire within this of their deadline (Timer G's first is T1 = 500 ms).
SWEEP_SECONDS = T1 / 5
# Draining waits at most this long past the translation deadline for the INVITEs in flight.
DRAIN_MARGIN_SECONDS = 1.0
# Each TranslateStream on its own HTTP/2 connection: grpc shares one connection (subchannel) between channels of
# equal target and options, so without a per-channel pool NUMPROTECT_SIP_STREAMS streams would ride one connection
# (behind an L4 Service: one translation replica per adapter).
STREAM_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


class ManagedTranslator(Translator, Protocol):
    """translation_client.TranslationClient: the handler's Translator, started and closed with the adapter."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class SipAdapter:
    """One running adapter: `port` is the bound SIP port (UDP and TCP), `handler` and `server` its parts."""

    def __init__(
        self, settings: SipSettings, handler: SipHandler, server: SipServer, translator: ManagedTranslator
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.server = server
        self.translator = translator
        self._sweeper = Periodic("sip-sweeper", self._sweep, SWEEP_SECONDS)

    @property
    def port(self) -> int:
        return self.server.port

    async def _sweep(self) -> None:
        self.handler.sweep()
        self.server.sweep(self.server.now())

    def ready(self) -> bool:
        return self.handler.ready

    async def start(self) -> None:
        """Listens, opens the translation streams and starts the sweeper; a failure leaves nothing bound."""
        await self.server.start()
        try:
            await self.translator.start()
        except BaseException:
            await self.server.close()
            raise
        self._sweeper.start()

    async def close(self) -> None:
        """Drain: new INVITEs get 503 while the ones in flight finish (bounded), then the listeners, the sweeper
        and the translation streams close."""
        await self.handler.drain(self.settings.translate_timeout + DRAIN_MARGIN_SECONDS)
        await self.server.close()
        await self._sweeper.stop()
        await self.translator.close()


async def build(runtime: Runtime, *, started: Callable[[SipAdapter], None] | None = None) -> ServiceParts:
    """The SIP adapter; `started` (tests) receives it once it listens (its `port`)."""
    settings = SipSettings.from_env(runtime.env)  # SettingsError before anything listens
    metrics = SipMetrics(runtime.metrics)
    provider = runtime.telemetry.provider
    tracer = provider.get_tracer("numprotect.sip") if provider is not None else trace.NoOpTracer()
    translator = TranslationClient(
        lambda: runtime.channel("translation", STREAM_CHANNEL_OPTIONS), settings, runtime.metrics
    )
    table = TransactionTable(settings.max_transactions)
    handler = SipHandler(settings, translator, CallSetup, metrics, table, tracer=tracer)
    adapter = SipAdapter(settings, handler, SipServer(settings, handler, metrics), translator)
    await adapter.start()
    log.info(
        "sip listening",
        extra={
            "sip_port": adapter.port,
            "sip_host": settings.host,
            "transports": ",".join(settings.transports),
            "egress": settings.egress,
        },
    )
    if started is not None:
        started(adapter)
    # Draining starts with the stop signal (new INVITEs: 503 at once), not after the gRPC server's grace period.
    return ServiceParts(
        registrations=[],
        on_shutdown=[adapter.close],
        ready=adapter.ready,
        ready_means="a translation stream up, not draining",
        on_drain=[handler.start_draining],
    )
