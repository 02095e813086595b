"""Numbers as translation receives them from carriers' switches: what it accepts and how it keys them."""

from __future__ import annotations

import re

from numprotect.core.errors import InvalidArgument
from numprotect.core.phone import MOBILE, SEPARATORS, InvalidNumber, normalize_party, virtual_field

# Switches send up to 8 digits after the virtual number (allocation hands out 4; longer ones simply match nothing).
_EXTENSION = re.compile(r"\d{1,8}")
# A mobile number with a trunk 0 in front (some switches send it): no area code starts 01[3-9].
_MOBILE_WITH_TRUNK = re.compile(r"01[3-9]\d{9}")
# Callers we cannot normalise (foreign, service numbers, other 700 numbers): kept as their digits.
_OPAQUE = re.compile(r"\+?\d{3,20}")


def normalize_caller(raw: str) -> str:
    """The identity of the calling party, as the route table and blocklists key it.

    Chinese numbers in any carrier form (+86/0086/86 prefixes, separators, a trunk 0 before a mobile)
    become their national form, exactly as the binding service stores parties. Numbers that are not
    Chinese real numbers (foreign +CC..., short service numbers, other 700 numbers) are accepted as their
    digits (3 to 20, optional leading +): they can match no AXB party, but still reach AXN owners and
    allow-any-caller AXE bindings, and can be blocklisted. Empty or non-numeric input is INVALID_ARGUMENT.
    """
    if MOBILE.fullmatch(raw):  # the common case, no allocation
        return raw
    digits = raw.strip().translate(SEPARATORS)
    if not digits:
        raise InvalidArgument.field("calling_number", "is required")
    if _MOBILE_WITH_TRUNK.fullmatch(digits):
        return digits[1:]
    try:
        return normalize_party(digits)
    except InvalidNumber:
        if _OPAQUE.fullmatch(digits):
            return digits
    raise InvalidArgument.field(
        "calling_number", "must be a phone number: digits with an optional leading + (3 to 20 digits)"
    )


def validate_called(raw: str) -> str:
    return virtual_field("called_number", raw)


def validate_extension(raw: str) -> str:
    if raw and not _EXTENSION.fullmatch(raw):
        raise InvalidArgument.field("extension", "must be 1 to 8 digits when present")
    return raw
