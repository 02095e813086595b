"""The corpus: requests that once answered INTERNAL (or were accepted when they should not have been), replayed
against the platform on every run. Each was found by the black-box run of issue 16 or by this fuzzer
(each case records the answer it got when found); a new finding is added here as a case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from fuzz.contracts import Rpc, all_rpcs, call, problems, shown
from fuzz.platform import PARTY_A, PARTY_B, TENANT, Platform
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from numprotect.admin.v1 import admin_pb2
from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2
from numprotect.cdr.v1 import cdr_pb2
from numprotect.common.v1 import common_pb2
from numprotect.core.identity.principal import Role
from numprotect.translation.v1 import translation_pb2

RPC_BY_NAME = {rpc.name: rpc for rpc in all_rpcs()}
AFTER_9999 = Timestamp(seconds=253402300800)
NEGATIVE_NANOS = Timestamp(seconds=1_800_000_000, nanos=-1)
FULL_WIDTH_CALLER = "13600000005".translate(str.maketrans("0123456789", "".join(chr(0xFF10 + d) for d in range(10))))


@dataclass(frozen=True)
class Case:
    rpc: str
    role: Role
    request: Callable[[Platform], Message]
    # The field the INVALID_ARGUMENT must name ("" when the request is valid and must answer OK).
    field: str
    found: str  # what it answered when found


CORPUS: dict[str, Case] = {
    "confirm_reservation_negative_nanos": Case(
        "AllocationService.ConfirmReservation",
        Role.SERVICE,
        lambda p: allocation_pb2.ConfirmReservationRequest(
            reservation_id=p.seeded.reservations["confirm"], binding_id=p.seeded.binding_id, expire_time=NEGATIVE_NANOS
        ),
        "expire_time",
        "INTERNAL (issue 16)",
    ),
    "confirm_reservation_after_year_9999": Case(
        "AllocationService.ConfirmReservation",
        Role.SERVICE,
        lambda p: allocation_pb2.ConfirmReservationRequest(
            reservation_id=p.seeded.reservations["confirm"], binding_id=p.seeded.binding_id, expire_time=AFTER_9999
        ),
        "expire_time",
        "INTERNAL (issue 16)",
    ),
    "update_binding_after_year_9999": Case(
        "BindingService.UpdateBinding",
        Role.TENANT,
        lambda p: binding_pb2.UpdateBindingRequest(
            binding=binding_pb2.Binding(binding_id=p.seeded.binding_id, tenant_id=TENANT, expire_time=AFTER_9999),
            update_mask=FieldMask(paths=["expire_time"]),
        ),
        "binding.expire_time",
        "INTERNAL (issue 16)",
    ),
    "trace_number_negative_nanos": Case(
        "BindingService.TraceNumber",
        Role.TENANT,
        lambda p: binding_pb2.TraceNumberRequest(virtual_number=p.seeded.virtual_number, at=NEGATIVE_NANOS),
        "at",
        "INTERNAL (issue 16)",
    ),
    "create_binding_ttl_of_ten_thousand_years": Case(
        "BindingService.CreateBinding",
        Role.TENANT,
        lambda p: binding_pb2.CreateBindingRequest(
            tenant_id=TENANT,
            out_order_id="corpus-ttl",
            mode=common_pb2.BINDING_MODE_AXB,
            party_a=PARTY_A,
            party_b=PARTY_B,
            ttl=Duration(seconds=315576000000),
            user_consent=True,
        ),
        "ttl",
        "INTERNAL (issue 16)",
    ),
    "list_cdrs_after_year_9999": Case(
        "CdrService.ListCdrs",
        Role.TENANT,
        lambda p: cdr_pb2.ListCdrsRequest(tenant_id=TENANT, start_time=AFTER_9999),
        "start_time",
        "INTERNAL (issue 16)",
    ),
    "list_cdrs_non_ascii_binding_id": Case(
        "CdrService.ListCdrs",
        Role.TENANT,
        lambda p: cdr_pb2.ListCdrsRequest(tenant_id=TENANT, binding_id="绑定-1"),
        "binding_id",
        "INTERNAL (issue 16)",
    ),
    "block_caller_ttl_of_ten_thousand_years": Case(
        "TranslationService.BlockCaller",
        Role.TENANT,
        lambda p: translation_pb2.BlockCallerRequest(
            tenant_id=TENANT, calling_number="13600000006", ttl=Duration(seconds=315576000000)
        ),
        "ttl",
        "INTERNAL, and the entry stored: ListBlockedCallers INTERNAL afterwards (issue 16)",
    ),
    "block_caller_full_width_digits": Case(
        "TranslationService.BlockCaller",
        Role.TENANT,
        lambda p: translation_pb2.BlockCallerRequest(tenant_id=TENANT, calling_number=FULL_WIDTH_CALLER),
        "calling_number",
        "OK: stored a number CreateBinding refuses (issue 16)",
    ),
    "watch_cdrs_arabic_indic_cursor": Case(
        "CdrService.WatchCdrs",
        Role.TENANT,
        lambda p: cdr_pb2.WatchCdrsRequest(tenant_id=TENANT, cursor="\u0661\u0662\u0663-\u0660"),
        "cursor",
        "INTERNAL (validation sweep 02b2279)",
    ),
    "watch_cdrs_cursor_past_64_bits": Case(
        "CdrService.WatchCdrs",
        Role.TENANT,
        lambda p: cdr_pb2.WatchCdrsRequest(tenant_id=TENANT, cursor="99999999999999999999999-0"),
        "cursor",
        "INTERNAL (validation sweep 02b2279)",
    ),
    "list_audit_events_before_1970": Case(
        "AdminService.ListAuditEvents",
        Role.OPERATOR,
        lambda p: admin_pb2.ListAuditEventsRequest(start_time=Timestamp(seconds=-1)),
        "start_time",
        "INTERNAL (validation sweep 02b2279)",
    ),
    "allocate_number_hundred_thousand_parties": Case(
        "AllocationService.AllocateNumber",
        Role.SERVICE,
        lambda p: allocation_pb2.AllocateNumberRequest(
            tenant_id=TENANT, mode=common_pb2.BINDING_MODE_AXB, parties=["13800000001"] * 100_000
        ),
        "parties",
        "every party normalised before the count was checked (0e40ea0)",
    ),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_case_is_answered_precisely(platform: Platform, name: str) -> None:
    case = CORPUS[name]
    rpc: Rpc = RPC_BY_NAME[case.rpc]
    request = case.request(platform)
    answer = call(platform.channel(rpc.process, case.role), rpc, request)
    context = f"{name} (once: {case.found})\n{shown(request)}"
    assert not problems(rpc, answer), (problems(rpc, answer), context)
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (answer.code, answer.details, context)
    assert case.field in answer.violated, (answer.violated, context)


def test_blocklist_still_lists_after_the_corpus(platform: Platform) -> None:
    """A refused BlockCaller stores nothing that breaks the tenant's listing (it once answered INTERNAL for good)."""
    rpc = RPC_BY_NAME["TranslationService.BlockCaller"]
    for name in ("block_caller_ttl_of_ten_thousand_years", "block_caller_full_width_digits"):
        call(platform.channel(rpc.process, Role.TENANT), rpc, CORPUS[name].request(platform))
    listing = RPC_BY_NAME["TranslationService.ListBlockedCallers"]
    answer = call(
        platform.channel(listing.process, Role.TENANT),
        listing,
        translation_pb2.ListBlockedCallersRequest(tenant_id=TENANT, page_size=1000),
    )
    assert answer.code == grpc.StatusCode.OK, (answer.code, answer.details)


