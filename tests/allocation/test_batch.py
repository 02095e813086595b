"""The batch reservation RPCs (AllocateNumbers, ConfirmReservations, CancelReservations) on the real service: each
item answers exactly what its unary call answers (the response, or the same google.rpc.Status: code, message,
details), one item's failure fails no other, the batch size is bounded, and concurrent items keep the AXB rule."""

from __future__ import annotations

import collections
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from allocation.test_allocation import B1, BLOCK, import_block, party, timestamp_in
from google.rpc import status_pb2
from grpc_status import rpc_status

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.services.allocation.servicer import MAX_BATCH_ITEMS
from support.rpc import fails, status_fields, violated_fields

Service = Callable[..., AbstractAsyncContextManager[Any]]
AXB = common_pb2.BINDING_MODE_AXB
AXN = common_pb2.BINDING_MODE_AXN


async def unary_outcome(call: Any) -> Any:
    """A unary call's response, or the google.rpc.Status it ended with."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        return status if status is not None else status_pb2.Status(code=exc.code().value[0], message=exc.details())


def item_outcome(result: Any) -> Any:
    return result.error if result.WhichOneof("result") == "error" else result.response


def allocation(tenant: str, mode: Any, *parties: str, city: str = "010") -> pb.AllocateNumberRequest:
    return pb.AllocateNumberRequest(tenant_id=tenant, mode=mode, parties=list(parties), city_code=city)


async def test_each_allocation_item_answers_what_its_unary_call_answers(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        requests = [
            allocation("t1", AXB, party(1), party(2)),
            allocation("t9", AXB, party(1), party(2)),  # a tenant without a pool: RESOURCE_EXHAUSTED
            allocation("t1", AXB, party(1), "12345"),  # parties[1] is no phone number
            allocation("t1", 99, party(1), party(2)),  # no such mode
            allocation("", AXB, party(1), party(2)),  # binding must name the tenant
            allocation("t1", AXN, party(3)),
            allocation("t1", AXB, party(4), party(5), city="0x"),  # city_code
        ]
        batch = await stub.AllocateNumbers(pb.AllocateNumbersRequest(requests=requests))
        assert len(batch.results) == len(requests)
        outcomes = [item_outcome(result) for result in batch.results]
        for index, request in enumerate(requests):
            unary = await unary_outcome(stub.AllocateNumber(request))
            if isinstance(unary, status_pb2.Status):
                assert outcomes[index] == unary, (index, outcomes[index], unary)  # code, message and details
            else:
                got = outcomes[index]
                assert isinstance(got, pb.AllocateNumberResponse), (index, got)
                assert got.virtual_number.startswith(BLOCK) and got.reservation_id and got.city_code == "010"
                assert got.lease_expire_time.seconds > 0
        codes = [o.code if isinstance(o, status_pb2.Status) else 0 for o in outcomes]
        assert codes == [
            0,
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            0,
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        ]
        assert "no AXB number left for tenant t9" in outcomes[1].message
        # Bad input names the item's field; the item is the result's index.
        assert [status_fields(outcomes[i]) for i in (2, 3, 4, 6)] == [
            ["parties[1]"],
            ["mode"],
            ["tenant_id"],
            ["city_code"],
        ]


async def test_each_confirm_and_cancel_item_answers_what_its_unary_call_answers(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        await import_block(stub)
        allocated = await stub.AllocateNumbers(
            pb.AllocateNumbersRequest(requests=[allocation("t1", AXB, party(i), party(i + 1)) for i in (1, 3, 5)])
        )
        kept, cancelled, spare = (r.response.reservation_id for r in allocated.results)
        await stub.CancelReservation(pb.CancelReservationRequest(reservation_id=cancelled, reason="test"))
        confirms = [
            pb.ConfirmReservationRequest(reservation_id=kept, binding_id=B1, expire_time=timestamp_in(3600)),
            pb.ConfirmReservationRequest(reservation_id=cancelled, binding_id=B1, expire_time=timestamp_in(3600)),
            pb.ConfirmReservationRequest(reservation_id="nope", binding_id=B1, expire_time=timestamp_in(3600)),
            pb.ConfirmReservationRequest(reservation_id=spare, binding_id="b1", expire_time=timestamp_in(3600)),
            pb.ConfirmReservationRequest(reservation_id=spare, binding_id=B1),
        ]
        batch = await stub.ConfirmReservations(pb.ConfirmReservationsRequest(requests=confirms))
        outcomes = [item_outcome(result) for result in batch.results]
        assert [o.code if isinstance(o, status_pb2.Status) else 0 for o in outcomes] == [
            0,
            grpc.StatusCode.NOT_FOUND.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        ]
        assert [status_fields(outcomes[i]) for i in (2, 3, 4)] == [
            ["reservation_id"],
            ["binding_id"],
            ["expire_time"],
        ]
        for index, request in enumerate(confirms):  # a confirmation may be repeated: the unary call answers alike
            assert outcomes[index] == await unary_outcome(stub.ConfirmReservation(request)), index
        info = await stub.GetNumber(pb.GetNumberRequest(virtual_number=allocated.results[0].response.virtual_number))
        assert info.number.active_bindings >= 1

        cancels = [
            pb.CancelReservationRequest(reservation_id=spare, reason="test"),
            pb.CancelReservationRequest(reservation_id=cancelled, reason="again"),  # idempotent: OK
            pb.CancelReservationRequest(reservation_id="nope"),
            pb.CancelReservationRequest(reservation_id=kept, reason="x" * 300),
        ]
        batch_cancel = await stub.CancelReservations(pb.CancelReservationsRequest(requests=cancels))
        outcomes = [item_outcome(result) for result in batch_cancel.results]
        assert [o.code if isinstance(o, status_pb2.Status) else 0 for o in outcomes] == [
            0,
            0,
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
        ]
        assert [status_fields(outcomes[i]) for i in (2, 3)] == [["reservation_id"], ["reason"]]
        for index, cancel in enumerate(cancels):
            assert outcomes[index] == await unary_outcome(stub.CancelReservation(cancel)), index
        # The refused cancel (reason too long) left the kept reservation alone: it still confirms.
        await stub.ConfirmReservation(confirms[0])


async def test_a_batch_holds_at_most_the_limit(allocation_service: Service) -> None:
    async with allocation_service() as stub:
        unnamed = pb.AllocateNumberRequest(mode=AXB, parties=[party(1), party(2)], city_code="010")
        full = await stub.AllocateNumbers(pb.AllocateNumbersRequest(requests=[unnamed] * MAX_BATCH_ITEMS))
        assert len(full.results) == MAX_BATCH_ITEMS
        assert {status_fields(r.error)[0] for r in full.results} == {"tenant_id"}
        error = await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.AllocateNumbers(pb.AllocateNumbersRequest(requests=[unnamed] * (MAX_BATCH_ITEMS + 1))),
        )
        assert violated_fields(error) == ["requests"]
        assert f"at most {MAX_BATCH_ITEMS} items" in (error.details() or "")
        confirm = pb.ConfirmReservationRequest(reservation_id="nope")
        await fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            stub.ConfirmReservations(pb.ConfirmReservationsRequest(requests=[confirm] * (MAX_BATCH_ITEMS + 1))),
        )


async def test_concurrent_items_of_one_batch_keep_the_axb_rule(allocation_service: Service) -> None:
    """32 items for the same two parties run at once: 32 different numbers, none holding a party twice."""
    async with allocation_service() as stub:
        await import_block(stub)
        same = allocation("t1", AXB, party(1), party(2))
        batch = await stub.AllocateNumbers(pb.AllocateNumbersRequest(requests=[same] * 32))
        failed = [(i, r.error.code, r.error.message) for i, r in enumerate(batch.results) if r.HasField("error")]
        assert not failed, failed  # which item, with what status
        numbers = [r.response.virtual_number for r in batch.results]
        assert max(collections.Counter(numbers).values()) == 1
        assert len({r.response.reservation_id for r in batch.results}) == 32
