"""Runs the translation service: python -m numprotect.services.translation (grpcio's thread-pool server)."""

from numprotect.core.server import run_sync_service
from numprotect.services.translation.app import build_sync


def main() -> None:
    run_sync_service("translation", build_sync)


if __name__ == "__main__":
    main()
