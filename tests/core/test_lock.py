"""tools/check_lock.py: the hashed lock must hold every pin of the requirements files, at the same version."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _check_lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "tools" / "check_lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_repository_locks_match_their_requirements() -> None:
    check = _check_lock()
    assert check.problems(ROOT / "requirements-dev.txt", ROOT / "requirements.lock") == []
    assert check.problems(ROOT / "requirements.txt", ROOT / "requirements-runtime.lock") == []


def test_a_changed_pin_a_missing_package_and_a_missing_hash_are_reported(tmp_path: Path) -> None:
    check = _check_lock()
    (tmp_path / "base.txt").write_text("redis==8.1.0\n")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("-r base.txt\n# comment\nhiredis==3.5.0  # why\ngrpcio==1.85.3\n")
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "redis==8.0.0 \\\n    --hash=sha256:aa\nhiredis==3.5.0\nasync-timeout==5.0.1 \\\n    --hash=sha256:bb\n"
    )
    assert check.problems(requirements, lock) == [
        "grpcio==1.85.3 is not in requirements.lock",
        "redis: requirements.txt pins 8.1.0, requirements.lock has 8.0.0",
        "hiredis has no --hash in requirements.lock",
    ]
    lock.write_text(
        "redis==8.1.0 \\\n    --hash=sha256:aa\nhiredis==3.5.0 \\\n    --hash=sha256:cc\n"
        "grpcio==1.85.3 \\\n    --hash=sha256:dd\n"
    )
    assert check.problems(requirements, lock) == []
