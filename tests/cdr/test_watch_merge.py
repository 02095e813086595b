"""MergedWatch (services/cdr/watch.py), the reader tasks of one WatchCdrs over several buckets, driven by a read
function given to it: one batch per bucket handed over at a time, and readers that stop when the watch closes or
is cancelled, also when a wait inside the read swallows the cancellation (gh-86296)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.cdr_keys import Bucket, Buckets
from numprotect.services.cdr.watch import START, Entries, MergedWatch

BUCKETS = Buckets.of("t-merge", 3)


def _entries(index: int, after: str, count: int) -> Entries:
    first = int(after.partition("-")[0]) + 1
    return [(f"{n}-0", cdr_pb2.CallDetailRecord(call_id=f"{index}:{n}")) for n in range(first, first + count)]


async def test_each_bucket_hands_over_one_batch_at_a_time_from_where_the_last_one_ended() -> None:
    reads: dict[int, list[str]] = defaultdict(list)

    async def read_after(bucket: Bucket, after: str) -> Entries:
        reads[bucket.index].append(after)
        await asyncio.sleep(0)
        return _entries(bucket.index, after, 2) if len(reads[bucket.index]) <= 2 else []

    merged = MergedWatch(read_after, BUCKETS, [START, "10-0", START])
    delivered: list[str] = []
    try:
        for _ in range(6):
            batch = await merged.next_batch(1.0)
            assert batch is not None
            index, entries, done = batch
            # Read after the last record handed over from this bucket (its start, or the previous batch's last).
            assert reads[index][-1] == f"{int(entries[0][0].partition('-')[0]) - 1}-0"
            for entry_id, record in entries:
                merged.positions[index] = entry_id
                delivered.append(record.call_id)
            await asyncio.sleep(0.01)
            assert len(reads[index]) <= 2  # no read of this bucket until its batch was delivered
            done.set()
        assert await merged.next_batch(0.05) is None
    finally:
        await merged.close()
    assert sorted(delivered) == sorted(
        ["0:1", "0:2", "0:3", "0:4", "1:11", "1:12", "1:13", "1:14", "2:1", "2:2", "2:3", "2:4"]
    )
    assert merged.positions == ["4-0", "14-0", "4-0"]
    assert merged.cursor.startswith("2.")


async def test_readers_stop_on_close_and_on_cancel_even_when_a_read_swallows_the_cancellation() -> None:
    async def swallowing_read(bucket: Bucket, after: str) -> Entries:
        # What asyncio.wait_for does in Python 3.11 when the read completes as the cancel comes.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.02)
        return []

    merged = MergedWatch(swallowing_read, BUCKETS, [START] * 3)
    await asyncio.sleep(0.05)
    readers = list(merged._readers)
    readers[0].cancel()  # alone, as the event loop's shutdown cancels every task
    await asyncio.wait(readers[:1], timeout=1)
    assert readers[0].done()
    await asyncio.wait_for(merged.close(), timeout=2)
    assert all(reader.done() for reader in readers)


async def test_a_failed_read_ends_the_watch_with_its_error() -> None:
    async def failing_read(bucket: Bucket, after: str) -> Entries:
        if bucket.index == 1:
            raise ConnectionError("redis went away")
        await asyncio.sleep(0.01)
        return []

    merged = MergedWatch(failing_read, BUCKETS, [START] * 3)
    try:
        raised = None
        try:
            await merged.next_batch(1.0)
        except ConnectionError as exc:
            raised = exc
        assert raised is not None and "redis went away" in str(raised)
    finally:
        await merged.close()
