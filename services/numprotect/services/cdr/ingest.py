"""The ingest pipeline of one batch: validate each record, drop in-batch repeats, enrich, store exactly once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link
from opentelemetry.util.types import AttributeValue

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.clock import Clock
from numprotect.core.phone import mask
from numprotect.core.telemetry import link_from_call_ref, set_attributes
from numprotect.services.cdr.enrich import Enricher
from numprotect.services.cdr.settings import CdrSettings
from numprotect.services.cdr.store import CdrStore
from numprotect.services.cdr.validation import Rejection, ValidCdr, validate

log = logging.getLogger(__name__)
# Span links per ingestion span (OpenTelemetry's default span limit is 128).
MAX_LINKS = 128


@dataclass(slots=True)
class Summary:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def add(self, other: Summary) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)


def span_links(records: Sequence[ValidCdr]) -> list[Link]:
    """Links from the ingestion span to the translations (call setups) of the records, when they were traced."""
    links: list[Link] = []
    for valid in records:
        if valid.call_ref is None:
            continue
        link = link_from_call_ref(valid.call_ref, {"cdr.call_id": valid.record.call_id})
        if link is None:
            continue
        links.append(link)
        if len(links) >= MAX_LINKS:
            break
    return links


class Ingestor:
    def __init__(
        self, store: CdrStore, enricher: Enricher, settings: CdrSettings, tracer: trace.Tracer, *, clock: Clock
    ) -> None:
        self.store = store
        self.enricher = enricher
        self.settings = settings
        self.tracer = tracer
        self.clock = clock

    async def ingest(self, records: Sequence[cdr_pb2.CallDetailRecord], *, first_index: int = 0) -> Summary:
        """Every input record ends up exactly once in accepted, duplicates or rejected."""
        now_ms = self.clock.now_ms()
        summary = Summary()
        valid: list[ValidCdr] = []
        seen: set[str] = set()
        for offset, record in enumerate(records):
            checked = validate(
                first_index + offset,
                record,
                now_ms=now_ms,
                retention_ms=self.settings.retention_ms,
                max_clock_skew_ms=self.settings.max_clock_skew_ms,
            )
            if isinstance(checked, Rejection):
                summary.rejected.append(checked)
            elif checked.record.call_id in seen:
                summary.duplicates += 1  # the same call twice in one batch: the first one counts
            else:
                seen.add(checked.record.call_id)
                valid.append(checked)
        if not valid:
            return summary
        with self.tracer.start_as_current_span("cdr.ingest", links=span_links(valid)) as span:
            await self.enricher.enrich(valid)
            buckets: dict[str, list[ValidCdr]] = {}
            for item in valid:
                unmatched = item.record.binding_match == cdr_pb2.BINDING_MATCH_NONE
                buckets.setdefault("" if unmatched else item.record.tenant_id, []).append(item)
            # One script call per bucket (slot), concurrently, each holding a place of the process's Redis limit. If
            # one fails the call fails (UNAVAILABLE) and the carrier resends the batch: what was stored counts as
            # duplicates then.
            results = await asyncio.gather(
                *(self.store.ingest(tenant_id, group, now_ms) for tenant_id, group in buckets.items())
            )
            for ids in results:
                stored = sum(1 for entry_id in ids if entry_id is not None)
                summary.accepted += stored
                summary.duplicates += len(ids) - stored
            unmatched_count = len(buckets.get("", []))
            attributes: dict[str, AttributeValue] = {
                "cdr.records": len(records),
                "cdr.accepted": summary.accepted,
                "cdr.duplicates": summary.duplicates,
                "cdr.rejected": len(summary.rejected),
                "cdr.unmatched": unmatched_count,
            }
            if len(valid) == 1:
                attributes["cdr.called_number"] = mask(valid[0].record.called_number)
                attributes["cdr.calling_number"] = mask(valid[0].record.calling_number)
            set_attributes(span, attributes)
        if unmatched_count:
            log.info("cdr records matched no binding", extra={"count": unmatched_count})
        return summary
