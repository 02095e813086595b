"""Binding's calls to allocation go through the batch RPCs, batched naturally (batching.py): concurrent creates share
few calls, a lone request goes at once, each request keeps its own deadline, and every caller gets exactly the error
its own unary call would have given it (allocation's message after "allocation <RPC>: ")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from binding.test_binding import AXB, create_request
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from numprotect.allocation.v1 import allocation_pb2 as apb
from numprotect.allocation.v1 import allocation_pb2_grpc
from numprotect.binding.v1 import binding_pb2 as pb
from numprotect.core.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from numprotect.core.settings import Env, SettingsError
from numprotect.core.telemetry import Telemetry
from numprotect.services.allocation.servicer import MAX_BATCH_ITEMS
from numprotect.services.binding.allocation_client import AllocationClient
from numprotect.services.binding.batching import BATCH_SPAN, Batcher, BatchLimits
from numprotect.services.binding.settings import ALLOCATION_BATCH_LIMIT, BindingSettings
from support.rpc import rpc_error
from support.tls import secure_channel

CREATES = 64
ALLOCATE_NUMBERS = "/numprotect.allocation.v1.AllocationService/AllocateNumbers"
CONFIRM_RESERVATIONS = "/numprotect.allocation.v1.AllocationService/ConfirmReservations"


def traced() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.from_env({"OTEL_TRACES_SAMPLER": "always_on"}, "numprotect-test", exporter=exporter)
    assert telemetry.enabled
    return telemetry, exporter


def client_of(s: Any) -> AllocationClient:
    """The binding service's own AllocationClient."""
    client: AllocationClient = s.binding_service.app.registrations[0].servicer.creator.allocation
    return client


def party(i: int, prefix: str) -> str:
    return f"{prefix}{i:08d}"


# ---------------------------------------------------------------- through the binding service


async def test_64_concurrent_creates_share_few_batch_calls(services: Any) -> None:
    """Counted at allocation (its SERVER spans) and at binding's client: every reservation and confirmation went
    in a batch call, far fewer calls than creates; each batch span links the creates it carried."""
    telemetry, exporter = traced()
    async with services(telemetry=telemetry) as s:
        replies = await asyncio.gather(
            *(
                s.binding.CreateBinding(create_request(f"many-{i}", party_a=party(i, "138"), party_b=party(i, "139")))
                for i in range(CREATES)
            )
        )
        client = client_of(s)
        allocations, confirmations = client.allocations.batcher, client.confirmations.batcher
    assert len({r.binding.binding_id for r in replies}) == CREATES
    assert telemetry.provider is not None
    telemetry.provider.force_flush()
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    telemetry.shutdown()

    def servers(name: str) -> list[ReadableSpan]:
        return [sp for sp in spans if sp.kind == SpanKind.SERVER and sp.name == name]

    for name, batcher in ((ALLOCATE_NUMBERS, allocations), (CONFIRM_RESERVATIONS, confirmations)):
        calls = servers(name)
        carried: list[int] = [dict(sp.attributes or {})["numprotect.batch_items"] for sp in calls]  # type: ignore[misc]
        print(f"{name}: {CREATES} items in {len(calls)} calls {sorted(carried, reverse=True)}")
        assert sum(carried) == CREATES
        assert len(calls) <= CREATES // 2, carried  # far fewer calls than creates
        assert (batcher.batches_sent, batcher.items_sent) == (len(calls), CREATES)
    assert not servers(ALLOCATE_NUMBERS.removesuffix("s")) and not servers(CONFIRM_RESERVATIONS.removesuffix("s"))

    def children(parent: ReadableSpan) -> list[ReadableSpan]:
        return [sp for sp in spans if sp.parent is not None and sp.parent.span_id == parent.context.span_id]

    # Each batch call: binding's INTERNAL span under one create's SERVER span, linking the other creates it carried;
    # the CLIENT span under it; allocation's SERVER span under that (the trace context crossed the hop).
    by_id = {sp.context.span_id: sp for sp in spans}
    batch_spans = [sp for sp in spans if sp.name == BATCH_SPAN]
    assert len(batch_spans) == allocations.batches_sent + confirmations.batches_sent
    creates = {sp.context.span_id for sp in spans if sp.name.endswith("/CreateBinding") and sp.kind == SpanKind.SERVER}
    for batch in batch_spans:
        attributes = dict(batch.attributes or {})
        assert batch.parent is not None and batch.parent.span_id in creates
        assert len(batch.links) == attributes["numprotect.batch_items"] - 1  # type: ignore[operator]
        assert all(link.context.span_id in creates for link in batch.links)
        (client_span,) = children(batch)
        assert client_span.kind == SpanKind.CLIENT and client_span.name.endswith(str(attributes["rpc.method"]))
        (server_span,) = children(client_span)
        assert server_span.kind == SpanKind.SERVER and server_span.name == client_span.name
        assert dict(server_span.attributes or {})["numprotect.batch_items"] == attributes["numprotect.batch_items"]
        assert by_id[batch.parent.span_id].context.trace_id == server_span.context.trace_id


