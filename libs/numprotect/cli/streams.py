"""Following a server stream at the terminal (`cdrs watch`, `events watch`): a row per message as it arrives (or
one JSON document per line), until Ctrl-C, --limit messages or --duration seconds; then, on stderr, the cursor to
resume from."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from numprotect.cli.connection import Connection
from numprotect.cli.output import Printer, note


class Arrivals:
    """The stream's responses, read on a thread of their own and handed over through a queue: Ctrl-C then lands in
    the main thread's queue wait, never inside gRPC's code (a KeyboardInterrupt raised there, holding one of its
    locks, could leave the process hung at exit). Iterating raises the stream's error, if it ends with one."""

    _END = object()

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._queue: queue.Queue[Any] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="watch-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._stream:
                self._queue.put(response)
        except grpc.RpcError as error:
            self._queue.put(error)
        finally:
            self._queue.put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get(timeout=0.2)  # bounded, so a signal is acted on promptly
            except queue.Empty:
                continue
            if item is self._END:
                return
            if isinstance(item, grpc.RpcError):
                raise item
            yield item

    def stop(self) -> None:
        """Cancels the stream and lets the reader end (bounded: it is a daemon thread)."""
        self._stream.cancel()
        self._reader.join(timeout=5)


def fixed_row(values: Sequence[tuple[str, int]]) -> str:
    """Cells padded to their widths (a table cannot be printed before it is complete)."""
    return "  ".join(value.ljust(width) for value, width in values).rstrip()


def follow(
    connection: Connection,
    method: Callable[..., Any],
    request: Message,
    printer: Printer,
    *,
    columns: Sequence[tuple[str, int]],
    cells: Callable[[Any], Sequence[str]],
    cursor: str,
    noun: str,
    limit: int,
    duration: float,
) -> None:
    """Prints each response of the server stream `method(request)` as it arrives: a fixed-width row of `cells`
    under `columns` and its cursor (json: the response, one per line). No deadline unless `duration`: a watch runs
    until it is stopped; a deadline it set itself ends it with status 0, like Ctrl-C and `limit`."""
    last_cursor = cursor
    seen = 0
    stream = method(request, timeout=duration or None, metadata=connection.metadata)
    if not printer.json:
        printer.line(fixed_row([(name.upper(), width) for name, width in columns] + [("CURSOR", 0)]))
    arrivals = Arrivals(stream)
    try:
        for response in arrivals:
            if printer.json:
                printer.message_json(response, indent=None)
            else:
                values = [(value, width) for value, (_, width) in zip(cells(response), columns, strict=True)]
                printer.line(fixed_row([*values, (response.cursor, 0)]))
            last_cursor = response.cursor
            seen += 1
            if limit and seen >= limit:
                break
    except KeyboardInterrupt:
        pass
    except grpc.RpcError as error:
        if not (duration and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED):
            raise
    finally:
        arrivals.stop()
    if last_cursor:
        note(f"{seen} {noun}(s); resume with --cursor {last_cursor}")
    else:
        note(f"{seen} {noun}(s)")
