"""Numbers as translation receives them from carriers' switches: what it accepts and how it keys them."""

from __future__ import annotations

import re

from numprotect.core.errors import InvalidArgument
from numprotect.core.identifiers import CALL_ID
from numprotect.core.phone import MOBILE, InvalidNumber, normalize_calling, virtual_field

# Switches send up to 8 digits after the virtual number (allocation hands out 4; longer ones simply match nothing).
_EXTENSION = re.compile(r"\d{1,8}", re.ASCII)


def normalize_caller(raw: str) -> str:
    """The identity of the calling party, as the route table and blocklists key it (phone.normalize_calling).

    Chinese numbers in any carrier form (+86/0086/86 prefixes, separators, a trunk 0 before a mobile)
    become their national form, exactly as the binding service stores parties. Numbers that are not
    Chinese real numbers (foreign +CC..., short service numbers, other 700 numbers) are accepted as their
    digits (3 to 20, optional leading +): they can match no AXB party, but still reach AXN owners and
    allow-any-caller AXE bindings, and can be blocklisted. Empty or non-numeric input is INVALID_ARGUMENT.
    """
    if MOBILE.fullmatch(raw):  # the common case: no call, no allocation
        return raw
    try:
        return normalize_calling(raw)
    except InvalidNumber as exc:
        raise InvalidArgument.field("calling_number", str(exc)) from None


def validate_called(raw: str) -> str:
    return virtual_field("called_number", raw)


def validate_extension(raw: str) -> str:
    if raw and not _EXTENSION.fullmatch(raw):
        raise InvalidArgument.field("extension", "must be 1 to 8 ASCII digits when present")
    return raw


def validate_call_id(raw: str) -> str:
    """The network's call id, echoed in the answer and later the key of the call's CDR: the CDR's rule (CALL_ID),
    empty allowed here (a switch that sends none gets none back)."""
    return CALL_ID.check("call_id", raw, required=False)