async def test_the_32_duplicate_creates_reserve_through_the_batch_rpc(services: Any) -> None:
    """The duplicates test's path (tests/binding/test_binding.py) as the service runs it: one binding, and its one
    reservation went through AllocateNumbers and ConfirmReservations."""
    async with services() as s:
        replies = await asyncio.gather(*(s.binding.CreateBinding(create_request("dup-b")) for _ in range(32)))
        assert len({r.binding.binding_id for r in replies}) == 1
        client = client_of(s)
        assert client.allocations.batcher.items_sent == 1
        assert client.confirmations.batcher.items_sent == 1


# ---------------------------------------------------------------- the client against the real allocation service


async def test_each_caller_gets_the_error_its_unary_call_gives(services: Any) -> None:
    """The client's errors, item by item in one batch, are allocation's unary answers with the step named."""
    async with services() as s, secure_channel(s.allocation_address, s.service_token) as channel:
        stub: Any = allocation_pb2_grpc.AllocationServiceStub(channel)
        parties = ["13800000001", "13900000002"]
        cancelled = await stub.AllocateNumber(
            apb.AllocateNumberRequest(tenant_id="t1", mode=AXB, parties=parties, city_code="010")
        )
        await stub.CancelReservation(apb.CancelReservationRequest(reservation_id=cancelled.reservation_id))
        expire_ms = int(time.time() * 1000) + 60_000
        client = AllocationClient(channel, timeout_seconds=5, batching=BatchLimits(max_items=8, max_in_flight=1))
        # Made in the same loop pass, the three go in one call: one succeeds, two fail, each with its own answer.
        fine = client.allocate("t1", AXB, parties, "010", False, lease_ms=60_000)
        exhausted = client.allocate("t1", AXB, parties, "021", True, lease_ms=60_000)
        bad_party = client.allocate("t1", AXB, ["13800000001", "123"], "010", False, lease_ms=60_000)
        outcomes = await asyncio.gather(fine, exhausted, bad_party, return_exceptions=True)
        assert (client.allocations.batcher.batches_sent, client.allocations.batcher.items_sent) == (1, 3)
        assert not isinstance(outcomes[0], BaseException)
        strict = apb.AllocateNumberRequest(tenant_id="t1", mode=AXB, parties=parties, city_code="021", strict_city=True)
        unary = await rpc_error(stub.AllocateNumber(strict))
        assert isinstance(outcomes[1], ResourceExhausted)
        assert outcomes[1].message == f"allocation AllocateNumber: {unary.details()}"
        assert outcomes[1].subject == "allocation"
        bad = apb.AllocateNumberRequest(tenant_id="t1", mode=AXB, parties=["13800000001", "123"], city_code="010")
        unary = await rpc_error(stub.AllocateNumber(bad))
        assert isinstance(outcomes[2], InvalidArgument)
        assert [(v.field, v.description) for v in outcomes[2].violations] == [
            ("allocation", f"allocation AllocateNumber: {unary.details()}")
        ]

        confirms = await asyncio.gather(
            client.confirm(outcomes[0].reservation_id, "b" + "0" * 22, expire_ms),
            client.confirm(cancelled.reservation_id, "b" + "0" * 22, expire_ms),
            client.confirm("nope", "b" + "0" * 22, expire_ms),
            return_exceptions=True,
        )
        assert (client.confirmations.batcher.batches_sent, client.confirmations.batcher.items_sent) == (1, 3)
        assert confirms[0] is None
        confirm = apb.ConfirmReservationRequest(reservation_id=cancelled.reservation_id, binding_id="b" + "0" * 22)
        confirm.expire_time.FromMilliseconds(expire_ms)
        unary = await rpc_error(stub.ConfirmReservation(confirm))
        assert unary.code() == grpc.StatusCode.NOT_FOUND
        assert isinstance(confirms[1], Aborted)  # the create's retry starts afresh
        assert confirms[1].message == f"allocation ConfirmReservation: {unary.details()}; retry"
        confirm.reservation_id = "nope"
        unary = await rpc_error(stub.ConfirmReservation(confirm))
        assert isinstance(confirms[2], InvalidArgument)
        assert confirms[2].violations[0].description == f"allocation ConfirmReservation: {unary.details()}"

        cancels = await asyncio.gather(
            client.cancel(cancelled.reservation_id, "again"), client.cancel("nope", "test"), return_exceptions=True
        )
        assert cancels[0] is None  # idempotent
        unary = await rpc_error(stub.CancelReservation(apb.CancelReservationRequest(reservation_id="nope")))
        assert isinstance(cancels[1], InvalidArgument)
        assert cancels[1].violations[0].description == f"allocation CancelReservation: {unary.details()}"


