"""What the adapter logs of an unexpected exception: its type and where it was raised, never its text.

An exception raised while handling a SIP message can carry a header value (a phone number, unmasked) in its
message or in a traceback's locals-derived text; the type and the raising frame are enough to find the bug.
"""

from __future__ import annotations

import traceback


def failure_summary(exc: BaseException) -> dict[str, str]:
    """`extra` for a log line: the exception's type and its innermost frame (file:line function)."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else ""
    return {"error": type(exc).__name__, "at": at}
