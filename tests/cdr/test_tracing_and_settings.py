"""The tracing hook (span links to the call setups named by call_ref, masked numbers only) and settings checks."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.call_ref import CallRef
from numprotect.core.settings import Env, SettingsError
from numprotect.core.telemetry import Telemetry
from numprotect.services.cdr.settings import CdrSettings

X = "700100000000001"


async def test_ingestion_span_links_to_the_translation_span_and_masks_numbers(
    cdr_service: Any, make_record: Any, make_binding: Any, now_ms: int
) -> None:
    await make_binding("b-traced", tenant_id="t1")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ref = CallRef("b-traced", X, now_ms - 130_000, trace_id=0x1234ABCD, span_id=0x42).encode()
    async with cdr_service(telemetry=Telemetry(provider)) as cdr:
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record("traced", call_ref=ref)]))
        assert reply.accepted == 1
    provider.shutdown()
    spans = [s for s in exporter.get_finished_spans() if s.name == "cdr.ingest"]
    assert len(spans) == 1
    span = spans[0]
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [(0x1234ABCD, 0x42)]
    attributes = dict(span.attributes or {})
    assert attributes["cdr.accepted"] == 1
    assert attributes["cdr.calling_number"] == "138****0001"
    assert all("13800000001" not in str(value) for value in attributes.values())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NUMPROTECT_CDR_MAX_BATCH", "0", "between 1 and"),
        ("NUMPROTECT_CDR_RETENTION", "forever", "duration"),
        ("NUMPROTECT_CDR_ABUSE_MIN_CALLS", "x", "integer"),
        ("NUMPROTECT_CDR_ABUSE_WINDOW", "400d", "between"),
        ("NUMPROTECT_CDR_STREAM_BUCKETS", "0", "between 1 and 64"),
        ("NUMPROTECT_CDR_STREAM_BUCKETS", "65", "between 1 and 64"),
        ("NUMPROTECT_CDR_STREAM_BUCKETS", "four", "integer"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as raised:
        CdrSettings.from_env(Env({name: value}))
    assert name in str(raised.value)


def test_the_abuse_window_must_fit_in_the_retention() -> None:
    with pytest.raises(SettingsError, match="NUMPROTECT_CDR_ABUSE_WINDOW"):
        CdrSettings.from_env(Env({"NUMPROTECT_CDR_RETENTION": "1h", "NUMPROTECT_CDR_ABUSE_WINDOW": "2h"}))
    defaults = CdrSettings.from_env(Env({}))
    assert (defaults.max_batch, defaults.retention_ms, defaults.stream_buckets) == (1000, 180 * 86_400_000, 1)


def test_the_process_exits_2_with_one_line_on_a_bad_setting(redis_env: dict[str, str]) -> None:
    import os
    import subprocess
    import sys

    from support.identity import with_auth
    from support.processes import ROOT
    from support.tls import with_tls

    # Everything else valid (TLS, the auth key): the one bad setting is the one line.
    env = {
        **with_auth(with_tls({**os.environ, **redis_env})),
        "NUMPROTECT_CDR_PORT": "0",
        "NUMPROTECT_CDR_MAX_BATCH": "-3",
    }
    result = subprocess.run(
        [sys.executable, "-m", "numprotect.services.cdr"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "numprotect-cdr: NUMPROTECT_CDR_MAX_BATCH='-3': must be between 1 and 100000"
    ]
