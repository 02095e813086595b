"""A valid request of every RPC against the seeded platform: where the near-valid strategies start from.

A stream's valid request is a list of messages. A new RPC without an entry here fails
test_contracts.py::test_every_rpc_has_a_valid_request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fuzz.platform import (
    BLOCKED_CALLER,
    CARRIER,
    CITY,
    PARTY_A,
    PARTY_B,
    PARTY_C,
    RECEIVER_URL,
    SPARE_BLOCK,
    TENANT,
    Platform,
    timestamp,
)
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from numprotect.admin.v1 import admin_pb2
from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2
from numprotect.cdr.v1 import cdr_pb2
from numprotect.common.v1 import common_pb2
from numprotect.events.v1 import events_pb2
from numprotect.translation.v1 import translation_pb2

ValidRequest = Message | list[Message]


def _translate(p: Platform) -> translation_pb2.TranslateRequest:
    return translation_pb2.TranslateRequest(
        calling_number=PARTY_A, called_number=p.seeded.virtual_number, call_id="fuzz-translate"
    )


def _allocate(party_b: str = PARTY_B) -> allocation_pb2.AllocateNumberRequest:
    return allocation_pb2.AllocateNumberRequest(
        tenant_id=TENANT,
        mode=common_pb2.BINDING_MODE_AXB,
        parties=[PARTY_A, party_b],
        city_code=CITY,
        lease=Duration(seconds=30),
    )


def _confirm(p: Platform, use: str) -> allocation_pb2.ConfirmReservationRequest:
    return allocation_pb2.ConfirmReservationRequest(
        reservation_id=p.seeded.reservations[use], binding_id=p.seeded.binding_id, expire_time=timestamp(3600)
    )


def _cancel(p: Platform, use: str) -> allocation_pb2.CancelReservationRequest:
    return allocation_pb2.CancelReservationRequest(reservation_id=p.seeded.reservations[use], reason="fuzz")


VALID: dict[str, Callable[[Platform], Any]] = {
    # AdminService
    "AdminService.CreateApiKey": lambda p: admin_pb2.CreateApiKeyRequest(
        role=admin_pb2.ROLE_TENANT, tenant_id=TENANT, description="fuzz", expire_time=timestamp(3600)
    ),
    "AdminService.RevokeApiKey": lambda p: admin_pb2.RevokeApiKeyRequest(key_id=p.seeded.spare_key_id),
    "AdminService.ListApiKeys": lambda p: admin_pb2.ListApiKeysRequest(page_size=10, role=admin_pb2.ROLE_TENANT),
    "AdminService.ListAuditEvents": lambda p: admin_pb2.ListAuditEventsRequest(
        page_size=10, start_time=timestamp(-3600), end_time=timestamp(3600)
    ),
    "AdminService.VerifyAuditChain": lambda p: admin_pb2.VerifyAuditChainRequest(),
    # AllocationService
    "AllocationService.ImportBlock": lambda p: allocation_pb2.ImportBlockRequest(
        block=SPARE_BLOCK, tenant_id=TENANT, city_code=CITY, actor="fuzz", carrier_id=CARRIER
    ),
    "AllocationService.AllocateNumber": lambda p: _allocate(),
    "AllocationService.ConfirmReservation": lambda p: _confirm(p, "confirm"),
    "AllocationService.CancelReservation": lambda p: _cancel(p, "cancel"),
    "AllocationService.AllocateNumbers": lambda p: allocation_pb2.AllocateNumbersRequest(
        requests=[_allocate(), _allocate(PARTY_C)]
    ),
    "AllocationService.ConfirmReservations": lambda p: allocation_pb2.ConfirmReservationsRequest(
        requests=[_confirm(p, "confirm_batch")]
    ),
    "AllocationService.CancelReservations": lambda p: allocation_pb2.CancelReservationsRequest(
        requests=[_cancel(p, "cancel_batch")]
    ),
    "AllocationService.ReplaceParty": lambda p: allocation_pb2.ReplacePartyRequest(
        reservation_id=p.seeded.reservations["replace"], old_party=PARTY_C, new_party=PARTY_B
    ),
    "AllocationService.ReleaseNumber": lambda p: allocation_pb2.ReleaseNumberRequest(
        virtual_number=p.seeded.spare_number, actor="fuzz", reason="fuzz"
    ),
    "AllocationService.LockNumber": lambda p: allocation_pb2.LockNumberRequest(
        virtual_number=p.seeded.spare_number, reason="fuzz", actor="fuzz"
    ),
    "AllocationService.UnlockNumber": lambda p: allocation_pb2.UnlockNumberRequest(
        virtual_number=p.seeded.spare_number, actor="fuzz"
    ),
    "AllocationService.GetNumber": lambda p: allocation_pb2.GetNumberRequest(virtual_number=p.seeded.virtual_number),
    "AllocationService.GetPoolStats": lambda p: allocation_pb2.GetPoolStatsRequest(tenant_id=TENANT, city_code=CITY),
    "AllocationService.ListNumberHistory": lambda p: allocation_pb2.ListNumberHistoryRequest(
        virtual_number=p.seeded.virtual_number, page_size=10, reason="case-1"
    ),
    # BindingService
    "BindingService.CreateBinding": lambda p: p.create_binding_request("fuzz-create"),
    "BindingService.GetBinding": lambda p: binding_pb2.GetBindingRequest(
        binding_id=p.seeded.binding_id, tenant_id=TENANT, include_history=True
    ),
    "BindingService.UpdateBinding": lambda p: binding_pb2.UpdateBindingRequest(
        binding=binding_pb2.Binding(
            binding_id=p.seeded.binding_id,
            tenant_id=TENANT,
            expire_time=timestamp(7200),
            party_b=PARTY_B,
            call_restriction=common_pb2.CALL_RESTRICTION_NONE,
        ),
        update_mask=FieldMask(paths=["expire_time"]),
    ),
    "BindingService.DeleteBinding": lambda p: binding_pb2.DeleteBindingRequest(
        binding_id=p.seeded.doomed_binding_id, tenant_id=TENANT
    ),
    "BindingService.ListBindings": lambda p: binding_pb2.ListBindingsRequest(tenant_id=TENANT, page_size=10),
    "BindingService.TraceNumber": lambda p: binding_pb2.TraceNumberRequest(
        virtual_number=p.seeded.virtual_number, at=timestamp(0), party_number=PARTY_A, reason="case-1"
    ),
    # TranslationService
    "TranslationService.Translate": _translate,
    "TranslationService.TranslateStream": lambda p: [
        translation_pb2.TranslateStreamRequest(request=_translate(p)),
        translation_pb2.TranslateStreamRequest(requests=[_translate(p), _translate(p)]),
    ],
    "TranslationService.BlockCaller": lambda p: translation_pb2.BlockCallerRequest(
        tenant_id=TENANT, calling_number=BLOCKED_CALLER, reason="fuzz", ttl=Duration(seconds=3600)
    ),
    "TranslationService.UnblockCaller": lambda p: translation_pb2.UnblockCallerRequest(
        tenant_id=TENANT, calling_number=BLOCKED_CALLER
    ),
    "TranslationService.ListBlockedCallers": lambda p: translation_pb2.ListBlockedCallersRequest(
        tenant_id=TENANT, page_size=10
    ),
    # CdrService
    "CdrService.IngestCdrs": lambda p: cdr_pb2.IngestCdrsRequest(records=[p.cdr_record("fuzz-ingest")]),
    "CdrService.StreamCdrs": lambda p: [cdr_pb2.StreamCdrsRequest(record=p.cdr_record("fuzz-stream"))],
    "CdrService.ListCdrs": lambda p: cdr_pb2.ListCdrsRequest(
        tenant_id=TENANT, binding_id=p.seeded.binding_id, start_time=timestamp(-3600), page_size=10
    ),
    "CdrService.WatchCdrs": lambda p: cdr_pb2.WatchCdrsRequest(tenant_id=TENANT, cursor="0"),
    "CdrService.GetCdrStats": lambda p: cdr_pb2.GetCdrStatsRequest(tenant_id=TENANT),
    "CdrService.GetAbuseSignals": lambda p: cdr_pb2.GetAbuseSignalsRequest(
        tenant_id=TENANT, virtual_number=p.seeded.virtual_number
    ),
    # EventService
    "EventService.CreateEndpoint": lambda p: events_pb2.CreateEndpointRequest(
        tenant_id=TENANT, url=RECEIVER_URL, event_types=["binding.created"], description="fuzz", batch_size=10
    ),
    "EventService.GetEndpoint": lambda p: events_pb2.GetEndpointRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id
    ),
    "EventService.ListEndpoints": lambda p: events_pb2.ListEndpointsRequest(tenant_id=TENANT, page_size=10),
    "EventService.UpdateEndpoint": lambda p: events_pb2.UpdateEndpointRequest(
        endpoint=events_pb2.Endpoint(tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id, description="fuzz updated"),
        update_mask=FieldMask(paths=["description"]),
    ),
    "EventService.RotateEndpointSecret": lambda p: events_pb2.RotateEndpointSecretRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id, grace_period=Duration(seconds=60)
    ),
    "EventService.DeleteEndpoint": lambda p: events_pb2.DeleteEndpointRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.doomed_endpoint_id
    ),
    "EventService.ListDeliveries": lambda p: events_pb2.ListDeliveriesRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id, page_size=10
    ),
    "EventService.ReplayEvents": lambda p: events_pb2.ReplayEventsRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id, start_time=timestamp(-3600), end_time=timestamp(0)
    ),
    "EventService.ListDeadLetters": lambda p: events_pb2.ListDeadLettersRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id, page_size=10
    ),
    "EventService.RedriveDeadLetters": lambda p: events_pb2.RedriveDeadLettersRequest(
        tenant_id=TENANT, endpoint_id=p.seeded.endpoint_id
    ),
    "EventService.WatchEvents": lambda p: events_pb2.WatchEventsRequest(tenant_id=TENANT, cursor="0"),
}
