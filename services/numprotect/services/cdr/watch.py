"""WatchCdrs over an owner's buckets: the cursor (a stream position per bucket) and the merged read.

A bucket is one stream in one slot, and a cluster refuses one XREAD over keys of several slots, so each bucket
is read on its own: one reader task per bucket, each a blocking XREAD on the watchers' pool. A reader hands over
one batch (at most WATCH_COUNT records) and reads on only once that batch was delivered, so a watch buffers at
most one batch per bucket and its cursor always names what was delivered: per bucket, the last stream id sent.
A binding's records are all in one bucket, in stream order, so they are delivered in order; the buckets'
batches are interleaved as they arrive.

Cursors (the `cursor` of each WatchCdrsResponse): for an owner with one bucket, the stream id itself
("<ms>-<seq>", as before buckets); for N > 1 buckets, CURSOR_PREFIX + base64url (no padding) of: the bucket count
(1 byte), then per bucket the stream id's ms as a zigzag varint of its difference to the previous bucket's ms, and
its sequence number as a varint. A bare stream id given to an owner with N > 1 buckets is bucket 0's position,
the others from their start: the only bare ids such an owner can have issued are from before its first record,
when only bucket 0 could be read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from collections.abc import Awaitable, Callable, Sequence

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.cdr_keys import MAX_BUCKETS, Bucket, Buckets
from numprotect.core.errors import InvalidArgument
from numprotect.core.limits import ConcurrencyLimit

CURSOR_PREFIX = "2."
START = "0-0"
_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})", re.ASCII)
_ID_PART_MAX = 2**64 - 1
# Longest cursor of MAX_BUCKETS positions: 1 count byte, at most 10 + 10 bytes per bucket, in base64.
_MAX_CURSOR = len(CURSOR_PREFIX) + (1 + 20 * MAX_BUCKETS) * 4 // 3 + 4
CURSOR_RULE = 'must be "", "0" or a cursor a previous WatchCdrs response carried'

Entries = list[tuple[str, cdr_pb2.CallDetailRecord]]
ReadAfter = Callable[[Bucket, str], Awaitable[Entries]]


def _refused(reason: str = CURSOR_RULE) -> InvalidArgument:
    return InvalidArgument.field("cursor", reason)


def is_entry_id(cursor: str) -> bool:
    """True for a stream entry id Redis takes: two ASCII numbers that each fit in 64 bits."""
    match = _ENTRY_ID.fullmatch(cursor)
    return match is not None and all(int(part) <= _ID_PART_MAX for part in match.groups())


def check_cursor(cursor: str) -> None:
    """INVALID_ARGUMENT for a cursor of no form a watch issues (before anything is read)."""
    if cursor not in ("", "0") and not is_entry_id(cursor):
        _unpack(cursor)


def encode_cursor(positions: Sequence[str]) -> str:
    """The cursor of a watch whose buckets stand at `positions` (stream ids, bucket by bucket)."""
    if len(positions) == 1:
        return positions[0]
    out = bytearray([len(positions)])
    previous = 0
    for position in positions:
        ms_text, _, seq_text = position.partition("-")
        ms, seq = int(ms_text), int(seq_text)
        delta = ms - previous
        _varint(out, delta * 2 if delta >= 0 else -delta * 2 - 1)
        _varint(out, seq)
        previous = ms
    return CURSOR_PREFIX + base64.urlsafe_b64encode(bytes(out)).decode().rstrip("=")


def decode_cursor(cursor: str, count: int) -> list[str]:
    """The position per bucket of a non-empty cursor for an owner with `count` buckets (INVALID_ARGUMENT if it
    is none, or a cursor of another number of buckets)."""
    if cursor == "0":
        return [START] * count
    if is_entry_id(cursor):
        return [cursor] + [START] * (count - 1)
    positions = _unpack(cursor)
    if len(positions) != count:
        raise _refused(
            f"is a cursor of a watch over {len(positions)} buckets; this tenant's records are in {count}: "
            'resume with "0" or "", or a cursor of this tenant'
        )
    return positions


def _varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _unpack(cursor: str) -> list[str]:
    """The positions of a cursor of several buckets (INVALID_ARGUMENT for anything else)."""
    if not cursor.startswith(CURSOR_PREFIX) or len(cursor) > _MAX_CURSOR:
        raise _refused()
    text = cursor[len(CURSOR_PREFIX) :]
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise _refused() from None
    if not data or not 2 <= data[0] <= MAX_BUCKETS:
        raise _refused()
    at = 1
    previous = 0
    positions = []

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while at < len(data) and shift <= 70:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise _refused()

    for _ in range(data[0]):
        zigzag = varint()
        ms = previous + (zigzag // 2 if zigzag % 2 == 0 else -(zigzag + 1) // 2)
        seq = varint()
        if not (0 <= ms <= _ID_PART_MAX and seq <= _ID_PART_MAX):
            raise _refused()
        positions.append(f"{ms}-{seq}")
        previous = ms
    if at != len(data):
        raise _refused()
    return positions


async def take_places(places: contextlib.AsyncExitStack, limit: ConcurrencyLimit, count: int) -> None:
    """`count` places of `limit` held until `places` closes (RESOURCE_EXHAUSTED, none held, if they are not all
    free: a watch reads with one connection of the watchers' pool per bucket)."""
    for _ in range(count):
        await places.enter_async_context(limit)


class MergedWatch:
    """The reader tasks of one watch and the batches they hand over, in arrival order."""

    def __init__(self, read_after: ReadAfter, buckets: Buckets, positions: Sequence[str]) -> None:
        self._read_after = read_after
        self.positions = list(positions)
        self._batches: asyncio.Queue[tuple[int, Entries, asyncio.Event] | Exception] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []
        self._delivered: list[asyncio.Event] = []
        self._closed = False
        self.buckets = buckets
        for bucket in buckets.all:
            self._start(bucket)

    @property
    def cursor(self) -> str:
        return encode_cursor(self.positions)

    def grow(self, buckets: Buckets) -> None:
        """The owner's count was stored after the watch began (it began on bucket 0 alone): the new buckets were
        empty then, so they are read from their start."""
        added = buckets.all[len(self.buckets.all) :]
        self.positions += [START] * len(added)
        self.buckets = buckets
        for bucket in added:
            self._start(bucket)

    def _start(self, bucket: Bucket) -> None:
        delivered = asyncio.Event()
        self._delivered.append(delivered)
        self._readers.append(asyncio.create_task(self._read(bucket, delivered), name=f"watch {bucket.stream}"))

    async def _read(self, bucket: Bucket, delivered: asyncio.Event) -> None:
        after = self.positions[bucket.index]
        reader = asyncio.current_task()
        try:
            # Also ends on a cancellation that a wait inside redis-py swallowed (gh-86296: the task still counts it),
            # else the reader would go on reading after its watch ended, and hold up the loop's shutdown.
            while not self._closed and not (reader is not None and reader.cancelling()):
                entries = await self._read_after(bucket, after)
                if entries and not self._closed:
                    delivered.clear()
                    self._batches.put_nowait((bucket.index, entries, delivered))
                    await delivered.wait()
                    after = entries[-1][0]
        except Exception as exc:  # the watch ends with it (UNAVAILABLE for a Redis failure)
            self._batches.put_nowait(exc)

    async def next_batch(self, timeout_seconds: float) -> tuple[int, Entries, asyncio.Event] | None:
        """The next batch a reader handed over (bucket, records, the event to set once they are delivered), or
        None when none came within the timeout. A reader's failure is raised here."""
        try:
            async with asyncio.timeout(timeout_seconds):
                item = await self._batches.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        """Stops the readers (a blocked XREAD is cancelled: its connection is dropped, as when a watch ends). A reader
        whose cancellation is swallowed still stops at its next read; the wait for them is bounded."""
        self._closed = True
        for delivered in self._delivered:
            delivered.set()
        for reader in self._readers:
            reader.cancel()
        if self._readers:
            await asyncio.wait(self._readers, timeout=5)
