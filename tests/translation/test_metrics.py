"""numprotect_translation_decisions{decision, reason}: every answer of Translate and TranslateStream counted once, in
the service's own registry, under the decision and reason the caller received."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from numprotect.translation.v1 import translation_pb2 as pb

X = "700100000000001"  # the conftest's number and parties
A = "13800000001"
B = "13900000002"
STRANGER = "13700000003"
BLOCKED = "13600000009"
REASONS = ("no_binding", "direction_not_allowed", "rate_limited", "number_locked", "caller_blocked")


def _label(response: pb.TranslateResponse) -> tuple[str, str]:
    decision = pb.Decision.Name(response.decision).removeprefix("DECISION_").lower()  # type: ignore[arg-type]
    if response.decision != pb.DECISION_REJECT:
        return decision, "none"
    return decision, pb.RejectReason.Name(response.reject_reason).removeprefix("REJECT_REASON_").lower()  # type: ignore[arg-type]


def _decisions(tr: Any) -> dict[tuple[str, str], float | None]:
    registry = tr.service.runtime.metrics.registry
    pairs = [("connect", "none"), ("collect_extension", "none"), *(("reject", r) for r in REASONS)]
    return {
        (decision, reason): registry.get_sample_value(
            "numprotect_translation_decisions_total", {"decision": decision, "reason": reason}
        )
        for decision, reason in pairs
    }


async def test_every_answer_is_counted_once_by_decision_and_reason(tr: Any) -> None:
    before = _decisions(tr)
    assert set(before.values()) == {0.0}  # every pair exposed from the start
    await tr.put(tr.route("b1"))
    answered: Counter[tuple[str, str]] = Counter()

    for caller in (A, B, STRANGER):  # connect, connect, reject no_binding
        answered[_label(await tr.translate(caller))] += 1
    # A caller on the global blocklist is answered without Redis: counted as well.
    await tr.operator.BlockCaller(pb.BlockCallerRequest(calling_number=BLOCKED, reason="fraud"))
    while (response := await tr.translate(BLOCKED)).reject_reason != pb.REJECT_REASON_CALLER_BLOCKED:
        answered[_label(response)] += 1
        await asyncio.sleep(0.05)  # the blocklist refresh (100 ms)
    answered[_label(response)] += 1

    async def stream_requests() -> AsyncIterator[pb.TranslateStreamRequest]:
        for i, caller in enumerate((A, STRANGER, BLOCKED)):
            yield pb.TranslateStreamRequest(
                request=pb.TranslateRequest(call_id=f"s{i}", calling_number=caller, called_number=X)
            )
        yield pb.TranslateStreamRequest(  # an error, not a decision: not counted
            request=pb.TranslateRequest(call_id="bad", calling_number=A, called_number="not-a-number")
        )
        batch = [pb.TranslateRequest(call_id=f"m{i}", calling_number=B, called_number=X) for i in range(3)]
        yield pb.TranslateStreamRequest(requests=batch)

    errors = 0
    async for message in tr.stub.TranslateStream(stream_requests()):
        for item in message.responses or [message]:
            if item.error:
                errors += 1
            else:
                answered[_label(item.response)] += 1

    assert errors == 1
    assert answered[("connect", "none")] == 2 + 1 + 3
    assert answered[("reject", "caller_blocked")] == 2
    after = _decisions(tr)
    counted = {pair: after[pair] - before[pair] for pair in after if after[pair] != before[pair]}  # type: ignore[operator]
    assert counted == {pair: float(n) for pair, n in answered.items()}
