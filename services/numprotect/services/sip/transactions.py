"""Server transactions (RFC 3261 section 17.2): the table keyed by branch, and one sweeper for every timer.

A transaction keeps the response it sent, so a retransmitted request is answered with the same bytes and never
translated twice. Timers are deadlines in one heap, run by the adapter's one periodic sweep (`sweep`), not one
loop timer per transaction: G (retransmit a final non-2xx over UDP, T1 doubling up to T2), H (give up waiting
for the ACK, 64*T1), I (absorb retransmitted ACKs, T4 over UDP, none over TCP) and J (answer a retransmitted
non-INVITE request, 64*T1 over UDP, none over TCP).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Hashable
from enum import IntEnum
from typing import Any, Protocol

from numprotect.services.sip.message import MAGIC_COOKIE, Request, tag_of

log = logging.getLogger(__name__)

T1 = 0.5
T2 = 4.0
T4 = 5.0
TIMER_H = 64 * T1
TIMER_J = 64 * T1
# A transaction waiting for translation is dropped after this long whatever happens (translation is bounded far
# below it): a safety net, never reached in normal operation.
PROCEEDING_LIMIT = 64 * T1

# A UDP peer as asyncio gives it: (host, port) or, for IPv6, (host, port, flowinfo, scope_id).
Address = tuple[Any, ...]


class Sink(Protocol):
    """Where a transaction's responses go: a UDP listener (to `address`) or a TCP connection (`address` unused)."""

    @property
    def reliable(self) -> bool: ...

    def send(self, data: bytes, address: Address) -> None: ...


class State(IntEnum):
    PROCEEDING = 1  # INVITE being translated (100 Trying sent)
    COMPLETED = 2  # final response sent
    CONFIRMED = 3  # INVITE: the ACK came


def transaction_key(request: Request, method: str) -> Hashable:
    """The key of the transaction `request` belongs to as `method` (an ACK or CANCEL names its INVITE's): the top
    Via's branch and sent-by (RFC 3261 section 17.2.3), or for an RFC 2543 client, whose branch lacks the magic
    cookie, Call-ID, CSeq number, From tag and Request-URI."""
    branch = request.branch
    if branch.startswith(MAGIC_COOKIE):
        return (branch, request.sent_by, method)
    from_value = request.header("from") or ""
    return ("2543", request.call_id, request.cseq_number, tag_of(from_value), request.uri, method)


class ServerTransaction:
    """One request's transaction. `response` is the final response's bytes once sent, `trying` the 100's."""

    __slots__ = (
        "address",
        "cancelled",
        "deadline",
        "expires",
        "interval",
        "invite",
        "key",
        "request",
        "response",
        "sink",
        "span",
        "started",
        "state",
        "trying",
    )

    def __init__(self, key: Hashable, invite: bool, sink: Sink, address: Address, request: Request) -> None:
        self.key = key
        # What the final response is rendered from (a CANCEL's 487 too); let go once it is sent, as are the 100's
        # bytes: a completed transaction holds its key and response only.
        self.request: Request | None = request
        self.started = 0.0  # loop time the request came
        self.span: Any = None  # the INVITE's span until its final response
        self.invite = invite
        self.sink = sink
        self.address = address
        self.state = State.PROCEEDING
        self.response = b""
        self.trying = b""
        self.cancelled = False
        self.deadline = 0.0  # the next timer's
        self.interval = T1  # Timer G's current interval
        self.expires = 0.0  # Timer H

    def resend(self) -> None:
        """A retransmitted request: the final response again, or the 100 while it is being translated."""
        data = self.response or self.trying
        if data:
            self.sink.send(data, self.address)


class TransactionTable:
    """The server transactions held, at most `limit`."""

    __slots__ = ("_heap", "_sequence", "_transactions", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._transactions: dict[Hashable, ServerTransaction] = {}
        # (deadline, tie-breaker, transaction); an entry whose deadline is no longer its transaction's is stale.
        self._heap: list[tuple[float, int, ServerTransaction]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._transactions)

    def get(self, key: Hashable) -> ServerTransaction | None:
        return self._transactions.get(key)

    @property
    def full(self) -> bool:
        return len(self._transactions) >= self.limit

    def open(
        self, key: Hashable, invite: bool, sink: Sink, address: Address, request: Request, now: float
    ) -> ServerTransaction:
        """A new transaction (the caller checked `full` and that the key is new)."""
        transaction = ServerTransaction(key, invite, sink, address, request)
        transaction.started = now
        self._transactions[key] = transaction
        self._schedule(transaction, now + PROCEEDING_LIMIT)
        return transaction

    def complete(self, transaction: ServerTransaction, response: bytes, now: float) -> None:
        """The final response was sent: keep it for retransmissions, and start G and H (INVITE) or J."""
        transaction.state = State.COMPLETED
        transaction.response = response
        transaction.request = None
        transaction.trying = b""
        reliable = transaction.sink.reliable
        if transaction.invite:
            transaction.expires = now + TIMER_H
            transaction.interval = T1
            self._schedule(transaction, transaction.expires if reliable else now + T1)
        elif reliable:
            self._remove(transaction)
        else:
            self._schedule(transaction, now + TIMER_J)

    def confirm(self, transaction: ServerTransaction, now: float) -> None:
        """The ACK of the final response: no more retransmissions; Timer I absorbs the ACK's own."""
        transaction.state = State.CONFIRMED
        if transaction.sink.reliable:
            self._remove(transaction)
        else:
            self._schedule(transaction, now + T4)

    def sweep(self, now: float) -> int:
        """Runs the timers due at `now`; returns how many responses were retransmitted (Timer G)."""
        heap = self._heap
        retransmitted = 0
        while heap and heap[0][0] <= now:
            deadline, _, transaction = heapq.heappop(heap)
            if transaction.deadline != deadline or self._transactions.get(transaction.key) is not transaction:
                continue  # stale: the transaction moved on or is gone
            if transaction.state is State.COMPLETED and transaction.invite and now < transaction.expires:
                # Timer G: the final response again, at twice the interval (at most T2), until H.
                transaction.sink.send(transaction.response, transaction.address)
                retransmitted += 1
                transaction.interval = min(transaction.interval * 2, T2)
                self._schedule(transaction, min(now + transaction.interval, transaction.expires))
                continue
            if transaction.state is State.PROCEEDING:
                log.warning("sip transaction dropped before its final response", extra={"after_s": PROCEEDING_LIMIT})
            self._remove(transaction)  # H (no ACK), I, J, or the safety net
        return retransmitted

    def clear(self) -> None:
        self._transactions.clear()
        self._heap.clear()

    def _schedule(self, transaction: ServerTransaction, deadline: float) -> None:
        transaction.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._sequence), transaction))

    def _remove(self, transaction: ServerTransaction) -> None:
        transaction.deadline = -1.0  # its heap entries are stale
        if self._transactions.get(transaction.key) is transaction:
            del self._transactions[transaction.key]
