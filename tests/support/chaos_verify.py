"""After a fault: read back every acknowledged write, look for half-written state, run the invariant checker, and
sum up what the recorder saw (the figures of docs/reliability.md's "Faults" table)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from numprotect.binding.v1 import binding_pb2
from numprotect.cdr.v1 import cdr_pb2
from numprotect.common.v1 import common_pb2
from numprotect.core import doctor
from numprotect.core.redis_client import as_text
from numprotect.core.settings import Env, RedisSettings
from numprotect.translation.v1 import translation_pb2
from support.chaos_load import FORBIDDEN, RETRYABLE, STALLED, Answer, ExpectedBinding, LoadDriver, Recorder
from support.chaos_stack import CALL_DEADLINE_SECONDS, DEADLINE_MARGIN_SECONDS, TENANT, ChaosStack

VERIFY_DEADLINE_SECONDS = 5.0
# Stream-level answers of the long-lived calls (WatchCdrs, TranslateStream) have no deadline of their own.
STREAM_RPCS = {"WatchCdrs"}


@dataclass
class Verdict:
    """What the read-back found; every list must be empty."""

    bindings_lost: list[str] = field(default_factory=list)
    updates_lost: list[str] = field(default_factory=list)
    deletes_lost: list[str] = field(default_factory=list)
    cdrs_lost: list[str] = field(default_factory=list)
    cdrs_duplicated: list[str] = field(default_factory=list)
    cdrs_not_watched: list[str] = field(default_factory=list)
    half_written: list[str] = field(default_factory=list)
    order_conflicts: list[str] = field(default_factory=list)
    doctor: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    uncertain_bindings: int = 0

    @property
    def acknowledged_writes_lost(self) -> int:
        return len(self.bindings_lost) + len(self.updates_lost) + len(self.deletes_lost) + len(self.cdrs_lost)

    def problems(self) -> list[str]:
        found: list[str] = []
        for name in (
            "bindings_lost",
            "updates_lost",
            "deletes_lost",
            "cdrs_lost",
            "cdrs_duplicated",
            "cdrs_not_watched",
            "half_written",
            "order_conflicts",
            "doctor",
            "unreadable",
        ):
            items: list[str] = getattr(self, name)
            if items:
                found.append(f"{name}: {len(items)} (e.g. {items[:3]})")
        return found


async def _read(invoke: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    """A verification read: retried while UNAVAILABLE for up to 10 s (the fault is over; the read must work)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return "OK", await invoke()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                return str(error.code().name), error
            await asyncio.sleep(0.2)


async def _check_binding(driver: LoadDriver, expected: ExpectedBinding, verdict: Verdict) -> None:
    meta = driver.metadata("tenant")
    code, reply = await _read(
        lambda: driver.binding.GetBinding(
            binding_pb2.GetBindingRequest(binding_id=expected.binding_id, tenant_id=TENANT),
            metadata=meta,
            timeout=VERIFY_DEADLINE_SECONDS,
        )
    )
    if code == "NOT_FOUND":
        verdict.bindings_lost.append(expected.binding_id)
        return
    if code != "OK":
        verdict.unreadable.append(f"GetBinding {expected.binding_id}: {code}")
        return
    got = reply.binding
    active = got.state == common_pb2.BINDING_STATE_ACTIVE
    if expected.certain:
        if expected.deleted and got.state != common_pb2.BINDING_STATE_DELETED:
            verdict.deletes_lost.append(f"{expected.binding_id} is {common_pb2.BindingState.Name(got.state)}")
        if not expected.deleted:
            if not active:
                verdict.bindings_lost.append(f"{expected.binding_id} is {common_pb2.BindingState.Name(got.state)}")
            differs = [
                name
                for name, want, have in (
                    ("party_b", expected.party_b, got.party_b),
                    ("call_restriction", expected.call_restriction, got.call_restriction),
                    ("recording_enabled", expected.recording_enabled, got.recording_enabled),
                    ("expire_time", expected.expire_ms, got.expire_time.ToMilliseconds()),
                )
                if want != have
            ]
            if differs:
                verdict.updates_lost.append(f"{expected.binding_id}: {differs}")
    # Whatever the record says, the routes must agree with it.
    code, routed = await _read(
        lambda: driver.translation.Translate(
            translation_pb2.TranslateRequest(
                calling_number=expected.party_a,
                called_number=expected.virtual_number,
                call_id=f"verify-{expected.binding_id}",
            ),
            metadata=driver.metadata("carrier"),
            timeout=VERIFY_DEADLINE_SECONDS,
        )
    )
    if code != "OK":
        verdict.unreadable.append(f"Translate {expected.binding_id}: {code}")
        return
    ours = routed.binding_id == expected.binding_id
    if active:
        if got.call_restriction == common_pb2.CALL_RESTRICTION_B_TO_A_ONLY:
            agrees = routed.decision == translation_pb2.DECISION_REJECT and (
                ours or routed.reject_reason == translation_pb2.REJECT_REASON_DIRECTION_NOT_ALLOWED
            )
        else:
            agrees = (
                routed.decision == translation_pb2.DECISION_CONNECT and ours and routed.target_number == got.party_b
            )
        if not agrees:
            verdict.half_written.append(
                f"{expected.binding_id} ACTIVE but Translate A->X: {translation_pb2.Decision.Name(routed.decision)} "
                f"binding {routed.binding_id or '-'}"
            )
    elif routed.decision == translation_pb2.DECISION_CONNECT and ours:
        verdict.half_written.append(
            f"{expected.binding_id} {common_pb2.BindingState.Name(got.state)} but Translate A->X connects it"
        )


