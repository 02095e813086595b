"""Times given on the command line: RFC 3339 ("2026-11-30T21:00:00Z"), or "now"."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from numprotect.cli.failures import EXIT_USAGE, CliError


def timestamp(text: str, option: str) -> timestamp_pb2.Timestamp:
    moment = timestamp_pb2.Timestamp()
    if text == "now":
        moment.GetCurrentTime()
        return moment
    try:
        moment.FromJsonString(text)
    except ValueError as exc:
        raise CliError(f"{option}: {text!r} is not an RFC 3339 time like 2026-11-30T21:00:00Z", EXIT_USAGE) from exc
    return moment
