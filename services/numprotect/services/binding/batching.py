"""Natural batching of one RPC's concurrent requests (binding's reservations at allocation's batch RPCs).

Requests wait in a queue for the end of the event loop's current pass (the requests of the calls that pass resumed
go together), then leave in one batch call if fewer than `max_in_flight` calls of the method are on their way;
otherwise they leave with the next batch as soon as one of those calls returns (at most `max_items` a batch). No
timer: at low load a request goes alone after one loop pass; under load one call carries many requests, which
saves the fixed cost of a gRPC call on both sides (about 300 us of CPU each, per call, on this machine).

Each request keeps its own deadline: when its time is up it is answered locally (`unanswered(DEADLINE_EXCEEDED)`),
whether it still waits or its batch is on its way (the batch goes on for the others); a batch call's timeout is the
largest time left to any of its items. A caller cancelled while it waits leaves the queue; once its item is sent, the
item's answer is dropped (as the server may have acted on a cancelled unary call too).

Tracing: a batch call runs in the context of one of its items (the first whose span records, else the first), so
its CLIENT span and allocation's spans join that item's trace. With a tracer, an INTERNAL span `allocation.batch`
(attributes `rpc.method`, `numprotect.batch_items`) wraps the call when that context records, with a link to the
span of every other item that records.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from numprotect.core.telemetry import ATTRIBUTE_PREFIX

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
OutcomeT = TypeVar("OutcomeT")
BATCH_SPAN = "allocation.batch"
# Defaults of NUMPROTECT_BINDING_ALLOCATION_MAX_BATCH / _BATCHES_IN_FLIGHT (settings.py; docs/binding.md).
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_IN_FLIGHT = 1


@dataclass(frozen=True)
class BatchLimits:
    # Requests one batch call carries at most.
    max_items: int = DEFAULT_MAX_ITEMS
    # Batch calls of one method on their way at once; more requests wait for the next batch.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT


class _Item(Generic[RequestT, OutcomeT]):
    __slots__ = ("context", "deadline", "future", "request", "span")

    def __init__(
        self,
        request: RequestT,
        deadline: float,
        future: asyncio.Future[OutcomeT],
        context: contextvars.Context,
        span: trace.Span,
    ) -> None:
        self.request = request
        self.deadline = deadline  # the event loop's clock
        self.future = future
        self.context = context  # a copy of the caller's: a batch call runs in its leading item's
        self.span = span


# Sends one batch: the requests and the call's timeout (seconds) in, one outcome per request out (in order).
Send = Callable[[list[RequestT], float], Awaitable[Sequence[OutcomeT]]]


class Batcher(Generic[RequestT, OutcomeT]):
    """Batches the concurrent requests of one method; `submit` answers each with its own outcome."""

    def __init__(
        self,
        send: Send[RequestT, OutcomeT],
        limits: BatchLimits,
        unanswered: Callable[[grpc.StatusCode], OutcomeT],
        *,
        method: str,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """`unanswered(code)`: the outcome of an item that got no answer (DEADLINE_EXCEEDED: its time ran out;
        CANCELLED: its batch was cancelled, e.g. at shutdown). `method` names the batch RPC in spans."""
        self._send = send
        self.limits = limits
        self._unanswered = unanswered
        self._method = method
        self._tracer = tracer
        self._queue: deque[_Item[RequestT, OutcomeT]] = deque()
        self._in_flight = 0
        self._flush_due = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Counters for tests and benchmarks: batch calls sent, items they carried.
        self.batches_sent = 0
        self.items_sent = 0

    async def submit(self, request: RequestT, within: float) -> OutcomeT:
        """`request`'s outcome, within `within` seconds (then `unanswered(DEADLINE_EXCEEDED)`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[OutcomeT] = loop.create_future()
        deadline = loop.time() + within
        timer = loop.call_at(deadline, self._expire, future)
        self._queue.append(_Item(request, deadline, future, contextvars.copy_context(), trace.get_current_span()))
        if not self._flush_due:
            # After the callbacks of this loop pass: the requests they make go in the same batch (no timer).
            self._flush_due = True
            loop.call_soon(self._flush)
        try:
            return await future
        finally:
            timer.cancel()

    def _flush(self) -> None:
        self._flush_due = False
        self._launch_waiting()

    def _expire(self, future: asyncio.Future[OutcomeT]) -> None:
        if not future.done():
            future.set_result(self._unanswered(grpc.StatusCode.DEADLINE_EXCEEDED))

    def _launch(self, items: list[_Item[RequestT, OutcomeT]], context: contextvars.Context) -> None:
        self._in_flight += 1
        self.batches_sent += 1
        self.items_sent += len(items)
        task = asyncio.get_running_loop().create_task(self._run(items), context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _launch_waiting(self) -> None:
        """Sends what waits, while there is room: each batch from its leading item's context."""
        while self._queue and self._in_flight < self.limits.max_in_flight:
            items: list[_Item[RequestT, OutcomeT]] = []
            while self._queue and len(items) < self.limits.max_items:
                item = self._queue.popleft()
                if not item.future.done():  # not cancelled, not timed out
                    items.append(item)
            if items:
                lead = next((i for i in items if i.span.is_recording()), items[0])
                self._launch(items, lead.context)

    async def _run(self, items: list[_Item[RequestT, OutcomeT]]) -> None:
        try:
            within = max(item.deadline for item in items) - asyncio.get_running_loop().time()
            with self._span(items):
                outcomes = await self._send([item.request for item in items], within)
            if len(outcomes) != len(items):
                raise RuntimeError(f"{self._method}: {len(outcomes)} outcomes for {len(items)} requests")
            for item, outcome in zip(items, outcomes, strict=True):
                if not item.future.done():
                    item.future.set_result(outcome)
        except asyncio.CancelledError:
            self._answer_all(items, self._unanswered(grpc.StatusCode.CANCELLED))
            raise
        except Exception as exc:  # a bug: each caller gets it (and its call layer answers INTERNAL)
            log.exception("batch call failed", extra={"method": self._method, "items": len(items)})
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._launch_waiting()

    @staticmethod
    def _answer_all(items: list[_Item[RequestT, OutcomeT]], outcome: OutcomeT) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_result(outcome)

    def _span(self, items: list[_Item[RequestT, OutcomeT]]) -> AbstractContextManager[Any]:
        """The batch's INTERNAL span, when the context the call runs in records; else nothing."""
        current = trace.get_current_span()
        if self._tracer is None or not current.is_recording():
            return nullcontext()
        links = [
            Link(item.span.get_span_context())
            for item in items
            if item.span is not current and item.span.is_recording()
        ]
        return self._tracer.start_as_current_span(
            BATCH_SPAN,
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={"rpc.method": self._method, ATTRIBUTE_PREFIX + "batch_items": len(items)},
        )
