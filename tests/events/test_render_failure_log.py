"""A failure of rendering itself (a bug) drops the entry and is logged with where it happened, never with the
exception's text: that may hold a phone number (phone numbers are masked in logs)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from numprotect.core import event_keys
from numprotect.services.events.render import OutboxEntry, Renderer, Unrenderable

NUMBER = "13812345678"


class _BrokenRenderer(Renderer):
    def _data(self, entry: OutboxEntry, records: Any) -> Any:
        raise ValueError(f"cannot render party {NUMBER}")


async def test_a_render_bug_drops_the_entry_and_logs_no_number(caplog: pytest.LogCaptureFixture) -> None:
    entry = OutboxEntry("1-0", event_keys.NUMBER_LOCKED, "t1", 1, "700100000000001", "", b"abuse|op")
    with caplog.at_level(logging.ERROR, logger="numprotect.services.events.render"):
        [out] = await _BrokenRenderer(None).render([entry])  # type: ignore[arg-type]  # no binding entry: no Redis
    assert isinstance(out, Unrenderable) and out.reason == "render_failed"
    [record] = [r for r in caplog.records if r.getMessage() == "events render failed"]
    logged = str(record.__dict__) + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
    assert NUMBER not in logged
    assert "ValueError" in logged and "_data" in logged  # what failed and where