def test_cdr_memory_stays_bounded_while_ingesting(platform: Platform) -> None:
    """Found by the long profile (random IngestCdrs, 2,000 calls: cdr's resident memory +303 MB). Batches of 1,000
    records with a 3,000-character recording_url (each rejected naming recording_url) grew cdr's RSS linearly, by
    about the size of each request (+182 MiB over 50 batches of 3.3 MB, no plateau). Fifty batches after ten must
    add less than 50 MiB."""
    rpc = RPC_BY_NAME["CdrService.IngestCdrs"]
    channel = platform.channel(rpc.process, Role.CARRIER)

    def batch(n: int) -> cdr_pb2.IngestCdrsRequest:
        records = [platform.cdr_record(f"memory-{n}-{i}") for i in range(1000)]
        for record in records:
            record.recording_url = "u" * 3000
        return cdr_pb2.IngestCdrsRequest(records=records)

    for n in range(10):
        assert call(channel, rpc, batch(n)).code == grpc.StatusCode.OK
    before = platform.rss()["cdr"]
    for n in range(10, 60):
        assert call(channel, rpc, batch(n)).code == grpc.StatusCode.OK
    grown = platform.rss()["cdr"] - before
    assert grown < 50 * 1024 * 1024, f"cdr kept {grown / 2**20:.0f} MiB of 50,000 ingested records"
