"""Runs the binding service: python -m binding."""

from binding.app import build
from numprotect_core.server import run_service

if __name__ == "__main__":
    run_service("binding", build)
