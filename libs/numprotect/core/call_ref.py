"""call_ref: the opaque reference Translate returns and CDRs carry back.

It names the binding, the virtual number and the moment of the call setup, and (when traced) the
trace and span of the translation, so the CDR service can enrich a record without a lookup and link
its ingestion span to the call setup. URL-safe base64 of `c1|binding_id|virtual_number|ms|trace|span`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

_VERSION = "c1"
_URL_SAFE = bytes.maketrans(b"+/", b"-_")


def encode_call_ref(binding_id: str, virtual_number: str, setup_ms: int, trace_id: int = 0, span_id: int = 0) -> str:
    """CallRef(...).encode() without building the frozen object first: Translate issues one per CONNECT."""
    trace = format(trace_id, "x") if trace_id else ""
    span = format(span_id, "x") if span_id else ""
    raw = f"{_VERSION}|{binding_id}|{virtual_number}|{setup_ms}|{trace}|{span}".encode()
    return binascii.b2a_base64(raw, newline=False).translate(_URL_SAFE).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class CallRef:
    binding_id: str
    virtual_number: str
    setup_ms: int
    trace_id: int = 0
    span_id: int = 0

    def encode(self) -> str:
        return encode_call_ref(self.binding_id, self.virtual_number, self.setup_ms, self.trace_id, self.span_id)

    @classmethod
    def decode(cls, text: str) -> CallRef:
        """Raises ValueError when `text` is not a call_ref this platform issued."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("call_ref is not valid base64") from None
        fields = raw.split("|")
        if len(fields) != 6 or fields[0] != _VERSION or not fields[3].isdigit():
            raise ValueError("call_ref was not issued by this platform")
        return cls(
            binding_id=fields[1],
            virtual_number=fields[2],
            setup_ms=int(fields[3]),
            trace_id=int(fields[4], 16) if fields[4] else 0,
            span_id=int(fields[5], 16) if fields[5] else 0,
        )
