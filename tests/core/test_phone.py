"""Phone-number validation and normalisation (docs/domain.md rules)."""

from __future__ import annotations

import pytest

from numprotect.core.errors import InvalidArgument
from numprotect.core.phone import (
    MAX_NUMBER_LENGTH,
    InvalidNumber,
    mask,
    normalize_calling,
    normalize_party,
    party_field,
    validate_block,
    validate_city_code,
    validate_virtual,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13812345678", "13812345678"),
        ("19912345678", "19912345678"),
        ("+8613812345678", "13812345678"),
        ("008613812345678", "13812345678"),
        ("8613812345678", "13812345678"),
        ("+86 138 1234 5678", "13812345678"),
        ("138-1234-5678", "13812345678"),
        ("01012345678", "01012345678"),  # Beijing, 8-digit local number
        ("075512345678", "075512345678"),  # Shenzhen
        ("0371-1234567", "03711234567"),  # 7-digit local number
        ("+86 10 1234 5678", "01012345678"),  # trunk 0 dropped after the country code
        ("+86 010 1234 5678", "01012345678"),  # ... or kept
        ("0086 755 1234 5678", "075512345678"),
        ("861012345678", "01012345678"),
        ("(010) 1234-5678", "01012345678"),
        ("013812345678", "13812345678"),  # a trunk 0 before a mobile (no area code starts 01[3-9])
        ("+86 013812345678", "13812345678"),
    ],
)
def test_normalize_party_accepts_every_documented_format(raw: str, expected: str) -> None:
    assert normalize_party(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "is required"),
        ("12812345678", "mobile numbers are 11 digits starting 13-19"),
        ("1381234567", "mobile numbers are 11 digits starting 13-19"),
        ("138123456789", "mobile numbers are 11 digits starting 13-19"),
        ("010123", "fixed-line numbers"),
        ("0101234567890123", "fixed-line numbers"),
        ("700123456789012", "not a 700 virtual number"),
        ("+86700123456789012", "not a 700 virtual number"),
        ("+14155550100", "only Chinese numbers"),
        ("138abc45678", "only ASCII digits"),
        ("\uff11\uff13\uff18\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11", "only ASCII digits"),  # full-width
        ("\u0661\u0663\u0668\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661", "only ASCII digits"),  # Arabic-Indic
        ("138\x0012345678", "only ASCII digits"),
        ("138\n12345678", "only ASCII digits"),
        ("+", "only Chinese numbers"),
        ("   ", "is required"),
        ("1" * 65536, f"at most {MAX_NUMBER_LENGTH} characters"),
        ("23812345678", "must be a mobile"),
    ],
)
def test_normalize_party_rejects_with_the_rule_broken(raw: str, reason: str) -> None:
    with pytest.raises(InvalidNumber, match=reason):
        normalize_party(raw)


def test_virtual_numbers_are_15_digit_700_numbers() -> None:
    assert validate_virtual("700123456789012") == "700123456789012"
    for bad in ("70012345678901", "7001234567890123", "701123456789012", "+86700123456789012", ""):
        with pytest.raises(InvalidNumber):
            validate_virtual(bad)


def test_blocks_are_11_digit_700_prefixes() -> None:
    assert validate_block("70012345678") == "70012345678"
    for bad in ("7001234567", "700123456789", "13812345678", "70a12345678"):
        with pytest.raises(InvalidNumber, match="11-digit 700 management block"):
            validate_block(bad)


def test_city_codes() -> None:
    assert validate_city_code("010") == "010"
    assert validate_city_code("0755") == "0755"
    for bad in ("10", "01", "07555", "abc"):
        with pytest.raises(InvalidNumber):
            validate_city_code(bad)


def test_party_field_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        party_field("party_b", "700123456789012")
    assert info.value.violations[0].field == "party_b"
    assert "700" in info.value.violations[0].description


def test_mask_hides_the_middle_digits() -> None:
    assert mask("13812345678") == "138****5678"
    assert mask("700123456789012") == "700********9012"
    assert mask("01012345678") == "010****5678"
    assert "1234" not in mask("0371123456")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("13812345678", "13812345678"),
        ("+86 138-1234-5678", "13812345678"),
        ("013812345678", "13812345678"),
        ("+12025550123", "+12025550123"),  # foreign: kept as its digits
        ("+49 151 1234 5678", "+4915112345678"),
        ("95555", "95555"),  # a service number
        ("700100000000009", "700100000000009"),  # another 700 number calling
    ],
)
def test_calling_numbers_are_party_numbers_when_chinese_and_their_digits_otherwise(raw: str, expected: str) -> None:
    assert normalize_calling(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "  ",
        "+",
        "12",
        "anonymous",
        "\uff11\uff13\uff18\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff11",
        "\u0661\u0663\u0668\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661",
        "1380000\x070001",
        "1" * 21,
        "1" * 65536,
    ],
)
def test_calling_numbers_refuse_what_is_no_number_of_ascii_digits(raw: str) -> None:
    with pytest.raises(InvalidNumber):
        normalize_calling(raw)


def test_every_number_rule_takes_ascii_digits_only() -> None:
    full_width_virtual = "700" + "\uff11" * 12
    arabic_block = "700" + "\u0661" * 8
    with pytest.raises(InvalidNumber):
        validate_virtual(full_width_virtual)
    with pytest.raises(InvalidNumber):
        validate_block(arabic_block)
    with pytest.raises(InvalidNumber):
        validate_city_code("0\u0661\u0660")
