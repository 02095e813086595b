"""The engine of `numprotect blocks import`: the CSV read and checked up front, a journal that makes a run resumable,
the file of rejected rows, and the calls (several in flight, transient failures retried with backoff).

No terminal output here: the command (numprotect.cli.blocks) shows progress from `ImportRun.events`.

Journal: a text file, first line `# numprotect blocks import journal v1 sha256=<input's digest>`, then one line per
finished row, `<line number>\t<outcome>` (imported, already_imported, rejected), appended and flushed as each row
finishes. A row is finished when its call answered (or it was rejected); a run started again skips the rows its
journal names. A row whose call was in flight when the run was stopped (Ctrl-C, kill) is not in the journal and is
sent again: ImportBlock is idempotent, so the block is not imported twice (the second call answers
already_imported). The journal is written by a process that may be killed but is not fsynced: after a machine crash
its last rows may be done again, with the same safe outcome.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import queue
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from numprotect.allocation.v1 import allocation_pb2
from numprotect.cli.failures import EXIT_USAGE, CliError, describe_rpc_error

COLUMNS = ("block", "tenant_id", "city_code", "carrier_id")
# Columns the rejects file adds (an input carrying them, such as a fixed rejects file, has them replaced).
REJECT_COLUMNS = ("code", "message")
JOURNAL_HEADER = "# numprotect blocks import journal v1 sha256="
# Outcomes a row can end with (journaled), and the one for a row whose transient failures outlasted the retries
# (not journaled: the next run sends it again).
IMPORTED = "imported"
ALREADY_IMPORTED = "already_imported"
REJECTED = "rejected"
UNFINISHED = "unfinished"
FINISHED = (IMPORTED, ALREADY_IMPORTED, REJECTED)
# Statuses worth another try: the call may succeed later (and ImportBlock may be repeated safely).
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
# Statuses that no row can get past (the key, the server): the run stops with that status.
FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED})
# The local code of a row that is not a well-formed CSV record of the header's columns.
BAD_ROW = "BAD_CSV_ROW"


@dataclass(frozen=True)
class Row:
    line: int  # the record's first line in the file (1 is the header): its id in the journal
    values: tuple[str, ...]  # as read, every column
    request: allocation_pb2.ImportBlockRequest | None  # None: a malformed record (rejected without a call)
    problem: str = ""


@dataclass(frozen=True)
class BlockFile:
    path: Path
    header: tuple[str, ...]
    rows: tuple[Row, ...]
    sha256: str


def read_block_file(path: Path, actor: str) -> BlockFile:
    """The whole file, its shape checked: a header naming every column of COLUMNS once (others are ignored), UTF-8.
    A record with a different number of fields is kept as a row to reject, not an error of the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}", EXIT_USAGE) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CliError(f"{path}: line {line}: not UTF-8 text ({exc.reason})", EXIT_USAGE) from exc
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = tuple(name.strip() for name in next(reader, ()))
    except csv.Error as exc:
        raise CliError(f"{path}: line 1: the header is not valid CSV ({exc})", EXIT_USAGE) from exc
    if not header:
        raise CliError(f"{path}: empty: expected a header row {','.join(COLUMNS)}", EXIT_USAGE)
    missing = [c for c in COLUMNS if c not in header]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if missing or repeated:
        problems = []
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        if repeated:
            problems.append(f"repeated column(s) {', '.join(repeated)}")
        raise CliError(
            f"{path}: line 1: the header {','.join(header)!r} has {' and '.join(problems)} "
            f"(expected the columns {','.join(COLUMNS)}, in any order)",
            EXIT_USAGE,
        )
    where = {c: header.index(c) for c in COLUMNS}
    rows: list[Row] = []
    while True:
        line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # A broken quote swallows the rest of the file: that is the file's shape, not one row.
            raise CliError(f"{path}: line {line}: not valid CSV ({exc})", EXIT_USAGE) from exc
        if not record or (all(not v.strip() for v in record) and len(record) <= 1):
            continue  # a blank line
        values = tuple(record)
        if len(values) != len(header):
            problem = f"line {line}: {len(values)} fields, the header has {len(header)}"
            rows.append(Row(line, values, None, problem))
            continue
        fields = {c: values[i].strip() for c, i in where.items()}
        request = allocation_pb2.ImportBlockRequest(actor=actor, **fields)
        rows.append(Row(line, values, request))
    return BlockFile(path, header, tuple(rows), hashlib.sha256(raw).hexdigest())


