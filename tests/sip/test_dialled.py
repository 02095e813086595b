"""The dialled number (Request-URI user) and the caller (P-Asserted-Identity, else From) of an INVITE."""

from __future__ import annotations

import pytest

from numprotect.services.sip.dialled import (
    ADDRESS_INCOMPLETE,
    ANONYMOUS_CALLER,
    BAD_REQUEST_URI,
    NOT_A_700_NUMBER,
    UNSUPPORTED_SCHEME,
    Dialled,
    Refusal,
    calling,
    dialled,
)

X = "700100000000001"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"sip:{X}@10.0.0.1", Dialled(X, "")),
        (f"sips:{X}@10.0.0.1:5061;transport=tls", Dialled(X, "")),
        (f"sip:+86{X}@10.0.0.1;user=phone", Dialled(X, "")),
        (f"sip:86{X}@10.0.0.1", Dialled(X, "")),
        (f"sip:0086{X}@10.0.0.1", Dialled(X, "")),
        (f"tel:+86{X}", Dialled(X, "")),
        ("tel:+86-700-1000-0000-0001", Dialled(X, "")),
        (f"sip:{X};npdi;rn=123@10.0.0.1", Dialled(X, "")),
        (f"sip:{X}1234@10.0.0.1", Dialled(X, "1234")),
        (f"sip:{X}7@10.0.0.1", Dialled(X, "7")),
        ("sip:7001000@10.0.0.1", ADDRESS_INCOMPLETE),
        (f"sip:{X}12345@10.0.0.1", NOT_A_700_NUMBER),
        ("sip:13900000002@10.0.0.1", NOT_A_700_NUMBER),
        ("sip:7001000000000a1@10.0.0.1", NOT_A_700_NUMBER),
        ("sip:10.0.0.1", NOT_A_700_NUMBER),
        ("sip:\uff17\uff10\uff10100000000001@10.0.0.1", BAD_REQUEST_URI),
        ("mailto:x@example.com", UNSUPPORTED_SCHEME),
        ("urn:service:sos", UNSUPPORTED_SCHEME),
        ("sip:", BAD_REQUEST_URI),
    ],
)
def test_dialled_number_rules(uri: str, expected: Dialled | Refusal) -> None:
    assert dialled(uri) == expected


def test_refusal_codes_and_causes() -> None:
    assert (ADDRESS_INCOMPLETE.code, ADDRESS_INCOMPLETE.cause) == (484, 28)
    assert (NOT_A_700_NUMBER.code, NOT_A_700_NUMBER.cause, NOT_A_700_NUMBER.text) == (404, 1, "not a 700 number")
    assert UNSUPPORTED_SCHEME.code == 416
    assert (ANONYMOUS_CALLER.code, ANONYMOUS_CALLER.cause) == (433, 21)


@pytest.mark.parametrize(
    ("asserted", "from_value", "expected"),
    [
        (None, "<sip:13800000001@10.0.0.1>;tag=a", "13800000001"),
        ("<sip:+8613800000001@10.0.0.1;user=phone>", "<sip:anonymous@anonymous.invalid>;tag=a", "13800000001"),
        ('"Zhang, San" <sip:+86-138-0000-0001@h>, <tel:+8613900000002>', "<sip:x@h>;tag=a", "13800000001"),
        ("<tel:+86-10-1234-5678>", "<sip:x@h>;tag=a", "01012345678"),
        # RFC 3325: an IMS caller asserted by name (sip:) and number (tel:), in one header or in two
        ('"Li, Si" <sip:alice@ims.example>, <tel:+8613800000001>', "<sip:anonymous@h>;tag=a", "13800000001"),
        (["<sip:alice@ims.example>", "<tel:+8613800000001>"], "<sip:anonymous@h>;tag=a", "13800000001"),
        (["<sip:anonymous@anonymous.invalid>", "<sip:bob@h>"], "<sip:13800000001@h>;tag=a", ANONYMOUS_CALLER),
        ("<sip:13800000001;cpc=ordinary@h>", "<sip:x@h>;tag=a", "13800000001"),
        ("not an address", "sip:013800000001@h;tag=a", "13800000001"),
        (None, "<sip:+4420794600000@h>;tag=a", "+4420794600000"),
        (None, "<sip:anonymous@anonymous.invalid>;tag=a", ANONYMOUS_CALLER),
        ("<sip:anonymous@anonymous.invalid>", None, ANONYMOUS_CALLER),
        (None, "<sip:alice@example.com>;tag=a", ANONYMOUS_CALLER),
        (None, "<sip:example.com>;tag=a", ANONYMOUS_CALLER),
        (None, None, ANONYMOUS_CALLER),
    ],
)
def test_caller_from_asserted_identity_else_from(
    asserted: str | list[str] | None, from_value: str | None, expected: str | Refusal
) -> None:
    assert calling(asserted, from_value) == expected


def test_long_uris_are_refused_before_the_grammar_that_backtracks_on_them() -> None:
    """sipmessage's tel: pattern takes time quadratic in the length (a 16-KB tel: URI took 6 s): a URI or address
    too long for a number is refused without it."""
    long_tel = "tel:+" + "1-" * 8000 + "x"
    assert dialled(long_tel) == BAD_REQUEST_URI
    assert calling(f"<{long_tel}>", f"<{long_tel}>;tag=a") == ANONYMOUS_CALLER
    assert calling(f"<{long_tel}>", "<sip:13800000001@h>;tag=a") == "13800000001"
