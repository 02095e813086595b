"""Wires the cdr service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from cdr.servicer import CdrServiceServicer
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration

FULL_NAME = cdr_pb2.DESCRIPTOR.services_by_name["CdrService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    servicer = CdrServiceServicer()  # type: ignore[abstract]
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, cdr_pb2_grpc.add_CdrServiceServicer_to_server),
        ]
    )
