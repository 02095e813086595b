"""Final responses: the translation outcome -> response table (docs/sip.md), and responses rendered to bytes.

Every final non-2xx response carries `Reason: Q.850;cause=N;text="..."` (RFC 3326) so a switch can map it to an
announcement. Responses are rendered once per transaction and the same bytes are resent for a retransmission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from numprotect.services.sip.message import Request
from numprotect.services.sip.settings import SipSettings
from numprotect.translation.v1 import translation_pb2

ALLOW = "Allow: INVITE, ACK, CANCEL, OPTIONS\r\n"
SERVER = "Server: numprotect-sip\r\n"
_TAIL = SERVER + "Content-Length: 0\r\n\r\n"
# Translation failures the switch should retry elsewhere or later (503 + Retry-After).
_RETRYABLE = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "CANCELLED", "ABORTED", "INTERNAL"}
)


class Failure(Protocol):
    """translation_client.TranslateFailure: a gRPC status name and a message safe to log."""

    @property
    def status(self) -> str: ...

    @property
    def message(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """A final response: code, phrase, extra header lines (each ending CRLF), and the decision for spans and logs."""

    code: int
    phrase: str
    headers: str
    decision: str


def reason(cause: int, text: str) -> str:
    """The Reason header line of a Q.850 cause (none for cause 0)."""
    if not cause:
        return ""
    return f'Reason: Q.850;cause={cause};text="{text}"\r\n' if text else f"Reason: Q.850;cause={cause}\r\n"


def refusal(code: int, phrase: str, cause: int, text: str, decision: str) -> Outcome:
    return Outcome(code, phrase, reason(cause, text), decision)


def unavailable(settings: SipSettings, decision: str) -> Outcome:
    """503 + Retry-After: translation down or slow, the adapter overloaded or draining."""
    return Outcome(
        503,
        "Service Unavailable",
        f"Retry-After: {settings.retry_after}\r\n" + reason(41, "temporary failure"),
        decision,
    )


_REJECTIONS: dict[int, tuple[int, str, int, str]] = {
    translation_pb2.REJECT_REASON_NO_BINDING: (404, "Not Found", 1, "no binding"),
    translation_pb2.REJECT_REASON_DIRECTION_NOT_ALLOWED: (403, "Forbidden", 21, "direction not allowed"),
    translation_pb2.REJECT_REASON_CALLER_BLOCKED: (603, "Decline", 21, "caller blocked"),
    translation_pb2.REJECT_REASON_RATE_LIMITED: (486, "Busy Here", 17, "rate limited"),
    translation_pb2.REJECT_REASON_NUMBER_LOCKED: (480, "Temporarily Unavailable", 20, "number locked"),
}
_REJECT_OTHER = (403, "Forbidden", 21, "rejected")


class Renderer:
    """Renders the table's responses for one adapter's settings (egress host and number format)."""

    __slots__ = ("_e164", "_egress", "_settings")

    def __init__(self, settings: SipSettings) -> None:
        self._settings = settings
        self._egress = settings.egress
        self._e164 = settings.number_format == "e164"

    def number(self, national: str) -> str:
        """A number as the Contact/PAI user: national (13800138000, 0755..., 700...) or E.164 (+86 and the
        number without its trunk 0)."""
        if not self._e164:
            return national
        return "+86" + (national[1:] if national.startswith("0") else national)

    def outcome(self, result: translation_pb2.TranslateResponse | Failure, called_number: str) -> Outcome:
        """The final response for a translation's answer (or its failure)."""
        if not isinstance(result, translation_pb2.TranslateResponse):
            return self.failure(result.status)
        decision = result.decision
        if decision == translation_pb2.DECISION_CONNECT:
            virtual = self.number(result.display_number or called_number)
            headers = (
                f"Contact: <sip:{self.number(result.target_number)}@{self._egress};user=phone>\r\n"
                f"P-Asserted-Identity: <sip:{virtual}@{self._egress};user=phone>\r\n"
                f"X-Numprotect-Call-Ref: {result.call_ref}\r\n"
                f"X-Numprotect-Recording: {'on' if result.recording_enabled else 'off'}\r\n"
            )
            return Outcome(302, "Moved Temporarily", headers, "CONNECT")
        if decision == translation_pb2.DECISION_COLLECT_EXTENSION:
            return refusal(484, "Address Incomplete", 28, "extension digits required", "COLLECT_EXTENSION")
        code, phrase, cause, text = _REJECTIONS.get(result.reject_reason, _REJECT_OTHER)
        name = translation_pb2.RejectReason.Name(result.reject_reason) if result.reject_reason in _REJECTIONS else ""
        return refusal(code, phrase, cause, text, "REJECT_" + name.removeprefix("REJECT_REASON_") if name else "REJECT")

    def failure(self, status: str) -> Outcome:
        """Translation's refusal of the call itself, or no answer: the table's last rows."""
        if status == "INVALID_ARGUMENT":
            return refusal(404, "Not Found", 1, "number not valid", "INVALID_ARGUMENT")
        if status == "PERMISSION_DENIED":
            return refusal(403, "Forbidden", 21, "number not routed by this carrier", "PERMISSION_DENIED")
        if status == "NOT_FOUND":
            return refusal(404, "Not Found", 1, "no binding", "NOT_FOUND")
        return unavailable(self._settings, status if status in _RETRYABLE else "UNAVAILABLE")


def render(
    request: Request,
    code: int,
    phrase: str,
    headers: str,
    source: tuple[Any, ...],
    to_tag: str = "",
) -> bytes:
    """A response to `request`: its Via values (the top one with received/rport), From, To (with `to_tag` when
    the request's To has none), Call-ID and CSeq copied; then `headers`, Server and an empty body. The copied part
    is built once per request and source (an INVITE's 100 and final response share it)."""
    copied = request.copied
    if copied is None or copied[0] != source:
        copied = request.copied = (source, *_copied(request, source))
    _, before_to, to_value, taggable, after_to = copied
    if to_value is None:
        to_line = ""
    elif to_tag and taggable:
        to_line = f"To: {to_value};tag={to_tag}\r\n"
    else:
        to_line = f"To: {to_value}\r\n"
    return f"SIP/2.0 {code} {phrase}\r\n{before_to}{to_line}{after_to}{headers}{_TAIL}".encode()


def _copied(request: Request, source: tuple[Any, ...]) -> tuple[str, str | None, bool, str]:
    """What a response copies from `request`: the Via and From lines, To's value (None when absent) and whether it
    lacks a tag, the Call-ID and CSeq lines."""
    lines: list[str] = []
    for via in request.response_vias(source[0], source[1]):
        lines += ("Via: ", via, "\r\n")
    from_value = request.header("from")
    if from_value is not None:
        lines += ("From: ", from_value, "\r\n")
    to_value = request.header("to")
    taggable = to_value is not None and ";tag=" not in to_value.replace(" ", "").lower()
    after: list[str] = []
    if request.call_id:
        after += ("Call-ID: ", request.call_id, "\r\n")
    cseq = request.header("cseq")
    if cseq is not None:
        after += ("CSeq: ", cseq, "\r\n")
    return "".join(lines), to_value, taggable, "".join(after)
