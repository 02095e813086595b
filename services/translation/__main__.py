"""Runs the translation service: python -m translation."""

from numprotect_core.server import run_service
from translation.app import build

if __name__ == "__main__":
    run_service("translation", build)
