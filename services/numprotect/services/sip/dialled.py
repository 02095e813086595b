"""Who is called and who calls, from an INVITE: the Request-URI's 700 number (and extension digits) and the caller
from P-Asserted-Identity or From, with the refusals a switch gets before anything is translated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sipmessage import URI

from numprotect.core import phone
from numprotect.services.sip.message import MAX_GRAMMAR_CHARS, parse_address

SCHEMES = ("sip", "sips", "tel")
VIRTUAL_DIGITS = 15

MAX_EXTENSION_DIGITS = 4
# RFC 3966 visual separators (and the blanks phone.normalize_calling also takes).
_SEPARATORS = str.maketrans("", "", "-.()")
_COUNTRY_PREFIXES = ("+86", "0086", "86")
_ASCII_DIGITS = frozenset("0123456789")
_NUMBER_CHARS = frozenset("0123456789+-.()")
# What a URI user (sipmessage's grammar) may hold without escapes.
_URI_USER_CHARS = frozenset("0123456789+-.()abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_!~*'&=$,;?/")


@dataclass(frozen=True, slots=True)
class Dialled:
    """The 15-digit 700 number and the extension digits after it ("" or 1-4 digits)."""

    called_number: str
    extension: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A final response given without translating: code, reason phrase, Q.850 cause and its text."""

    code: int
    phrase: str
    cause: int
    text: str


UNSUPPORTED_SCHEME = Refusal(416, "Unsupported URI Scheme", 0, "")
BAD_REQUEST_URI = Refusal(400, "Bad Request-URI", 0, "")
NOT_A_700_NUMBER = Refusal(404, "Not Found", 1, "not a 700 number")
ADDRESS_INCOMPLETE = Refusal(484, "Address Incomplete", 28, "digits missing")
ANONYMOUS_CALLER = Refusal(433, "Anonymity Disallowed", 21, "caller number required")


def user_digits(user: str) -> str:
    """A URI user's number: parameters (`;npdi;rn=...`) and visual separators removed."""
    return user.partition(";")[0].translate(_SEPARATORS).strip()


def dialled(request_uri: str) -> Dialled | Refusal:
    """The dialled 700 number from a Request-URI (sip:, sips: or tel:), or the refusal.

    Written forms 700..., +86700..., 0086700..., 86700...; fewer than 15 digits is an incomplete address (484: the
    switch collects more digits, as for an AXE extension); 16-19 digits are the number and its extension.
    """
    scheme = request_uri.partition(":")[0].lower()
    if scheme not in SCHEMES:
        return UNSUPPORTED_SCHEME
    user = _number_user(request_uri)
    if user is None:
        uri = _parse_uri(request_uri)
        if uri is None:
            return BAD_REQUEST_URI
        user = uri.user or ""
    digits = user_digits(user)
    for prefix in _COUNTRY_PREFIXES:
        if digits.startswith(prefix):
            digits = digits[len(prefix) :]
            break
    if not digits.startswith("700") or not _ASCII_DIGITS.issuperset(digits):
        return NOT_A_700_NUMBER
    if len(digits) < VIRTUAL_DIGITS:
        return ADDRESS_INCOMPLETE
    if len(digits) > VIRTUAL_DIGITS + MAX_EXTENSION_DIGITS:
        return NOT_A_700_NUMBER
    return Dialled(digits[:VIRTUAL_DIGITS], digits[VIRTUAL_DIGITS:])


def calling(asserted: str | Sequence[str] | None, from_value: str | None) -> str | Refusal:
    """The caller's number, normalised as Translate does (phone.normalize_calling), from P-Asserted-Identity when
    it holds a readable address, else from From. P-Asserted-Identity may carry two identities (RFC 3325: a sip: and
    a tel: URI, in one header or two): the first that is a number counts, so an IMS caller asserted as
    `<sip:alice@domain>, <tel:+86...>` is the tel: number. Anonymous, withheld or no number at all: 433."""
    values = (asserted,) if isinstance(asserted, str) else (asserted or ())
    readable = False
    for value in values:
        for address in _addresses(value):
            raw = _first_user(address)
            if raw is None:
                continue
            readable = True
            number = _number(raw)
            if number is not None:
                return number
    if readable:
        return ANONYMOUS_CALLER
    raw = _first_user(from_value) if from_value else None
    number = _number(raw) if raw else None
    return ANONYMOUS_CALLER if number is None else number


def _number(raw: str) -> str | None:
    if raw.lower() in ("anonymous", "restricted", "unavailable"):
        return None
    try:
        return phone.normalize_calling(user_digits(raw))
    except phone.InvalidNumber:
        return None


def _addresses(value: str) -> list[str]:
    """The addresses of a header value that may list several (commas outside quotes and angle brackets)."""
    if "," not in value:
        return [value]
    addresses: list[str] = []
    start, quoted, bracketed, escaped = 0, False, False, False
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            bracketed = True
        elif char == ">":
            bracketed = False
        elif char == "," and not bracketed:
            addresses.append(value[start:index].strip())
            start = index + 1
    addresses.append(value[start:].strip())
    return [address for address in addresses if address]


def _first_user(value: str) -> str | None:
    """The URI user of an address (`<uri>;params`, `"name" <uri>` or a bare URI), or None when unreadable."""
    if value.startswith("<"):  # the common form, `<uri>;params`: only the URI needs reading (half the cost)
        close = value.find(">")
        if close < 0:
            return None
        user = _number_user(value[1:close])
        if user is not None:
            return user
        uri = _parse_uri(value[1:close])
        return uri.user if uri is not None else None
    address = parse_address(value.strip())
    if address is None:
        return None
    return address.uri.user


def _parse_uri(value: str) -> URI | None:
    if len(value) > MAX_GRAMMAR_CHARS:
        return None
    try:
        return URI.parse(value)
    except Exception:
        return None


def _number_user(uri: str) -> str | None:
    """The user of a sip:/sips:/tel: URI when it is a plain written number (digits, +, visual separators and
    user parameters), else None. Only the user decides anything here, so for that common case the full URI
    grammar (a quarter of an INVITE's handling cost) is not run; any other URI goes through sipmessage."""
    scheme, _, rest = uri.partition(":")
    if scheme == "tel":
        user = rest.partition(";")[0]
    elif scheme in ("sip", "sips") and "@" in rest:
        user = rest.partition("@")[0]
    else:
        return None
    number = user.partition(";")[0]
    if not number or not _NUMBER_CHARS.issuperset(number) or not _URI_USER_CHARS.issuperset(user):
        return None
    return user
