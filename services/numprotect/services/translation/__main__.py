"""Runs the translation service: python -m numprotect.services.translation.

NUMPROTECT_TRANSLATION_SERVER picks the server model: "sync" (default: grpcio's thread-pool server, faster
for unary Translate by measurement, see docs/translation.md) or "aio" (grpc.aio on uvloop).
"""

import os
import sys

from numprotect.core.server import run_service
from numprotect.core.server_sync import run_service_sync
from numprotect.core.settings import Env, SettingsError
from numprotect.services.translation.app import build, build_sync


def main() -> None:
    try:
        model = Env(os.environ).choice("NUMPROTECT_TRANSLATION_SERVER", "sync", ("sync", "aio"))
    except SettingsError as exc:
        print(f"numprotect-translation: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if model == "sync":
        run_service_sync("translation", build_sync)
    else:
        run_service("translation", build)


if __name__ == "__main__":
    main()