async def _check_routes(driver: LoadDriver, stack: ChaosStack, verdict: Verdict) -> None:
    """Every route key in Redis names a binding GetBinding shows ACTIVE (a failed create leaves none behind)."""
    client = stack.redis_client()
    try:
        routed: dict[str, str] = {}
        for key in client.scan_iter(match="np:rt:*", count=1000):
            value = client.get(key)
            name = as_text(key)
            if value is None or name.endswith(":axe"):
                continue
            routed.setdefault(as_text(value).split("|", 1)[0], name)
    finally:
        client.close()
    for binding_id, key in routed.items():
        code, reply = await _read(
            lambda binding_id=binding_id: driver.binding.GetBinding(  # type: ignore[misc]
                binding_pb2.GetBindingRequest(binding_id=binding_id, tenant_id=TENANT),
                metadata=driver.metadata("tenant"),
                timeout=VERIFY_DEADLINE_SECONDS,
            )
        )
        if code == "OK" and reply.binding.state == common_pb2.BINDING_STATE_ACTIVE:
            continue
        state = common_pb2.BindingState.Name(reply.binding.state) if code == "OK" else code
        verdict.half_written.append(f"route {key} of binding {binding_id}, which GetBinding answers {state}")


async def _check_cdrs(driver: LoadDriver, verdict: Verdict) -> None:
    request = cdr_pb2.ListCdrsRequest(tenant_id=TENANT, page_size=1000)
    start = driver.recorder.marks["load_start"]
    request.start_time.FromMilliseconds(int((time.time() - (time.monotonic() - start)) * 1000) - 600_000)
    request.end_time.FromMilliseconds(int(time.time() * 1000) + 600_000)
    listed: Counter[str] = Counter()
    while True:
        code, reply = await _read(
            lambda: driver.cdr.ListCdrs(request, metadata=driver.metadata("tenant"), timeout=VERIFY_DEADLINE_SECONDS)
        )
        if code != "OK":
            verdict.unreadable.append(f"ListCdrs: {code}")
            return
        listed.update(record.call_id for record in reply.records)
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    verdict.cdrs_lost = sorted(call_id for call_id in driver.ledger.cdrs if call_id not in listed)
    verdict.cdrs_duplicated = sorted(call_id for call_id, n in listed.items() if n > 1)
    verdict.cdrs_not_watched = sorted(set(driver.ledger.cdrs) - driver.ledger.watched)


# What a create wrote is not judged ("in flight") until its deadline (the create lease, 10 s), 1 s and binding's
# recovery round (5 s) have passed, plus the checker's grace (2 s): scans repeat until nothing is in flight.
DOCTOR_SETTLE_SECONDS = 30.0


async def doctor_violations(stack: ChaosStack) -> list[str]:
    """The invariant checker's findings on the stack's Redis (numprotect.core.doctor; zero required), once no
    create is in flight any more."""
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": stack.redis.url}))
    deadline = time.monotonic() + DOCTOR_SETTLE_SECONDS
    report = await doctor.scan_async(settings)
    while report.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        report = await doctor.scan_async(settings)
    found = [f"{v.kind}: {v.key} {v.detail}" for v in report.violations]
    if report.in_flight:
        found.append(f"{report.in_flight} creates still in flight {DOCTOR_SETTLE_SECONDS:g} s after the load")
    return found


async def verify(driver: LoadDriver, stack: ChaosStack) -> Verdict:
    verdict = Verdict(order_conflicts=list(driver.ledger.order_conflicts))
    await driver.wait_watched()
    limit = asyncio.Semaphore(8)

    async def bounded(expected: ExpectedBinding) -> None:
        async with limit:
            await _check_binding(driver, expected, verdict)

    await asyncio.gather(*(bounded(b) for b in driver.ledger.bindings.values()))
    verdict.uncertain_bindings = sum(not b.certain for b in driver.ledger.bindings.values())
    await _check_routes(driver, stack, verdict)
    await _check_cdrs(driver, verdict)
    verdict.doctor = await doctor_violations(stack)
    return verdict


