"""cdr.created and abuse.flagged recorded by IngestCdrs (ingest.lua) in the outbox of the bucket's slot, in the
script that stores the records: one cdr.created per record stored for a tenant (its payload as stored), one
abuse.flagged when a (number, caller) pair first becomes flagged in its window; nothing for duplicates, for a pair
flagged already, or for records that matched no tenant."""

from __future__ import annotations

from typing import Any

from cdr.conftest import CALLER, X, bucket_of

from numprotect.cdr.v1 import cdr_pb2
from support.event_outbox import all_outbox_entries, hinted, outbox, outbox_payloads

WINDOW_MS = 3_600_000
UNBOUND = "700100000000002"  # in X's block (routed by the carrier), no binding on it


async def test_stored_records_and_a_new_flag_are_recorded_once(
    cdr_service: Any, make_binding: Any, make_record: Any, redis_sync: Any, now_ms: int
) -> None:
    await make_binding("b1")
    async with cdr_service(NUMPROTECT_CDR_ABUSE_MIN_CALLS="2", NUMPROTECT_CDR_ABUSE_WINDOW="1h") as cdr:
        call_ms = now_ms - 120_000
        window = call_ms - call_ms % WINDOW_MS
        batch = [
            make_record("c1", call_ms=call_ms),  # answered 30 s: neither short nor unanswered
            make_record("c2", call_ms=call_ms, answered_s=None),
            make_record("c3", call_ms=call_ms, answered_s=None),  # the pair's second bad call: flagged
            make_record("u1", call_ms=call_ms, called_number=UNBOUND),  # matches no binding: no tenant to tell
        ]
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=batch))
        assert reply.accepted == 4
        again = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=batch))
        assert again.duplicates == 4
        later = make_record("c4", call_ms=call_ms, answered_s=None)  # flagged already: no second abuse.flagged
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[later]))

        stream = bucket_of(redis_sync, "t1").stream
        stored = redis_sync.xrange(stream)
        entries = outbox(redis_sync, stream)
        assert [(e["ty"], e["tn"], e["src"], e["n"]) for e in entries] == [
            ("cdr.created", "t1", "cmcc|c1", ""),
            ("cdr.created", "t1", "cmcc|c2", ""),
            ("cdr.created", "t1", "cmcc|c3", ""),
            ("abuse.flagged", "t1", f"{X}|{CALLER}", ""),
            ("cdr.created", "t1", "cmcc|c4", ""),
        ]
        created = [i for i, e in enumerate(entries) if e["ty"] == "cdr.created"]
        payloads = outbox_payloads(redis_sync, stream)
        # d: the record as stored (enriched: tenant, binding); at: the ms of its stream id (its ingest_time).
        assert [payloads[i] for i in created] == [fields[b"p"] for _, fields in stored]
        assert [entries[i]["at"] for i in created] == [entry_id.decode().split("-")[0] for entry_id, _ in stored]
        assert cdr_pb2.CallDetailRecord.FromString(payloads[0]).binding_id == "b1"
        flag = entries[3]
        assert flag["d"] == f"{window}|0|2|3"  # window start | short | unanswered | total calls of the pair
        assert abs(int(flag["at"]) - int(entries[2]["at"])) < 60_000
        assert hinted(redis_sync, stream)
        # Nothing for the unmatched record, nowhere else.
        cdr_events = [e for e in all_outbox_entries(redis_sync) if not e["ty"].startswith("binding.")]
        assert len(cdr_events) == 5
