"""Runs the binding service: python -m numprotect.services.binding."""

from numprotect.core.server import run_service
from numprotect.services.binding.app import build


def main() -> None:
    run_service("binding", build)


if __name__ == "__main__":
    main()
