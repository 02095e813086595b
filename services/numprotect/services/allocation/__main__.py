"""Runs the allocation service: python -m numprotect.services.allocation."""

from numprotect.core.server import run_service
from numprotect.services.allocation.app import build


def main() -> None:
    run_service("allocation", build)


if __name__ == "__main__":
    main()
