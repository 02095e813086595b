"""Wires the translation service's dependencies and registers it with the shared bootstrap."""

from __future__ import annotations

from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from numprotect_core.server import Runtime, ServiceParts, ServiceRegistration
from translation.servicer import TranslationServiceServicer

FULL_NAME = translation_pb2.DESCRIPTOR.services_by_name["TranslationService"].full_name


async def build(runtime: Runtime) -> ServiceParts:
    servicer = TranslationServiceServicer()  # type: ignore[abstract]
    return ServiceParts(
        registrations=[
            ServiceRegistration(FULL_NAME, servicer, translation_pb2_grpc.add_TranslationServiceServicer_to_server),
        ]
    )
