"""The bounded queue between a TranslateStream's reader thread and the thread that answers it."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator

from numprotect.core.errors import DomainError
from numprotect.translation.v1 import translation_pb2

Message = translation_pb2.TranslateStreamRequest


class StreamInbox:
    """The messages a stream received and has not answered yet, at most `capacity` calls (a message with
    `requests` counts each; an oversized one still enters an empty inbox, to be answered with its error).

    When it is full the reader waits instead of reading: grpcio then reads no further message of the call, the
    HTTP/2 stream window fills and the client's sends block (flow control), so a client that sends faster than
    Redis answers never makes the process buffer more than this.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._changed = threading.Condition()
        self._messages: collections.deque[tuple[Message, int]] = collections.deque()
        self._queued = 0  # calls in _messages
        self._ended = False  # the reader is done: the client half-closed, went away, or a check failed
        self._error: DomainError | None = None
        self._closed = False  # the answering side is done: the reader stops

    def fill(self, requests: Iterator[Message]) -> None:
        """The reader thread: queues every message until the client half-closes or the stream is over."""
        error: DomainError | None = None
        try:
            for message in requests:
                if not self._put(message):
                    return
        except DomainError as exc:  # the call layer's check of this message (a revoked key): ends the stream
            error = exc
        except Exception:  # the client went away (grpcio raises on a cancelled call): the stream just ends
            pass
        with self._changed:
            self._ended = True
            self._error = error
            self._changed.notify_all()

    def _put(self, message: Message) -> bool:
        weight = max(1, len(message.requests))
        with self._changed:
            while not self._closed and self._queued and self._queued + weight > self._capacity:
                self._changed.wait()
            if self._closed:
                return False
            self._messages.append((message, weight))
            self._queued += weight
            self._changed.notify_all()
            return True

    def take(self, most: int) -> list[Message]:
        """Up to `most` messages, waiting for the first; [] once the client is done (raises the error that ended
        the stream, if one did)."""
        with self._changed:
            while not self._messages and not self._ended:
                self._changed.wait()
            taken: list[Message] = []
            while self._messages and len(taken) < most:
                message, weight = self._messages.popleft()
                self._queued -= weight
                taken.append(message)
            if taken:
                self._changed.notify_all()
                return taken
            if self._error is not None:
                raise self._error
            return taken

    def close(self) -> None:
        """The stream is over on the answering side: a waiting reader stops."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