# -- figures ---------------------------------------------------------------------------------------------------------
def is_late(answer: Answer) -> bool:
    if answer.rpc in STREAM_RPCS:
        return False
    return answer.code in ("DEADLINE_EXCEEDED", STALLED) or (
        answer.latency > CALL_DEADLINE_SECONDS + DEADLINE_MARGIN_SECONDS
    )


@dataclass
class Figures:
    """One fault's row in docs/reliability.md."""

    fault: str
    load_seconds: float
    calls: int
    unavailable: int
    internal: int  # INTERNAL and UNKNOWN
    forbidden: int  # INTERNAL, UNKNOWN, CANCELLED, DATA_LOSS
    late: int  # DEADLINE_EXCEEDED, a stalled stream message, or an answer later than deadline + margin
    unexpected: Counter[str]  # other codes a valid load should never get, per RPC:code
    acknowledged: Counter[str]
    lost: int
    recovery_seconds: float | None  # from the heal to the end of the last failed answer
    codes: dict[str, Counter[str]]
    slowest: dict[str, float]

    def row(self) -> str:
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.2f} s"
        acked = sum(self.acknowledged.values())
        return (
            f"| {self.fault} | {self.load_seconds:.0f} s | {self.calls} | {self.unavailable} | {self.internal} | "
            f"{self.late} | {acked} | {self.lost} | {recovery} |"
        )

    def text(self) -> str:
        lines = [f"{self.fault}: load {self.load_seconds:.1f} s, {self.calls} answers"]
        for rpc in sorted(self.codes):
            codes = ", ".join(f"{code} {n}" for code, n in self.codes[rpc].most_common())
            lines.append(f"  {rpc}: {codes}; slowest {self.slowest.get(rpc, 0.0):.2f} s")
        lines.append(f"  acknowledged writes: {dict(self.acknowledged)}; lost {self.lost}")
        lines.append(
            f"  UNAVAILABLE {self.unavailable}, INTERNAL/UNKNOWN {self.internal}, forbidden {self.forbidden}, "
            f"late {self.late}, unexpected {dict(self.unexpected)}"
        )
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.2f} s"
        lines.append(f"  recovery after the heal: {recovery}")
        return "\n".join(lines)


def figures(fault: str, driver: LoadDriver, verdict: Verdict, *, allowed: set[str] | None = None) -> Figures:
    """Sums up the recorder. `allowed`: codes that are a legitimate answer under this fault besides OK and the
    retryable ones (e.g. NOT_FOUND for nothing here)."""
    recorder: Recorder = driver.recorder
    answers = recorder.answers
    codes: dict[str, Counter[str]] = defaultdict(Counter)
    slowest: dict[str, float] = defaultdict(float)
    unexpected: Counter[str] = Counter()
    ok = {"OK", *RETRYABLE, *(allowed or set())}
    for answer in answers:
        codes[answer.rpc][answer.code] += 1
        if answer.rpc not in STREAM_RPCS:
            slowest[answer.rpc] = max(slowest[answer.rpc], answer.latency)
        stream_ended = answer.rpc in STREAM_RPCS and answer.code == "ENDED"
        if answer.code not in ok | FORBIDDEN | {"DEADLINE_EXCEEDED", STALLED} and not stream_ended:
            unexpected[f"{answer.rpc}:{answer.code}"] += 1
    healed = recorder.marks.get("healed")
    recovery = None
    if healed is not None:
        failed_after = [a.end for a in answers if a.code != "OK" and a.end >= healed and a.rpc not in STREAM_RPCS]
        recovery = max(failed_after, default=healed) - healed
    return Figures(
        fault=fault,
        load_seconds=recorder.marks.get("load_stop", time.monotonic()) - recorder.marks["load_start"],
        calls=len(answers),
        unavailable=sum(a.code == "UNAVAILABLE" for a in answers),
        internal=sum(a.code in ("INTERNAL", "UNKNOWN") for a in answers),
        forbidden=sum(a.code in FORBIDDEN for a in answers),
        late=sum(is_late(a) for a in answers),
        unexpected=unexpected,
        acknowledged=Counter(driver.ledger.writes_acknowledged),
        lost=verdict.acknowledged_writes_lost,
        recovery_seconds=recovery,
        codes=dict(codes),
        slowest=dict(slowest),
    )


def failures(row: Figures, verdict: Verdict, stack: ChaosStack) -> list[str]:
    """Everything that must be zero, as readable lines (empty: the fault passed)."""
    found = list(verdict.problems())
    if row.forbidden:
        found.append(f"{row.forbidden} INTERNAL/UNKNOWN/CANCELLED/DATA_LOSS answers")
    if row.late:
        found.append(f"{row.late} answers past their deadline (+{DEADLINE_MARGIN_SECONDS} s) or stalled")
    if row.unexpected:
        found.append(f"unexpected answers to a valid load: {dict(row.unexpected)}")
    unexpected_logs = stack.unexpected_errors()
    if unexpected_logs:
        found.append(f"{len(unexpected_logs)} unexpected-error log lines, e.g. {unexpected_logs[:2]}")
    return found
