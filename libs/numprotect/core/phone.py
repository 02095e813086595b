"""Phone numbers: validation and normalisation of real party numbers, virtual 700 numbers and blocks.

Rules (docs/domain.md): mobile ^1[3-9]\\d{9}$, fixed line with area code ^0\\d{9,11}$, +86/0086/86 prefixes
accepted and removed; a real party is never a 700 number; virtual numbers ^700\\d{12}$; blocks ^700\\d{8}$.
Digits are ASCII 0-9 only, in every rule and every service: Python's \\d and str.isdigit also take full-width
and Arabic-Indic digits (U+FF11..., U+0661...), which one RPC would accept and store while another refused them.

A calling number (Translate, the blocklists, a CDR's calling_number: `normalize_calling`) is a party number when it
is Chinese, and otherwise kept as its digits: foreign and service numbers call 700 numbers too.
"""

from __future__ import annotations

import re

from numprotect.core.errors import InvalidArgument

# re.ASCII: \\d is 0-9 only (see the module's docstring).
MOBILE = re.compile(r"1[3-9]\d{9}", re.ASCII)
_FIXED = re.compile(r"0\d{9,11}", re.ASCII)
_VIRTUAL = re.compile(r"700\d{12}", re.ASCII)
_BLOCK = re.compile(r"700\d{8}", re.ASCII)
_CITY = re.compile(r"0\d{2,3}", re.ASCII)
_EXTENSION = re.compile(r"\d{1,4}", re.ASCII)
_DIGITS = re.compile(r"\d+", re.ASCII)
# A mobile number with a trunk 0 in front (some switches and forms write it): no area code starts 01[3-9].
_MOBILE_WITH_TRUNK = re.compile(r"01[3-9]\d{9}", re.ASCII)
# Calling numbers that are not Chinese real numbers (foreign, service numbers, other 700 numbers): their digits.
_OTHER_CALLER = re.compile(r"\+?\d{3,20}", re.ASCII)
# Longer input is refused before any work on it (the longest written form, "0086 (0755) 1234-5678", is ~25).
MAX_NUMBER_LENGTH = 64
# Separators people and systems put inside numbers.
SEPARATORS = str.maketrans("", "", " -()\u00a0\t")


class InvalidNumber(ValueError):
    """A number that breaks a rule; the message states the rule."""


def _strip_country_code(digits: str) -> str | None:
    """The national form of a number written with +86, 0086 or 86, or None if it has no country code."""
    for prefix in ("+86", "0086"):
        if digits.startswith(prefix):
            return _national(digits[len(prefix) :])
    if digits.startswith("+"):
        raise InvalidNumber("only Chinese numbers (+86) are supported")
    # A bare "86" prefix is ambiguous with nothing valid: no mobile or fixed line starts with 8.
    if digits.startswith("86") and len(digits) > 11:
        return _national(digits[2:])
    return None


def _national(rest: str) -> str:
    # After a country code the trunk 0 of a fixed line is dropped (+86 10 ...), but some write it anyway.
    if (rest.startswith("1") and len(rest) == 11) or rest.startswith("700"):
        return rest
    if rest.startswith("0"):
        return rest
    return "0" + rest


def _compact(raw: str) -> str:
    """`raw` without surrounding blanks and separators; InvalidNumber when empty or too long to be a number."""
    if len(raw) > MAX_NUMBER_LENGTH:
        raise InvalidNumber(f"must be at most {MAX_NUMBER_LENGTH} characters")
    digits = raw.strip().translate(SEPARATORS)
    if not digits:
        raise InvalidNumber("is required")
    return digits


def normalize_party(raw: str) -> str:
    """The canonical national form of a real party number, or InvalidNumber saying which rule it breaks."""
    digits = _compact(raw)
    national = _strip_country_code(digits)
    if national is None:
        national = digits
    if not _DIGITS.fullmatch(national):
        raise InvalidNumber("must contain only ASCII digits 0-9, optionally prefixed by +86, 0086 or 86")
    if _MOBILE_WITH_TRUNK.fullmatch(national):
        national = national[1:]
    if national.startswith("700"):
        raise InvalidNumber("must be a real number, not a 700 virtual number")
    if MOBILE.fullmatch(national) or _FIXED.fullmatch(national):
        return national
    if national.startswith("1"):
        raise InvalidNumber("mobile numbers are 11 digits starting 13-19 (^1[3-9]\\d{9}$)")
    if national.startswith("0"):
        raise InvalidNumber("fixed-line numbers are the area code with 0 then the number, 10-12 digits")
    raise InvalidNumber("must be a mobile (1[3-9] + 9 digits) or fixed-line (0 + area code + number) number")


def normalize_calling(raw: str) -> str:
    """The identity of a calling party, as route keys, blocklists and CDRs hold it, or InvalidNumber.

    A Chinese number in any written form becomes its national form (normalize_party); any other number (foreign
    +CC..., short service numbers, another 700 number) is kept as its digits, 3 to 20 with an optional leading +.
    Empty (withheld) or non-numeric input breaks the rule.
    """
    if MOBILE.fullmatch(raw):  # the common case, no allocation
        return raw
    digits = _compact(raw)
    try:
        return normalize_party(digits)
    except InvalidNumber:
        if _OTHER_CALLER.fullmatch(digits):
            return digits
    raise InvalidNumber("must be a phone number: ASCII digits with an optional leading + (3 to 20 digits)")


def is_party_number(value: str) -> bool:
    """True when value is already a normalised real party number (no prefix, no separators)."""
    return bool(MOBILE.fullmatch(value) or _FIXED.fullmatch(value))


def validate_virtual(raw: str) -> str:
    """A 15-digit 700 number, returned unchanged, or InvalidNumber."""
    if not raw:
        raise InvalidNumber("is required")
    if not _VIRTUAL.fullmatch(raw):
        raise InvalidNumber("must be a 15-digit 700 number (^700\\d{12}$)")
    return raw


def validate_block(raw: str) -> str:
    """An 11-digit 700 management block, returned unchanged, or InvalidNumber."""
    if not raw:
        raise InvalidNumber("is required")
    if not _BLOCK.fullmatch(raw):
        raise InvalidNumber("must be an 11-digit 700 management block (^700\\d{8}$)")
    return raw


def validate_city_code(raw: str) -> str:
    """A Chinese long-distance area code such as 010 or 0755."""
    if not _CITY.fullmatch(raw):
        raise InvalidNumber("must be a long-distance area code: 0 followed by 2 or 3 digits (e.g. 010, 0755)")
    return raw


def validate_extension(raw: str) -> str:
    if not _EXTENSION.fullmatch(raw):
        raise InvalidNumber("must be 1 to 4 digits")
    return raw


def mask(number: str) -> str:
    """Masks a phone number for logs and span attributes: 13812345678 -> 138****5678."""
    if len(number) >= 11:
        return number[:3] + "*" * (len(number) - 7) + number[-4:]
    if len(number) > 4:
        return "*" * (len(number) - 2) + number[-2:]
    return "*" * len(number)


def party_field(field: str, raw: str) -> str:
    """normalize_party that raises InvalidArgument naming the request field."""
    try:
        return normalize_party(raw)
    except InvalidNumber as exc:
        raise InvalidArgument.field(field, str(exc)) from None


def virtual_field(field: str, raw: str) -> str:
    """validate_virtual that raises InvalidArgument naming the request field."""
    try:
        return validate_virtual(raw)
    except InvalidNumber as exc:
        raise InvalidArgument.field(field, str(exc)) from None
