"""The identifier rules: what each accepts, and a refusal names the field and states the rule."""

from __future__ import annotations

import pytest

from numprotect.core.errors import InvalidArgument
from numprotect.core.identifiers import BINDING_ID, CALL_ID, OUT_ORDER_ID, TENANT_ID, IdentifierRule


@pytest.mark.parametrize("good", ["t1", "T", "shop-7.cn_east", "a" * 64, "0abc"])
def test_tenant_id_accepts_hash_tag_safe_ids(good: str) -> None:
    assert TENANT_ID.check("tenant_id", good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "a" * 65,
        "-t1",  # must start alphanumeric
        ".t1",
        "t:1",  # translation's old rule took colons; they would end a {t:<tenant>} hash tag's meaning
        "a{b}",  # braces would change the Redis Cluster slot
        "t 1",
        "租户",
    ],
)
def test_tenant_id_refuses_and_states_the_rule(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        TENANT_ID.check("binding.tenant_id", bad)
    [violation] = caught.value.violations
    assert violation.field == "binding.tenant_id"
    assert violation.description == "must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric"


def test_empty_is_required_unless_the_field_is_optional() -> None:
    with pytest.raises(InvalidArgument) as caught:
        TENANT_ID.check("tenant_id", "")
    assert [(v.field, v.description) for v in caught.value.violations] == [("tenant_id", "is required")]
    assert TENANT_ID.check("tenant_id", "", required=False) == ""
    assert TENANT_ID.violation("tenant_id", "", required=False) is None


def test_violation_collects_without_raising() -> None:
    found = [
        rule.violation(field, raw)
        for rule, field, raw in ((TENANT_ID, "tenant_id", "x{"), (OUT_ORDER_ID, "out_order_id", "ok:1"))
    ]
    assert [(v.field if v else None) for v in found] == ["tenant_id", None]


@pytest.mark.parametrize(
    ("rule", "good", "bad"),
    [
        (OUT_ORDER_ID, ["o1", "order:2026-01.x_y", "A" * 128], ["", ":o", "A" * 129, "o 1", "o{1}"]),
        (
            BINDING_ID,
            ["b" + "0" * 22, "b0123456789abcdef012345"],
            ["b1", "B" + "0" * 22, "b" + "0" * 23, "b" + "g" * 22],
        ),
        (CALL_ID, ["c1", "x" * 128, "!~abc"], ["", "x" * 129, "sp ace", "tab\t", "é"]),
    ],
)
def test_each_rule_matches_whole_values_only(rule: IdentifierRule, good: list[str], bad: list[str]) -> None:
    assert [g for g in good if not rule.matches(g)] == []
    assert [b for b in bad if rule.matches(b)] == []
    assert [b for b in bad if b and rule.violation("f", b) is None] == []


def test_call_id_rule_states_length_and_alphabet() -> None:
    with pytest.raises(InvalidArgument) as caught:
        CALL_ID.check("call_id", "x" * 129)
    assert "at most 128" in caught.value.message and "visible ASCII" in caught.value.message
