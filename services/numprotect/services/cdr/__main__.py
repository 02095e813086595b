"""Runs the cdr service: python -m numprotect.services.cdr."""

from numprotect.core.server import run_service
from numprotect.services.cdr.app import build


def main() -> None:
    run_service("cdr", build)


if __name__ == "__main__":
    main()
