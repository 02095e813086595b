"""cdr's domain metrics on a real service and Redis: every record under one outcome of numprotect_cdrs, the ingestion
lag of each stored record, and numprotect_abuse_flags once per flagged pair and window."""

from __future__ import annotations

from typing import Any

from cdr.conftest import CALLER, X

from numprotect.cdr.v1 import cdr_pb2

OTHER_X = "700100000000002"  # in X's block (routed by the carrier), no binding on it
ABUSER = "13500000005"


def sample(cdr: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    value: float | None = cdr.svc.runtime.metrics.registry.get_sample_value(name, labels or {})
    return value


def outcomes(cdr: Any) -> dict[str, float | None]:
    names = ("ingested", "unmatched", "duplicate", "rejected")
    return {o: sample(cdr, "numprotect_cdrs_total", {"outcome": o}) for o in names}


async def test_each_record_is_counted_once_by_outcome_with_its_lag(
    cdr_service: Any, make_record: Any, make_binding: Any
) -> None:
    async with cdr_service() as cdr:
        assert outcomes(cdr) == {"ingested": 0, "unmatched": 0, "duplicate": 0, "rejected": 0}
        await make_binding("b1")  # X's binding: its records match it
        batch = [
            make_record("m1"),
            make_record("m2", answered_s=None),
            make_record("u1", called_number=OTHER_X),
            make_record("m1"),  # the same call twice in one batch
            make_record("bad", calling_number="not a number"),
        ]
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=batch))
        assert (reply.accepted, reply.duplicates, len(reply.rejected)) == (3, 1, 1)
        again = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=batch[:3]))  # stored already
        assert again.duplicates == 3
        assert outcomes(cdr) == {"ingested": 2, "unmatched": 1, "duplicate": 4, "rejected": 1}
        # The records' calls ended 85 s and 115 s before they were sent (conftest's make_record): 3 lags, each
        # observed once, in the 60-120 s bucket.
        lag = "numprotect_cdr_ingestion_lag_seconds"
        assert sample(cdr, f"{lag}_count") == 3
        assert sample(cdr, f"{lag}_bucket", {"le": "60.0"}) == 0
        assert sample(cdr, f"{lag}_bucket", {"le": "120.0"}) == 3
        assert 3 * 85 <= (sample(cdr, f"{lag}_sum") or 0) <= 85 + 2 * 115 + 30


async def test_a_pair_is_flagged_once_per_window(cdr_service: Any, make_record: Any) -> None:
    async with cdr_service(NUMPROTECT_CDR_ABUSE_MIN_CALLS="2") as cdr:
        flags = {"signal": "short_or_unanswered_calls"}
        assert sample(cdr, "numprotect_abuse_flags_total", flags) == 0
        unanswered = [make_record(f"a{i}", calling_number=ABUSER, answered_s=None) for i in range(4)]
        for record in unanswered[:3]:  # the second call flags the pair; the third finds it flagged
            await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[record]))
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=unanswered))  # 3 duplicates and a 4th call
        answered = [make_record(f"n{i}", calling_number=CALLER) for i in range(3)]  # long calls: no signal
        await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=answered))
        assert sample(cdr, "numprotect_abuse_flags_total", flags) == 1
        signals = await cdr.operator.GetAbuseSignals(cdr_pb2.GetAbuseSignalsRequest(unmatched=True, virtual_number=X))
        assert [s.flagged for s in signals.signals if s.unanswered_calls] == [True]
