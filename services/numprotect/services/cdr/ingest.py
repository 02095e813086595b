"""The ingest pipeline of one batch: validate each record, check it is the reporting carrier's to report, drop
in-batch repeats, enrich, store exactly once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Link
from opentelemetry.util.types import AttributeValue

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.clock import Clock
from numprotect.core.errors import ResourceExhausted
from numprotect.core.phone import mask
from numprotect.core.telemetry import link_from_call_ref, set_attributes
from numprotect.services.cdr.counts import CdrCounts
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


@dataclass(frozen=True, slots=True)
class Reporter:
    """Who reports a batch: the carrier of the caller's principal (None only with NUMPROTECT_AUTH=off: then the
    record's own carrier_id is kept, unchecked) and which numbers it routes (`Callers.carrier_routes`)."""

    carrier_id: str | None
    routes: Callable[[str], bool]

    def check(self, checked: ValidCdr) -> Rejection | None:
        """A rejection when the record is not this carrier's to report; else None (carrier_id set from the caller)."""
        record = checked.record
        if self.carrier_id is not None:
            if record.carrier_id and record.carrier_id != self.carrier_id:
                return Rejection(
                    checked.index,
                    record.call_id,
                    "carrier_id",
                    "must be empty or the calling carrier's own id (it is taken from the caller's API key)",
                )
            record.carrier_id = self.carrier_id
        if not self.routes(record.called_number):
            return Rejection(
                checked.index,
                record.call_id,
                "called_number",
                "is not in a block the calling carrier routes: only that number's carrier reports its calls",
            )
        return None


def too_many_rejected(limit: int, rejected: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"more than NUMPROTECT_CDR_MAX_REJECTED ({limit}) records rejected in one call ({rejected} so far); "
        "nothing further of the call was stored: fix the records and resend",
        subject="NUMPROTECT_CDR_MAX_REJECTED",
    )


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
        self,
        store: CdrStore,
        enricher: Enricher,
        settings: CdrSettings,
        tracer: trace.Tracer,
        *,
        clock: Clock,
        counts: CdrCounts | None = None,
    ) -> None:
        self.store = store
        self.enricher = enricher
        self.settings = settings
        self.tracer = tracer
        self.clock = clock
        self.counts = counts or CdrCounts.uncounted()  # numprotect_cdrs, numprotect_cdr_ingestion_lag_seconds

    async def ingest(
        self,
        records: Sequence[cdr_pb2.CallDetailRecord],
        reporter: Reporter,
        *,
        first_index: int = 0,
        rejected_before: int = 0,
    ) -> Summary:
        """Every input record ends up exactly once in accepted, duplicates or rejected. A rejected record writes
        nothing (its dedup key included). More than NUMPROTECT_CDR_MAX_REJECTED rejections in the call (with the
        `rejected_before` of its earlier chunks): RESOURCE_EXHAUSTED, and nothing of this chunk is stored (nor
        counted in numprotect_cdrs: the call fails, the carrier resends)."""
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
            if not isinstance(checked, Rejection):
                checked = reporter.check(checked) or checked
            if isinstance(checked, Rejection):
                summary.rejected.append(checked)
            elif checked.record.call_id in seen:
                summary.duplicates += 1  # the same call twice in one batch: the first one counts
            else:
                seen.add(checked.record.call_id)
                valid.append(checked)
        rejected = rejected_before + len(summary.rejected)
        if rejected > self.settings.max_rejected:
            raise too_many_rejected(self.settings.max_rejected, rejected)
        if not valid:
            self._count(summary, [], 0, now_ms)
            return summary
        stored: list[ValidCdr] = []
        unmatched_stored = 0
        with self.tracer.start_as_current_span("cdr.ingest", links=span_links(valid)) as span:
            await self.enricher.enrich(valid)
            owners: dict[str, list[ValidCdr]] = {}
            for item in valid:
                unmatched = item.record.binding_match == cdr_pb2.BINDING_MATCH_NONE
                owners.setdefault("" if unmatched else item.record.tenant_id, []).append(item)
            # One script call per bucket (slot) of each owner, concurrently, each holding a place of the process's
            # Redis limit. If one fails the call fails (UNAVAILABLE) and the carrier resends the batch: what was
            # stored counts as duplicates then.
            results = await asyncio.gather(
                *(self.store.ingest(tenant_id, group, now_ms) for tenant_id, group in owners.items())
            )
            for (tenant_id, group), ids in zip(owners.items(), results, strict=True):
                for item, entry_id in zip(group, ids, strict=True):
                    if entry_id is None:
                        summary.duplicates += 1
                        continue
                    stored.append(item)
                    if not tenant_id:
                        unmatched_stored += 1
            summary.accepted += len(stored)
            unmatched_count = len(owners.get("", []))
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
        self._count(summary, stored, unmatched_stored, now_ms)
        return summary

    def _count(self, summary: Summary, stored: Sequence[ValidCdr], unmatched: int, now_ms: int) -> None:
        """Each record of the chunk under its one outcome; the lag of each record stored now."""
        counts = self.counts
        counts.ingested.inc(summary.accepted - unmatched)
        counts.unmatched.inc(unmatched)
        counts.duplicate.inc(summary.duplicates)
        counts.rejected.inc(len(summary.rejected))
        for item in stored:
            counts.lag.observe(max(0, now_ms - item.release_ms) / 1000)