async def test_a_request_out_of_time_fails_locally_as_a_unary_call_would(services: Any) -> None:
    async with services() as s, secure_channel(s.allocation_address, s.service_token) as channel:
        stub: Any = allocation_pb2_grpc.AllocationServiceStub(channel)
        request = apb.AllocateNumberRequest(
            tenant_id="t1", mode=AXB, parties=["13800000001", "13900000002"], city_code="010"
        )
        unary = await rpc_error(stub.AllocateNumber(request, timeout=0.000_001))
        assert unary.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        client = AllocationClient(channel, timeout_seconds=0.000_001)
        with pytest.raises(Unavailable) as raised:
            await client.allocate("t1", AXB, ["13800000001", "13900000002"], "010", False, lease_ms=60_000)
        assert raised.value.message == f"allocation AllocateNumber: {unary.details()}"


# ---------------------------------------------------------------- the batcher alone


class Recorder:
    """A batch sender that records each batch and answers it when the test opens its gate."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], float]] = []
        self.gates: list[asyncio.Event] = []

    async def send(self, requests: list[int], within: float) -> list[str]:
        self.batches.append((list(requests), within))
        self.gates.append(asyncio.Event())
        await self.gates[-1].wait()
        return [f"answer {r}" for r in requests]

    def open_all(self) -> None:
        for gate in self.gates:
            gate.set()


def refusal(code: grpc.StatusCode) -> str:
    return f"unanswered {code.name}"


def batcher_of(recorder: Recorder, max_items: int = 8) -> Batcher[int, str]:
    return Batcher(recorder.send, BatchLimits(max_items=max_items, max_in_flight=1), refusal, method="M")


async def test_a_lone_request_goes_at_once_and_later_ones_wait_for_the_next_batch() -> None:
    recorder = Recorder()
    batcher = batcher_of(recorder, max_items=4)
    first = asyncio.create_task(batcher.submit(0, 5.0))
    for _ in range(3):  # the task's first step, the flush after it, the batch call's first step: no timer
        await asyncio.sleep(0)
    assert [b for b, _ in recorder.batches] == [[0]]  # sent without waiting for company
    rest = [asyncio.create_task(batcher.submit(i, 5.0)) for i in range(1, 10)]
    await asyncio.sleep(0.01)
    assert [b for b, _ in recorder.batches] == [[0]]  # one call on its way: the others wait
    while len(recorder.batches) < 4:
        recorder.open_all()
        await asyncio.sleep(0.01)
    recorder.open_all()
    answers = await asyncio.gather(first, *rest)
    assert answers == [f"answer {i}" for i in range(10)]
    assert [b for b, _ in recorder.batches] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert (batcher.batches_sent, batcher.items_sent) == (4, 10)


async def test_a_batch_call_gets_the_longest_time_left_and_each_item_keeps_its_own_deadline() -> None:
    recorder = Recorder()
    batcher = batcher_of(recorder)
    blocker = asyncio.create_task(batcher.submit(0, 5.0))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    short = asyncio.create_task(batcher.submit(1, 0.3))
    long = asyncio.create_task(batcher.submit(2, 3.0))
    await asyncio.sleep(0.01)
    recorder.gates[0].set()  # the first batch answers; items 1 and 2 leave together, and their call hangs
    assert await blocker == "answer 0"
    assert await short == refusal(grpc.StatusCode.DEADLINE_EXCEEDED)  # at its own deadline, not the call's
    assert 0.25 < time.monotonic() - started < 1.5
    assert not long.done()
    (_, first_within), (second, second_within) = recorder.batches
    assert second == [1, 2] and 2.5 < second_within <= 3.0 and 4.5 < first_within <= 5.0
    recorder.gates[1].set()
    assert await long == "answer 2"


async def test_a_cancelled_caller_leaves_the_queue() -> None:
    recorder = Recorder()
    batcher = batcher_of(recorder)
    blocker = asyncio.create_task(batcher.submit(0, 5.0))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(batcher.submit(1, 5.0))
    kept = asyncio.create_task(batcher.submit(2, 5.0))
    await asyncio.sleep(0.01)
    gone.cancel()
    recorder.gates[0].set()
    await asyncio.sleep(0.01)
    recorder.open_all()
    assert list(await asyncio.gather(blocker, kept)) == ["answer 0", "answer 2"]
    assert gone.cancelled()
    assert [b for b, _ in recorder.batches] == [[0], [2]]


def test_batch_settings_are_validated_and_within_allocation_s_limit() -> None:
    assert ALLOCATION_BATCH_LIMIT == MAX_BATCH_ITEMS
    settings = BindingSettings.from_env(Env({}))
    assert settings.allocation_batching == BatchLimits(max_items=64, max_in_flight=1)
    custom = BindingSettings.from_env(
        Env({"NUMPROTECT_BINDING_ALLOCATION_MAX_BATCH": "16", "NUMPROTECT_BINDING_ALLOCATION_BATCHES_IN_FLIGHT": "3"})
    )
    assert custom.allocation_batching == BatchLimits(max_items=16, max_in_flight=3)
    for name, value in (
        ("NUMPROTECT_BINDING_ALLOCATION_MAX_BATCH", str(MAX_BATCH_ITEMS + 1)),
        ("NUMPROTECT_BINDING_ALLOCATION_MAX_BATCH", "0"),
        ("NUMPROTECT_BINDING_ALLOCATION_BATCHES_IN_FLIGHT", "0"),
        ("NUMPROTECT_BINDING_ALLOCATION_BATCHES_IN_FLIGHT", "two"),
    ):
        with pytest.raises(SettingsError, match=name):
            BindingSettings.from_env(Env({name: value}))


async def test_a_create_in_a_pool_without_numbers_is_answered_as_before(services: Any) -> None:
    """Through the service: RESOURCE_EXHAUSTED naming allocation's reason, as the unary hop answered it."""
    async with services() as s:
        error = await rpc_error(s.binding.CreateBinding(create_request("none-left", city_code="021", strict_city=True)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (error.details() or "").startswith("allocation AllocateNumber: no AXB number left for tenant t1")
        listed = await s.binding.ListBindings(pb.ListBindingsRequest(tenant_id="t1"))
        assert not listed.bindings
