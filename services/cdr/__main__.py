"""Runs the cdr service: python -m cdr."""

from cdr.app import build
from numprotect_core.server import run_service

if __name__ == "__main__":
    run_service("cdr", build)
