"""Runs the SIP adapter: python -m numprotect.services.sip."""

from numprotect.core.server import run_service
from numprotect.services.sip.app import build


def main() -> None:
    run_service("sip", build)


if __name__ == "__main__":
    main()
