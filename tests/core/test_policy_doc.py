"""docs/security.md carries the policy table as the code has it."""

from __future__ import annotations

from pathlib import Path

from numprotect.core.identity.policy_doc import render

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_policy_table_is_the_one_in_force() -> None:
    document = (ROOT / "docs" / "security.md").read_text()
    assert render() in document, "regenerate with: python -m numprotect.core.identity.policy_doc"
