"""Span attributes and links for servicers (they work whether tracing is on or off), phone numbers masked."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanContext, TraceFlags
from opentelemetry.util.types import AttributeValue

from numprotect.core.call_ref import CallRef
from numprotect.core.phone import mask

ATTRIBUTE_PREFIX = "numprotect."

# Phone numbers: mobile, fixed line, 700 virtual numbers and blocks, with or without +86, standing alone or inside a
# text, but not digits of a longer run (a timestamp, an id).
_NUMBER = re.compile(r"(?<![\d+])(?:\+?86|0086)?(?:1[3-9]\d{9}|0\d{9,11}|700\d{8}|700\d{12})(?!\d)")


def mask_numbers(text: str) -> str:
    """`text` with every phone number in it masked (138****5678)."""
    return _NUMBER.sub(_mask_match, text)


def _mask_match(match: re.Match[str]) -> str:
    return mask(match.group())


def _safe_value(value: AttributeValue) -> AttributeValue:
    # A safety net: a phone number in a value is masked even when the caller forgot to.
    if isinstance(value, str):
        return mask_numbers(value)
    if isinstance(value, Sequence) and value and isinstance(value[0], str):  # attribute sequences are homogeneous
        return tuple(mask_numbers(str(item)) for item in value)
    return value


def safe_attributes(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    """`attributes` with every phone number in a value masked: what an `attributes=` for the SDK goes through."""
    return {name: _safe_value(value) for name, value in attributes.items()}


def set_attributes(span: Span, attributes: Mapping[str, AttributeValue]) -> None:
    """Sets `attributes` (names as given: rpc.*, db.*) on `span` when it records, phone numbers masked."""
    if span.is_recording():
        span.set_attributes(safe_attributes(attributes))


def set_span_attributes(span: Span | None = None, /, **attributes: AttributeValue | None) -> None:
    """Sets `numprotect.<name>` attributes on `span` (default: the current span); None values are skipped.

    `set_span_attributes(tenant="t1", mode="AXB", decision="CONNECT", binding_id=bid)`. Does nothing when
    the span is not recording (tracing off or not sampled). A phone number in a value is masked.
    """
    target = span if span is not None else trace.get_current_span()
    if not target.is_recording():
        return
    # One set_attributes call: the SDK span takes its lock once, not once per attribute.
    target.set_attributes(
        {ATTRIBUTE_PREFIX + name: _safe_value(value) for name, value in attributes.items() if value is not None}
    )


def masked_number_attribute(name: str, number: str, span: Span | None = None) -> None:
    """Sets `numprotect.<name>` to the masked number (138****5678) on `span` (default: the current span)."""
    target = span if span is not None else trace.get_current_span()
    if target.is_recording() and number:
        target.set_attribute(ATTRIBUTE_PREFIX + name, mask(number))


def link_from_call_ref(call_ref: CallRef | str, attributes: Mapping[str, AttributeValue] | None = None) -> Link | None:
    """A span link to the translation span a call_ref names, or None (untraced call, or not our call_ref).

    The link carries `numprotect.link=call_setup` and `attributes` (phone numbers masked).
    """
    if isinstance(call_ref, str):
        if not call_ref:
            return None
        try:
            call_ref = CallRef.decode(call_ref)
        except ValueError:
            return None
    if not call_ref.trace_id or not call_ref.span_id:
        return None
    context = SpanContext(
        trace_id=call_ref.trace_id, span_id=call_ref.span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    if not context.is_valid:
        return None
    return Link(context, safe_attributes({ATTRIBUTE_PREFIX + "link": "call_setup", **(attributes or {})}))