class Journal:
    """The rows finished so far (read back when the run resumes), appended to as rows finish."""

    def __init__(self, path: Path, block_file: BlockFile) -> None:
        self.path = path
        self.done: dict[int, str] = {}
        self.resumed = path.exists()
        if self.resumed:
            text = self._read(block_file)
            self._file: TextIO = path.open("a", encoding="utf-8")
            if not text.endswith("\n"):
                self._file.write("\n")  # after a line cut short by a kill: new entries start on their own line
        else:
            self._file = path.open("w", encoding="utf-8")
            self._file.write(f"{JOURNAL_HEADER}{block_file.sha256} input={block_file.path.name}\n")
            self._file.flush()

    def _read(self, block_file: BlockFile) -> str:
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if not lines or not lines[0].startswith(JOURNAL_HEADER):
            raise CliError(
                f"journal {self.path}: not a blocks import journal (remove it or pass --journal)", EXIT_USAGE
            )
        digest = lines[0][len(JOURNAL_HEADER) :].split(" ", 1)[0]
        if digest != block_file.sha256:
            raise CliError(
                f"journal {self.path} was written for another content of {block_file.path} (sha256 differs): "
                "remove the journal to start over, or pass --journal for a new one",
                EXIT_USAGE,
            )
        for entry in lines[1:]:
            number, _, outcome = entry.partition("\t")
            # A last line cut short by a kill is ignored: that row is done again (safely: ImportBlock is idempotent).
            if number.isdigit() and outcome in FINISHED:
                self.done[int(number)] = outcome
        return text

    def record(self, line: int, outcome: str) -> None:
        self._file.write(f"{line}\t{outcome}\n")
        self._file.flush()
        self.done[line] = outcome

    def close(self) -> None:
        self._file.close()


class Rejects:
    """The rejected rows: the original columns plus the status code and message, CSV. A resumed run appends."""

    def __init__(self, path: Path, header: Sequence[str], *, append: bool) -> None:
        self.path = path
        self._keep = [i for i, name in enumerate(header) if name not in REJECT_COLUMNS]
        fresh = not (append and path.exists() and path.stat().st_size > 0)
        self._file = path.open("w" if fresh else "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file)
        if fresh:
            self._writer.writerow([*(header[i] for i in self._keep), *REJECT_COLUMNS])
            self._file.flush()

    def write(self, row: Row, code: str, message: str) -> None:
        # A row short of fields gets empty cells, so code and message stay under their headings (and the missing
        # field can be filled in before the file is imported again).
        kept = [row.values[i] if i < len(row.values) else "" for i in self._keep]
        self._writer.writerow([*kept, code, message])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # calls per row at most
    first_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int, hinted: float | None) -> float:
        """Before try `attempt + 1`: exponential with full jitter, never shorter than the server's RetryInfo."""
        backoff = random.uniform(0, min(self.max_delay, self.first_delay * 2 ** (attempt - 1)))
        return max(backoff, hinted or 0.0)


@dataclass(frozen=True)
class Outcome:
    row: Row
    kind: str  # IMPORTED | ALREADY_IMPORTED | REJECTED | UNFINISHED
    code: str = ""
    message: str = ""


