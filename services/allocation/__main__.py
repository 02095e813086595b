"""Runs the allocation service: python -m allocation."""

from allocation.app import build
from numprotect_core.server import run_service

if __name__ == "__main__":
    run_service("allocation", build)
