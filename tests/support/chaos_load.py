"""A steady mixed load against a ChaosStack, a recorder of every answer, and a verifier of acknowledged writes.

The load (asyncio clients in the test process, TLS, API keys as call metadata):
- binding writers: CreateBinding (a new out_order_id each), UpdateBinding (recording, restriction, party B or
  expiry), DeleteBinding, each on the writer's own bindings; a write that did not answer OK is retried with the
  same request (the same out_order_id for a create) until it does, as a careful client would, so the state it
  leaves is known;
- translators: unary Translate from a binding's party A to its number; TranslateStream, one message in flight;
- a CDR ingester (IngestCdrs, batches of 5 for known bindings, retried until acknowledged) and a WatchCdrs
  watcher that resumes from its last cursor after an error.

Every answer is recorded (RPC, status code, latency); every acknowledged write is kept in a ledger. Afterwards
`verify` reads each one back through the services (GetBinding, Translate, ListCdrs) and reports what was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from numprotect.binding.v1 import binding_pb2, binding_pb2_grpc
from numprotect.cdr.v1 import cdr_pb2, cdr_pb2_grpc
from numprotect.common.v1 import common_pb2
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.chaos_stack import (
    CALL_DEADLINE_SECONDS,
    CARRIER,
    CITY,
    DEADLINE_MARGIN_SECONDS,
    TENANT,
    ChaosStack,
)
from support.tls import client_credentials

Code = grpc.StatusCode
# Answers a client may get under a fault: retry later. Anything else on this (valid) load is a defect.
RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"}
# Never acceptable: the service failed in a way it did not expect, or dropped the call.
FORBIDDEN = {"INTERNAL", "UNKNOWN", "CANCELLED", "DATA_LOSS"}
STALLED = "STALLED"  # a stream message not answered within the deadline (and margin)
# What grpc.aio's client reports, not the server, when a stream's write fails because the transport died under it:
# `_write` catches Core's failed send batch and sets INTERNAL with this detail itself (grpc/aio/_call.py `_write`
# -> `set_internal_error`, grpc/_cython/_cygrpc/aio/call.pyx.pxi), before the peer's real status is read. kill -9
# of a bidi echo server mid-stream (8 streams x 30 kills) gave it on 109 of 240 streams, UNAVAILABLE "Stream
# removed (...)" on the rest (docs/reliability.md "Service kill").
CORE_SEND_FAILED = "Internal error from Core"
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
RESTRICTIONS = (
    common_pb2.CALL_RESTRICTION_NONE,
    common_pb2.CALL_RESTRICTION_A_TO_B_ONLY,
    common_pb2.CALL_RESTRICTION_B_TO_A_ONLY,
)


@dataclass(frozen=True)
class Answer:
    rpc: str
    code: str  # a grpc status code's name, or STALLED
    start: float  # time.monotonic()
    end: float
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class ExpectedBinding:
    """What the service acknowledged last about one binding (None: a write to it never got an answer we trust)."""

    binding_id: str
    out_order_id: str
    party_a: str
    party_b: str
    virtual_number: str
    call_restriction: int
    recording_enabled: bool
    expire_ms: int
    deleted: bool = False
    certain: bool = True


@dataclass
class Ledger:
    bindings: dict[str, ExpectedBinding] = field(default_factory=dict)
    orders: dict[str, str] = field(default_factory=dict)  # out_order_id -> binding_id acknowledged
    order_conflicts: list[str] = field(default_factory=list)  # one order acknowledged with two binding ids
    cdrs: dict[str, str] = field(default_factory=dict)  # call_id -> binding_id, acknowledged
    cdrs_rejected: list[str] = field(default_factory=list)
    writes_acknowledged: Counter[str] = field(default_factory=Counter)
    watched: set[str] = field(default_factory=set)  # call_ids WatchCdrs delivered


@dataclass
class Recorder:
    answers: list[Answer] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic()
        return self.marks[name]

    def add(self, rpc: str, code: str, start: float, detail: str = "") -> Answer:
        answer = Answer(rpc, code, start, time.monotonic(), detail)
        self.answers.append(answer)
        return answer

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for a in self.answers if a.end >= start and a.start <= end]


def code_name(error: grpc.aio.AioRpcError) -> str:
    return str(error.code().name)


class Numbers:
    """Unique, valid mobile numbers (138... for party A, 139... for party B) for one run."""

    def __init__(self, seed: int) -> None:
        self._next = itertools.count(seed * 1_000_000)

    def party(self, prefix: str) -> str:
        return f"{prefix}{next(self._next) % 100_000_000:08d}"


class LoadDriver:
    """Runs the mixed load against `stack` until `stop()`; `profile_pause` is each worker's pause between calls."""

    def __init__(
        self,
        stack: ChaosStack,
        *,
        writers: int = 3,
        translators: int = 2,
        streams: int = 1,
        ingesters: int = 1,
        watchers: int = 1,
        readers: int = 1,
        pause: float = 0.03,
        seed: int = 1,
    ) -> None:
        self.stack = stack
        self.recorder = Recorder()
        self.ledger = Ledger()
        self.pause = pause
        self.random = random.Random(seed)
        self.numbers = Numbers(seed)
        self._ids = itertools.count(1)
        self._run = f"{seed}-{time.time_ns() % 10**9}"
        self._plan = {
            "writer": writers,
            "translator": translators,
            "stream": streams,
            "ingester": ingesters,
            "reader": readers,
            "watcher": watchers,
        }
        self._stopping = asyncio.Event()
        self._drain_deadline = float("inf")
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: dict[str, grpc.aio.Channel] = {}

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            # A client that tries to reconnect within 0.1-1 s (grpc's default backoff grows to 120 s), so the
            # recovery time measured is the service's, not the client library's.
            self._channels[service] = grpc.aio.secure_channel(
                self.stack.address(service), client_credentials(), options=RECONNECT_OPTIONS
            )
        return self._channels[service]

    def metadata(self, principal: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.stack.tokens[principal]}")]

    @property
    def binding(self) -> Any:
        return binding_pb2_grpc.BindingServiceStub(self.channel("binding"))

    @property
    def translation(self) -> Any:
        return translation_pb2_grpc.TranslationServiceStub(self.channel("translation"))

    @property
    def cdr(self) -> Any:
        return cdr_pb2_grpc.CdrServiceStub(self.channel("cdr"))

    async def call(self, rpc: str, invoke: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        """One unary call with the load's deadline, recorded; returns (code name, reply or None)."""
        start = time.monotonic()
        try:
            reply = await invoke()
        except grpc.aio.AioRpcError as error:
            self.recorder.add(rpc, code_name(error), start, error.details() or "")
            return code_name(error), None
        self.recorder.add(rpc, "OK", start)
        return "OK", reply

    async def until_acknowledged(self, rpc: str, invoke: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
        """Repeats a write until it answers OK or a final answer; gives up (returning the last code) only past the
        drain deadline after stop()."""
        while True:
            code, reply = await self.call(rpc, invoke)
            if code == "OK" or code not in RETRYABLE | FORBIDDEN | {"DEADLINE_EXCEEDED"}:
                return code, reply
            if time.monotonic() > self._drain_deadline:
                return code, None
            await asyncio.sleep(0.1 + self.random.random() * 0.1)

    # -- workers ----------------------------------------------------------------------------------------------------
    async def _writer(self, index: int) -> None:
        mine: list[str] = []
        while not self._stopping.is_set():
            live = [b for b in mine if not self.ledger.bindings[b].deleted]
            roll = self.random.random()
            if roll < 0.5 or len(live) < 3:
                created = await self._create(index)
                if created is not None:
                    mine.append(created)
            elif roll < 0.85:
                await self._update(self.random.choice(live))
            else:
                await self._delete(self.random.choice(live))
            await asyncio.sleep(self.pause)

    async def _create(self, index: int) -> str | None:
        order = f"o-{self._run}-{index}-{next(self._ids)}"
        request = binding_pb2.CreateBindingRequest(
            tenant_id=TENANT,
            out_order_id=order,
            mode=common_pb2.BINDING_MODE_AXB,
            party_a=self.numbers.party("138"),
            party_b=self.numbers.party("139"),
            ttl=duration_pb2.Duration(seconds=3600),
            city_code=CITY,
            user_consent=True,
        )
        attempts = 0

        async def invoke() -> Any:
            nonlocal attempts
            attempts += 1
            return await self.binding.CreateBinding(
                request, metadata=self.metadata("tenant"), timeout=CALL_DEADLINE_SECONDS
            )

        code, reply = await self.until_acknowledged("CreateBinding", invoke)
        if code != "OK":
            return None
        created = reply.binding
        known = self.ledger.orders.setdefault(order, created.binding_id)
        if known != created.binding_id:
            self.ledger.order_conflicts.append(f"{order}: {known} then {created.binding_id}")
        self.ledger.bindings[created.binding_id] = ExpectedBinding(
            binding_id=created.binding_id,
            out_order_id=order,
            party_a=request.party_a,
            party_b=request.party_b,
            virtual_number=created.virtual_number,
            call_restriction=created.call_restriction,
            recording_enabled=created.recording_enabled,
            expire_ms=created.expire_time.ToMilliseconds(),
        )
        self.ledger.writes_acknowledged["CreateBinding"] += 1
        return str(created.binding_id)

    async def _update(self, binding_id: str) -> None:
        expected = self.ledger.bindings[binding_id]
        change = binding_pb2.Binding(binding_id=binding_id, tenant_id=TENANT)
        kind = self.random.choice(("recording_enabled", "call_restriction", "party_b", "expire_time"))
        if kind == "recording_enabled":
            change.recording_enabled = not expected.recording_enabled
        elif kind == "call_restriction":
            change.call_restriction = self.random.choice([r for r in RESTRICTIONS if r != expected.call_restriction])
        elif kind == "party_b":
            change.party_b = self.numbers.party("139")
        else:
            change.expire_time.FromMilliseconds(int(time.time() * 1000) + 7_200_000 + self.random.randint(0, 10**6))
        request = binding_pb2.UpdateBindingRequest(binding=change, update_mask=field_mask_pb2.FieldMask(paths=[kind]))
        code, reply = await self.until_acknowledged(
            "UpdateBinding",
            lambda: self.binding.UpdateBinding(
                request, metadata=self.metadata("tenant"), timeout=CALL_DEADLINE_SECONDS
            ),
        )
        if code != "OK":
            # Not acknowledged: the change may or may not be in place.
            expected.certain = False
            return
        got = reply.binding
        expected.party_b = got.party_b
        expected.call_restriction = got.call_restriction
        expected.recording_enabled = got.recording_enabled
        expected.expire_ms = got.expire_time.ToMilliseconds()
        if getattr(got, kind) != getattr(change, kind):
            self.recorder.add("UpdateBinding", "WRONG_REPLY", time.monotonic(), f"{kind} not applied on {binding_id}")
        self.ledger.writes_acknowledged["UpdateBinding"] += 1

    async def _delete(self, binding_id: str) -> None:
        expected = self.ledger.bindings[binding_id]
        request = binding_pb2.DeleteBindingRequest(binding_id=binding_id, tenant_id=TENANT)
        code, _ = await self.until_acknowledged(
            "DeleteBinding",
            lambda: self.binding.DeleteBinding(
                request, metadata=self.metadata("tenant"), timeout=CALL_DEADLINE_SECONDS
            ),
        )
        if code != "OK":
            expected.certain = False
            expected.deleted = True  # no longer used by the load either way
            return
        expected.deleted = True
        self.ledger.writes_acknowledged["DeleteBinding"] += 1

    def _some_binding(self) -> ExpectedBinding | None:
        live = [b for b in self.ledger.bindings.values() if not b.deleted]
        return self.random.choice(live) if live else None

    def _translate_request(self) -> translation_pb2.TranslateRequest | None:
        target = self._some_binding()
        if target is None:
            return None
        return translation_pb2.TranslateRequest(
            calling_number=target.party_a,
            called_number=target.virtual_number,
            call_id=f"t-{self._run}-{next(self._ids)}",
        )

    async def _translator(self, index: int) -> None:
        while not self._stopping.is_set():
            request = self._translate_request()
            if request is not None:
                await self.call(
                    "Translate",
                    lambda request=request: self.translation.Translate(  # type: ignore[misc]
                        request, metadata=self.metadata("carrier"), timeout=CALL_DEADLINE_SECONDS
                    ),
                )
            await asyncio.sleep(self.pause)

    async def _stream(self, index: int) -> None:
        """TranslateStream with one message in flight; a stream that ends is recorded and opened again."""
        while not self._stopping.is_set():
            # An error ending the stream is timed from the message in flight (or the opening), not the stream's age.
            start = opened = time.monotonic()
            call = self.translation.TranslateStream(metadata=self.metadata("carrier"))
            try:
                while not self._stopping.is_set():
                    request = self._translate_request()
                    if request is None:
                        await asyncio.sleep(self.pause)
                        continue
                    start = time.monotonic()
                    try:
                        await call.write(translation_pb2.TranslateStreamRequest(request=request))
                    except asyncio.InvalidStateError:  # the server ended the stream: its status says how
                        code = (await call.code()).name
                        self.recorder.add("TranslateStream", str(code), start, await call.details() or "")
                        break
                    try:
                        reply = await asyncio.wait_for(call.read(), CALL_DEADLINE_SECONDS + DEADLINE_MARGIN_SECONDS)
                    except TimeoutError:
                        self.recorder.add("TranslateStream", STALLED, start, "no answer to a message")
                        break
                    if reply is grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc's stubs lack the sentinel
                        self.recorder.add("TranslateStream", "ENDED", start, "the server ended the stream")
                        break
                    code = reply.error.split(":", 1)[0] if reply.error else "OK"
                    self.recorder.add("TranslateStream", code, start, reply.error)
                    await asyncio.sleep(self.pause)
            except grpc.aio.AioRpcError as error:
                code, detail = code_name(error), error.details() or ""
                if self._cut_by_kill(code, detail, opened):
                    code, detail = "UNAVAILABLE", f"transport cut by the translation process's kill -9 ({detail})"
                self.recorder.add("TranslateStream", code, start, detail)
            finally:
                call.cancel()
            await asyncio.sleep(0.1)

    def _cut_by_kill(self, code: str, detail: str, opened: float) -> bool:
        """A stream's INTERNAL that grpc's client made up for a transport cut (CORE_SEND_FAILED), on a stream whose
        translation process was killed while it was open: a transport failure, UNAVAILABLE, like the other streams
        cut by that kill. Any other INTERNAL, or this one without a kill in that window, stays INTERNAL."""
        return (
            code == "INTERNAL"
            and detail == CORE_SEND_FAILED
            and self.stack.killed_between("translation", opened, time.monotonic())
        )

    async def _reader(self, index: int) -> None:
        while not self._stopping.is_set():
            target = self._some_binding()
            if target is not None:
                request = binding_pb2.GetBindingRequest(binding_id=target.binding_id, tenant_id=TENANT)
                await self.call(
                    "GetBinding",
                    lambda request=request: self.binding.GetBinding(  # type: ignore[misc]
                        request, metadata=self.metadata("tenant"), timeout=CALL_DEADLINE_SECONDS
                    ),
                )
            await asyncio.sleep(self.pause)

    async def _ingester(self, index: int) -> None:
        while not self._stopping.is_set():
            known = list(self.ledger.bindings.values())
            if not known:
                await asyncio.sleep(self.pause)
                continue
            records = [self._record(self.random.choice(known)) for _ in range(5)]
            request = cdr_pb2.IngestCdrsRequest(records=records)
            code, reply = await self.until_acknowledged(
                "IngestCdrs",
                lambda request=request: self.cdr.IngestCdrs(  # type: ignore[misc]
                    request, metadata=self.metadata("carrier"), timeout=CALL_DEADLINE_SECONDS
                ),
            )
            if code == "OK":
                rejected = {r.index: r for r in reply.rejected}
                for i, record in enumerate(records):
                    if i in rejected:
                        self.ledger.cdrs_rejected.append(f"{record.call_id}: {rejected[i].reason}")
                    else:
                        self.ledger.cdrs[record.call_id] = record.binding_id
                        self.ledger.writes_acknowledged["CDR"] += 1
            await asyncio.sleep(self.pause)

    def _record(self, binding: ExpectedBinding) -> cdr_pb2.CallDetailRecord:
        record = cdr_pb2.CallDetailRecord(
            call_id=f"c-{self._run}-{next(self._ids)}",
            binding_id=binding.binding_id,
            tenant_id=TENANT,
            calling_number=binding.party_a,
            called_number=binding.virtual_number,
            target_number=binding.party_b,
            display_number=binding.virtual_number,
            call_type=cdr_pb2.CALL_TYPE_A_TO_PEER,
            release_direction=cdr_pb2.RELEASE_DIRECTION_CALLER,
            release_cause=16,
            unconnected_cause=cdr_pb2.UNCONNECTED_CAUSE_NONE,
            carrier_id=CARRIER,
        )
        start_ms = int(time.time() * 1000) - 60_000
        record.call_time.FromMilliseconds(start_ms)
        record.ring_time.FromMilliseconds(start_ms + 2_000)
        record.answer_time.FromMilliseconds(start_ms + 5_000)
        record.release_time.FromMilliseconds(start_ms + 35_000)
        return record

    async def _watcher(self, index: int) -> None:
        cursor = "0"
        while True:
            started = time.monotonic()
            call = self.cdr.WatchCdrs(
                cdr_pb2.WatchCdrsRequest(tenant_id=TENANT, cursor=cursor), metadata=self.metadata("tenant")
            )
            try:
                async for reply in call:
                    self.ledger.watched.add(reply.record.call_id)
                    cursor = reply.cursor
            except grpc.aio.AioRpcError as error:
                self.recorder.add("WatchCdrs", code_name(error), started, error.details() or "")
            else:
                self.recorder.add("WatchCdrs", "ENDED", started, "the server ended the watch")
            finally:
                call.cancel()
            await asyncio.sleep(0.2)

    # -- control ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        workers: dict[str, Callable[[int], Awaitable[None]]] = {
            "writer": self._writer,
            "translator": self._translator,
            "stream": self._stream,
            "ingester": self._ingester,
            "reader": self._reader,
            "watcher": self._watcher,
        }
        for kind, count in self._plan.items():
            for index in range(count):
                self._tasks.append(asyncio.ensure_future(workers[kind](index)))
        self.recorder.mark("load_start")

    async def stop(self, drain_seconds: float = 20.0) -> None:
        """Stops starting new operations; writes in progress keep being retried for up to `drain_seconds`."""
        self.recorder.mark("load_stop")
        self._stopping.set()
        self._drain_deadline = time.monotonic() + drain_seconds
        others = self._tasks[: len(self._tasks) - self._plan["watcher"]]
        done, pending = await asyncio.wait(others, timeout=drain_seconds + 2 * CALL_DEADLINE_SECONDS + 5)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        self.recorder.mark("load_drained")

    async def wait_watched(self, within: float = 10.0) -> None:
        """Until the watcher has delivered every acknowledged CDR (or `within` seconds passed)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and not set(self.ledger.cdrs) <= self.ledger.watched:  # noqa: ASYNC110 (polled)
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 2)
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    async def wait_for_answers(self, rpcs: Iterable[str], ok: int, within: float) -> bool:
        """Until each RPC of `rpcs` has had `ok` OK answers since now (False if not within `within` seconds)."""
        since = time.monotonic()
        deadline = since + within
        wanted = set(rpcs)
        while time.monotonic() < deadline:
            counts = Counter(a.rpc for a in self.recorder.answers if a.start >= since and a.code == "OK")
            if all(counts[rpc] >= ok for rpc in wanted):
                return True
            await asyncio.sleep(0.05)
        return False
