"""`numprotect blocks import FILE.csv`: many blocks into the pools (AllocationService.ImportBlock, operator only),
with progress, several calls in flight, a resumable run and a file of rejected rows (numprotect.cli.block_import;
docs/cli.md, "blocks import")."""

from __future__ import annotations

import getpass
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

from numprotect.allocation.v1 import allocation_pb2
from numprotect.allocation.v1.allocation_pb2_grpc import AllocationServiceStub
from numprotect.cli.block_import import (
    ALREADY_IMPORTED,
    IMPORTED,
    REJECTED,
    UNFINISHED,
    BlockFile,
    ImportRun,
    Journal,
    Outcome,
    Rejects,
    RetryPolicy,
    Summary,
    default_journal,
    default_rejects,
    read_block_file,
    same_file,
)
from numprotect.cli.connection import Connection, session_of
from numprotect.cli.failures import EXIT_USAGE, CliError
from numprotect.cli.output import OutputFormat, OutputOption, Printer, note

app = typer.Typer(help="Number blocks: import many from a CSV file. Operator only.")

# Exit statuses of `blocks import` beyond the common ones (numprotect.cli.failures): every row was sent, and some
# were rejected (see the rejects file); some rows still failed transiently after every retry (run it again).
EXIT_ROWS_REJECTED = 21
EXIT_ROWS_UNFINISHED = 22


