"""The TranslationService servicer: business RPCs answer UNIMPLEMENTED until the translation issue lands."""

from __future__ import annotations

from numprotect.translation.v1 import translation_pb2_grpc


class TranslationServiceServicer(translation_pb2_grpc.TranslationServiceServicer):
    """Inherits UNIMPLEMENTED answers for every RPC from the generated base."""