@dataclass
class Summary:
    rows: int = 0
    skipped: int = 0  # finished by an earlier run (journal)
    skipped_rejected: int = 0  # of those, rejected by it (in the rejects file already)
    counts: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    interrupted: bool = False

    @property
    def finished(self) -> int:
        return self.skipped + sum(self.counts[k] for k in (*FINISHED, UNFINISHED))


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call, if its status carries one."""
    if not isinstance(error, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def _code_of(error: grpc.RpcError) -> grpc.StatusCode:
    code = getattr(error, "code", None)
    found = code() if callable(code) else None
    return found if isinstance(found, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


# Starts one ImportBlock call; `done` is called (from a gRPC thread) with the response or the RpcError.
StartCall = Callable[[allocation_pb2.ImportBlockRequest, Callable[[Any], None]], Callable[[], None]]


class ImportRun:
    """Imports the rows the journal does not name, up to `concurrency` calls in flight. Bookkeeping (journal,
    rejects, summary) happens on the calling thread only; gRPC's threads only hand answers over a queue."""

    def __init__(
        self,
        block_file: BlockFile,
        journal: Journal,
        rejects: Rejects,
        start_call: StartCall,
        *,
        concurrency: int,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_file = block_file
        self.journal = journal
        self.rejects = rejects
        self.start_call = start_call
        self.concurrency = concurrency
        self.retry = retry
        self.clock = clock
        self.summary = Summary(rows=len(block_file.rows))
        earlier = [journal.done[r.line] for r in block_file.rows if r.line in journal.done]
        self.summary.skipped = len(earlier)
        self.summary.skipped_rejected = earlier.count(REJECTED)
        # Answers from gRPC's threads; None only wakes the loop (interrupt).
        self._answers: queue.SimpleQueue[tuple[Row, int, Any] | None] = queue.SimpleQueue()
        self._cancels: dict[int, Callable[[], None]] = {}
        self._interrupted = False

    def events(self) -> Iterator[Outcome]:
        """Runs the import, yielding each row's outcome as it finishes (the caller shows progress). Raises the
        RpcError of a FATAL status (after the rows in flight). After `interrupt()` it ends early (the rows in
        flight cancelled, not journaled; summary.interrupted set)."""
        pending = iter([r for r in self.block_file.rows if r.line not in self.journal.done])
        waiting: list[tuple[float, Row, int]] = []  # (not before, row, attempts so far): retries
        fatal: grpc.RpcError | None = None
        exhausted = False
        try:
            while True:
                if self._interrupted:
                    self.stop()
                    return
                now = self.clock()
                while not self._interrupted and fatal is None and len(self._cancels) < self.concurrency:
                    ready = [w for w in waiting if w[0] <= now]
                    if ready:
                        entry = min(ready, key=lambda w: w[0])
                        waiting.remove(entry)
                        self._send(entry[1], entry[2])
                        continue
                    row = None if exhausted else next(pending, None)
                    if row is None:
                        exhausted = True
                        break
                    if row.request is None:
                        yield self._finish(Outcome(row, REJECTED, BAD_ROW, row.problem))
                        continue
                    self._send(row, 0)
                if not self._cancels and (fatal is not None or (exhausted and not waiting)):
                    break
                wake = min((w[0] for w in waiting), default=now + 0.5) - now
                try:
                    item = self._answers.get(timeout=max(0.0, min(wake, 0.5)))
                except queue.Empty:
                    continue
                if item is None:
                    continue
                row, attempts, answer = item
                if self._cancels.pop(row.line, None) is None:
                    continue  # cancelled by stop()
                if not isinstance(answer, grpc.RpcError):
                    kind = ALREADY_IMPORTED if answer.already_imported else IMPORTED
                    yield self._finish(Outcome(row, kind))
                    continue
                code = _code_of(answer)
                hinted = retry_delay_of(answer)
                transient = code in TRANSIENT or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and hinted is not None)
                if code in FATAL:
                    fatal = fatal or answer
                elif transient and attempts < self.retry.attempts:
                    self.summary.retries += 1
                    waiting.append((self.clock() + self.retry.delay(attempts, hinted), row, attempts))
                elif transient:
                    yield self._finish(Outcome(row, UNFINISHED, code.name, describe_rpc_error(answer)))
                else:
                    yield self._finish(Outcome(row, REJECTED, code.name, describe_rpc_error(answer)))
        except BaseException:
            self.stop()
            raise
        if fatal is not None:
            raise fatal

    def interrupt(self) -> None:
        """Asks the run to end at its next step. Safe in a signal handler: a flag and a reentrant queue put."""
        self._interrupted = True
        self._answers.put(None)

    def stop(self) -> None:
        """An interrupted run: the calls in flight are cancelled (their rows, not journaled, are sent again by the
        next run; ImportBlock's idempotence makes that safe). Idempotent."""
        self.summary.interrupted = True
        for cancel in list(self._cancels.values()):
            cancel()
        self._cancels.clear()

    def _send(self, row: Row, attempts: int) -> None:
        assert row.request is not None

        def done(answer: Any) -> None:
            self._answers.put((row, attempts + 1, answer))

        self._cancels[row.line] = self.start_call(row.request, done)

    def _finish(self, outcome: Outcome) -> Outcome:
        self.summary.counts[outcome.kind] += 1
        if outcome.kind == REJECTED:
            self.rejects.write(outcome.row, outcome.code, outcome.message)
        if outcome.kind in FINISHED:
            self.journal.record(outcome.row.line, outcome.kind)
        return outcome


def default_journal(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def default_rejects(path: Path) -> Path:
    return path.with_name(f"{path.stem}.rejected.csv")


def same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return first.resolve() == second.resolve()
