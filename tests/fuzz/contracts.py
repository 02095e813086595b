"""Every RPC of every service, read from the generated descriptors, and how the fuzzer calls it and judges the answer.

A call passes when it ends with a status a caller can act on: never INTERNAL or UNKNOWN (nor the codes that mean
the server broke or hung: DATA_LOSS, UNIMPLEMENTED, UNAVAILABLE with Redis up, DEADLINE_EXCEEDED, CANCELLED), and
every INVALID_ARGUMENT carries a google.rpc.BadRequest whose violations name fields of the request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2

from numprotect.admin.v1 import admin_pb2
from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2
from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.identity.policy import POLICY
from numprotect.core.identity.principal import Role
from numprotect.events.v1 import events_pb2
from numprotect.translation.v1 import translation_pb2
from support.rpc import status_fields, violated_fields

PROTO_MODULES: tuple[ModuleType, ...] = (admin_pb2, allocation_pb2, binding_pb2, translation_pb2, cdr_pb2, events_pb2)
# Which process serves each service (AdminService lives in allocation's process).
SERVED_BY = {
    "numprotect.admin.v1.AdminService": "allocation",
    "numprotect.allocation.v1.AllocationService": "allocation",
    "numprotect.binding.v1.BindingService": "binding",
    "numprotect.translation.v1.TranslationService": "translation",
    "numprotect.cdr.v1.CdrService": "cdr",
    "numprotect.events.v1.EventService": "events",
}
FORBIDDEN = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
DEADLINE_SECONDS = 15.0
# A WatchCdrs stream still open after this long (plus the time to send its request at 5 MB/s) was accepted: the
# fuzzer cancels it.
WATCH_SETTLE_SECONDS = 0.15
SEND_BYTES_PER_SECOND = 5e6
_INDEX = re.compile(r"\[[^\]]*\]")


@dataclass(frozen=True)
class Rpc:
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name}"

    @property
    def process(self) -> str:
        return SERVED_BY[self.method.containing_service.full_name]

    @property
    def input(self) -> Descriptor:
        return self.method.input_type

    @property
    def roles(self) -> list[Role]:
        """The roles the policy lets call it (for SERVICE: only when binding's key is allowed)."""
        policy = POLICY[self.path]
        return [role for role in Role if policy.allows(role, "binding")]

    @property
    def kind(self) -> str:
        client, server = self.method.client_streaming, self.method.server_streaming
        return {(False, False): "unary", (True, False): "client", (False, True): "server", (True, True): "bidi"}[
            (client, server)
        ]


def all_rpcs() -> list[Rpc]:
    return [
        Rpc(method)
        for module in PROTO_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


@dataclass
class Answer:
    """How a call ended: its status, message and, for INVALID_ARGUMENT, the fields its BadRequest names; the
    errors a stream reported in its messages ("<STATUS>: <message>")."""

    code: grpc.StatusCode
    details: str = ""
    violated: Sequence[str] = ()
    stream_errors: Sequence[str] = ()
    rejected_fields: Sequence[str] = ()
    # A batch RPC's failed items (allocation's AllocateNumbers...): each judged as its unary call's answer.
    item_errors: Sequence[Answer] = ()


def call(channel: grpc.Channel, rpc: Rpc, request: Any) -> Answer:
    """Calls `rpc` with `request`: a message or serialized bytes, or a list of those for a client stream."""
    output = GetMessageClass(rpc.method.output_type)
    serializer, deserializer = _serialize, output.FromString
    try:
        if rpc.kind == "unary":
            unary = channel.unary_unary(rpc.path, request_serializer=serializer, response_deserializer=deserializer)
            return _answer_of(unary(request, timeout=DEADLINE_SECONDS))
        if rpc.kind == "client":
            gather = channel.stream_unary(rpc.path, request_serializer=serializer, response_deserializer=deserializer)
            return _answer_of(gather(iter(_messages(request)), timeout=DEADLINE_SECONDS))
        if rpc.kind == "server":
            return _watch(channel, rpc, request)
        chat = channel.stream_stream(rpc.path, request_serializer=serializer, response_deserializer=deserializer)
        replies = list(chat(iter(_messages(request)), timeout=DEADLINE_SECONDS))
        return Answer(grpc.StatusCode.OK, stream_errors=[e for r in replies for e in _stream_errors(r)])
    except grpc.RpcError as exc:
        return _failure(exc)


def _watch(channel: grpc.Channel, rpc: Rpc, request: Any) -> Answer:
    """A server stream: its status if it ends at once; a stream still open after a moment was accepted."""
    output = GetMessageClass(rpc.method.output_type)
    watch = channel.unary_stream(rpc.path, request_serializer=_serialize, response_deserializer=output.FromString)
    stream: Any = watch(request, timeout=DEADLINE_SECONDS)
    settle = WATCH_SETTLE_SECONDS + len(_serialize(request)) / SEND_BYTES_PER_SECOND
    try:
        error = stream.exception(timeout=settle)
    except grpc.FutureTimeoutError:
        stream.cancel()
        return Answer(grpc.StatusCode.OK, details="open")
    if error is None:
        return Answer(grpc.StatusCode.OK)
    return _failure(error)


def _serialize(message: Message | bytes) -> bytes:
    """A message's bytes; bytes (a request built by hand) as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _messages(request: Any) -> list[Any]:
    return list(request) if isinstance(request, list | tuple) else [request]


def _answer_of(reply: Message) -> Answer:
    rejected = getattr(reply, "rejected", ())
    items = [_item_failure(r.error) for r in getattr(reply, "results", ()) if r.WhichOneof("result") == "error"]
    return Answer(grpc.StatusCode.OK, rejected_fields=[r.field for r in rejected], item_errors=items)


def _item_failure(status: status_pb2.Status) -> Answer:
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return Answer(code, status.message, status_fields(status))


def _stream_errors(reply: Any) -> Iterator[str]:
    if reply.error:
        yield reply.error
    for inner in reply.responses:
        yield from _stream_errors(inner)


def _failure(exc: Any) -> Answer:
    code = exc.code()
    violated: list[str] = []
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        try:
            violated = violated_fields(exc)
        except AssertionError:  # no google.rpc.Status at all
            violated = []
    return Answer(code, exc.details() or "", violated)


def names_a_field(descriptor: Descriptor, path: str) -> bool:
    """Whether `path` ("binding.party_b", "records[3].call_id", "parties[0]") names a field of `descriptor`."""
    current: Descriptor | None = descriptor
    for part in _INDEX.sub("", path).split("."):
        if current is None or part not in current.fields_by_name:
            return False
        current = current.fields_by_name[part].message_type
    return True


def problems(rpc: Rpc, answer: Answer) -> list[str]:
    """What is wrong with an answer (empty when it is one a caller can act on)."""
    found = _status_problems(rpc.input, answer, "request" if rpc.kind == "bidi" else None)
    items = rpc.input.fields_by_name.get("requests")
    if answer.item_errors and items is not None and items.message_type is not None:
        for item in answer.item_errors:  # each as the answer of the unary call of the item's own type
            found.extend(f"item: {problem}" for problem in _status_problems(items.message_type, item, None))
    for error in answer.stream_errors:
        if error.startswith(("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS")):
            found.append(f"stream message error {error[:300]}")
    record = rpc.input.fields_by_name.get("records") or rpc.input.fields_by_name.get("record")
    if record is not None and record.message_type is not None:
        for name in answer.rejected_fields:
            if not names_a_field(record.message_type, name):
                found.append(f"rejected record names no field of {record.message_type.name}: {name!r}")
    return found


def _status_problems(input_type: Descriptor, answer: Answer, inner: str | None) -> list[str]:
    """What is wrong with a status: a forbidden code, an INVALID_ARGUMENT naming no field of `input_type` (or of
    its field `inner`'s message, a stream's wrapped request)."""
    found: list[str] = []
    if answer.code in FORBIDDEN:
        found.append(f"answered {answer.code.name}: {answer.details[:300]}")
    if answer.code == grpc.StatusCode.INVALID_ARGUMENT:
        if not answer.violated:
            found.append(f"INVALID_ARGUMENT without a BadRequest field violation: {answer.details[:300]}")
        message = input_type.fields_by_name[inner].message_type if inner else input_type
        assert message is not None
        unknown = [f for f in answer.violated if not names_a_field(input_type, f) and not names_a_field(message, f)]
        if unknown:
            found.append(f"INVALID_ARGUMENT names no field of {input_type.name}: {unknown} ({answer.details[:200]})")
    return found


def shown(request: Message | Sequence[Message], limit: int = 1500) -> str:
    """A request as text for a failure message, long strings cut."""
    text = "\n---\n".join(
        repr(m[:100]) if isinstance(m, bytes) else text_format.MessageToString(m, as_utf8=True)
        for m in _messages(request)
    )
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