class RateColumn(ProgressColumn):
    """Rows per second over rich's recent samples."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- rows/s" if speed is None else f"{speed:.1f} rows/s")


class EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        remaining = task.time_remaining
        if task.finished:
            remaining = 0
        return Text("ETA -:--:--" if remaining is None else f"ETA {_clock(remaining)}")


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _tally(summary: Summary) -> str:
    counts = summary.counts
    return f"imported {counts[IMPORTED]} · already {counts[ALREADY_IMPORTED]} · rejected {counts[REJECTED]}" + (
        f" · unfinished {counts[UNFINISHED]}" if counts[UNFINISHED] else ""
    )


class Display:
    """Progress on stderr: a rich bar (count, rate, ETA) on a terminal; otherwise a plain line every `every`
    seconds (none when 0), so logs of unattended runs show where it is; with JSON output on a pipe, nothing."""

    def __init__(self, summary: Summary, *, every: float, quiet: bool) -> None:
        self.summary = summary
        self.console = Console(stderr=True)
        self.every = every
        self.quiet = quiet
        self.started = time.monotonic()
        self.last_line = self.started
        self.progress: Progress | None = None
        self.task_id: Any = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]importing"),
                BarColumn(),
                MofNCompleteColumn(table_column=Column(no_wrap=True)),
                # On a narrow terminal the tally is cut short rather than the figures wrapped.
                RateColumn(table_column=Column(no_wrap=True)),
                EtaColumn(table_column=Column(no_wrap=True)),
                TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                console=self.console,
                speed_estimate_period=10.0,
            )
            self.progress.start()
            done = self.summary.skipped
            self.task_id = self.progress.add_task(_tally(self.summary), total=self.summary.rows, completed=done)
        return self

    def advance(self, outcome: Outcome) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, advance=1, description=_tally(self.summary))
            return
        now = time.monotonic()
        if self.quiet or not self.every or now - self.last_line < self.every:
            return
        self.last_line = now
        done = self.summary.finished
        sent = done - self.summary.skipped
        rate = sent / max(now - self.started, 1e-9)
        eta = f"ETA {_clock((self.summary.rows - done) / rate)}" if rate > 0 else "ETA -:--:--"
        note(f"importing {done}/{self.summary.rows} rows, {rate:.1f} rows/s, {eta}: {_tally(self.summary)}")

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _start_call(connection: Connection) -> Callable[..., Callable[[], None]]:
    method = connection.stub(AllocationServiceStub, "allocation").ImportBlock

    def start(request: allocation_pb2.ImportBlockRequest, done: Callable[[Any], None]) -> Callable[[], None]:
        future = method.future(request, timeout=connection.timeout, metadata=connection.metadata)

        def answered(call: Any) -> None:
            try:
                done(call.result())
            except grpc.RpcError as error:
                done(error)
            except grpc.FutureCancelledError:
                pass  # cancelled by an interrupted run: the row is not journaled and is sent again on resume

        future.add_done_callback(answered)
        return future.cancel  # type: ignore[no-any-return]

    return start


def _summary_dict(summary: Summary, block_file: BlockFile, journal: Path, rejects: Path, seconds: float) -> Any:
    counts = summary.counts
    return {
        "input": str(block_file.path),
        "rows": summary.rows,
        "imported": counts[IMPORTED],
        "already_imported": counts[ALREADY_IMPORTED],
        "rejected": counts[REJECTED],
        "skipped": summary.skipped,
        "skipped_rejected": summary.skipped_rejected,
        "unfinished": counts[UNFINISHED],
        "retries": summary.retries,
        "interrupted": summary.interrupted,
        "rejects_file": str(rejects) if counts[REJECTED] or summary.skipped_rejected else "",
        "journal": str(journal),
        "elapsed_seconds": round(seconds, 3),
    }


def _print_summary(printer: Printer, result: dict[str, Any]) -> None:
    if printer.json:
        printer.line(json.dumps(result, indent=2))
        return
    shown = ("rows", "imported", "already_imported", "rejected", "skipped", "skipped_rejected", "unfinished", "retries")
    printer.table(["RESULT", "ROWS"], ([name, str(result[name])] for name in shown), title="blocks import")
    if result["rejects_file"]:
        note(f"rejected rows (with their status): {result['rejects_file']}")
    if result["unfinished"]:
        note("some rows still failed after every retry: run the same command again to finish them")


@app.command("import")
def import_blocks(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with a header: block,tenant_id,city_code,carrier_id")],
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="ImportBlock calls in flight")] = 8,
    journal: Annotated[
        Path | None, typer.Option(help="journal of finished rows [FILE.journal]; resumes if it exists")
    ] = None,
    rejects: Annotated[Path | None, typer.Option(help="rejected rows, CSV [FILE's name .rejected.csv]")] = None,
    actor: Annotated[str, typer.Option(help="who imports, for the number history [your login]")] = "",
    retries: Annotated[int, typer.Option(min=0, max=20, help="tries again per row on UNAVAILABLE & co.")] = 5,
    progress_every: Annotated[
        float, typer.Option(min=0, help="off a terminal: a progress line every N seconds on stderr (0: none)")
    ] = 10.0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Import every block of FILE (one ImportBlock each, several in flight), resumably.

    Rows its journal says a previous run finished are skipped; rejected rows go to the rejects file, the run goes on.

    Exit status: 0 all rows done; 21 rows rejected (by this run or the one it resumed); 22 rows unfinished (retry).
    """
    journal_path = journal or default_journal(file)
    rejects_path = rejects or default_rejects(file)
    for other, option in ((journal_path, "--journal"), (rejects_path, "--rejects")):
        if file.exists() and same_file(file, other):
            raise CliError(f"{option} {other} is the input file", EXIT_USAGE)
    block_file = read_block_file(file, actor or _login())
    printer = Printer(output)
    started = time.monotonic()
    # The context first (a missing one leaves no journal or rejects file behind), then the files, then the calls.
    with session_of(ctx).connect() as connection, _opened(journal_path, rejects_path, block_file) as (done, rejected):
        run = ImportRun(
            block_file,
            done,
            rejected,
            _start_call(connection),
            concurrency=concurrency,
            retry=RetryPolicy(attempts=retries + 1),
        )
        if run.summary.skipped:
            note(f"resuming: {run.summary.skipped} of {run.summary.rows} rows finished earlier ({journal_path})")
        with (
            _signals_interrupt(run) as received,
            Display(run.summary, every=progress_every, quiet=printer.json) as display,
        ):
            for outcome in run.events():
                display.advance(outcome)
    result = _summary_dict(run.summary, block_file, journal_path, rejects_path, time.monotonic() - started)
    _print_summary(printer, result)
    if received:
        note(f"interrupted: run the same command again to resume ({journal_path})")
        raise typer.Exit(128 + received[0])
    if result["unfinished"]:
        raise typer.Exit(EXIT_ROWS_UNFINISHED)
    if result["rejected"] or result["skipped_rejected"]:
        raise typer.Exit(EXIT_ROWS_REJECTED)


@contextmanager
def _opened(journal_path: Path, rejects_path: Path, block_file: BlockFile) -> Iterator[tuple[Journal, Rejects]]:
    try:
        journal = Journal(journal_path, block_file)
    except OSError as exc:
        raise CliError(f"--journal {journal_path}: {exc.strerror}", EXIT_USAGE) from exc
    try:
        try:
            rejects = Rejects(rejects_path, block_file.header, append=journal.resumed)
        except OSError as exc:
            raise CliError(f"--rejects {rejects_path}: {exc.strerror}", EXIT_USAGE) from exc
        try:
            yield journal, rejects
        finally:
            rejects.close()
    finally:
        journal.close()


@contextmanager
def _signals_interrupt(run: ImportRun) -> Iterator[list[int]]:
    """While the run goes on, Ctrl-C (SIGINT) and SIGTERM only ask it to stop (`interrupt`): it cancels the calls
    in flight at a safe point and the summary is printed. (A KeyboardInterrupt raised anywhere, e.g. inside gRPC's
    code while it holds a lock, could leave the process hung.) Yields the signals received. Off the main thread
    (a test's CliRunner) no handler can be set and none is."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        run.interrupt()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handling in previous.items():
            signal.signal(signum, handling)


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"
