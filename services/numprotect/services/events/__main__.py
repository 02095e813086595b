"""Runs the events service: python -m numprotect.services.events."""

from numprotect.core.server import run_service
from numprotect.services.events.app import build


def main() -> None:
    run_service("events", build)


if __name__ == "__main__":
    main()
