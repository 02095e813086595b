"""`numprotect cdrs list|watch`: call detail records (cdr service)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import grpc
import typer

from numprotect.cdr.v1 import cdr_pb2 as pb
from numprotect.cdr.v1.cdr_pb2_grpc import CdrServiceStub
from numprotect.cli.connection import call_pages, session_of
from numprotect.cli.options import AllPages, PageSize, PageToken, Since, Tenant, Until
from numprotect.cli.output import OutputFormat, OutputOption, Printer, cell, note
from numprotect.cli.times import timestamp

app = typer.Typer(help="Call detail records: a listing, or follow them live.")

LIST_COLUMNS = (
    "call_id",
    "call_time",
    "call_type",
    "calling_number",
    "called_number",
    "target_number",
    "billable_seconds",
    "binding_id",
    "binding_match",
)
# `watch` prints a row per record as it arrives (a table cannot be printed before it is complete): fixed widths.
WATCH_COLUMNS = (("call_time", 21), ("call_id", 24), ("call_type", 18), ("called_number", 16), ("binding_id", 26))
Unmatched = Annotated[bool, typer.Option(help="operator: the records that matched no binding (no --tenant)")]


@app.command("list")
def list_cdrs(
    ctx: typer.Context,
    tenant: Tenant = "",
    binding_id: Annotated[str, typer.Option(help="only this binding's records")] = "",
    out_order_id: Annotated[str, typer.Option(help="only this order's records")] = "",
    since: Since = None,
    until: Until = None,
    unmatched: Unmatched = False,
    page_size: PageSize = 0,
    page_token: PageToken = "",
    all_pages: AllPages = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """A tenant's records (by binding, order, time range), or the unmatched ones."""
    request = pb.ListCdrsRequest(
        tenant_id=tenant,
        binding_id=binding_id,
        out_order_id=out_order_id,
        unmatched=unmatched,
        page_size=page_size,
        page_token=page_token,
    )
    if since is not None:
        request.start_time.CopyFrom(timestamp(since, "--since"))
    if until is not None:
        request.end_time.CopyFrom(timestamp(until, "--until"))
    response = call_pages(ctx, CdrServiceStub, "cdr", "ListCdrs", request, "records", all_pages=all_pages)
    Printer(output).listing(response, "records", LIST_COLUMNS)


class _Arrivals:
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


def _row(values: list[tuple[str, int]]) -> str:
    return "  ".join(value.ljust(width) for value, width in values).rstrip()


@app.command("watch")
def watch(
    ctx: typer.Context,
    tenant: Tenant = "",
    cursor: Annotated[
        str, typer.Option(help='resume after this cursor; "0": from the oldest kept; default: new ones')
    ] = "",
    unmatched: Unmatched = False,
    limit: Annotated[int, typer.Option(min=0, help="stop after this many records (0: never)")] = 0,
    duration: Annotated[float, typer.Option(min=0, help="stop after this many seconds (0: never)")] = 0.0,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Follow records as they are stored, until Ctrl-C (or --limit/--duration). Prints each record with its
    cursor (json: one WatchCdrsResponse per line); on stopping, the cursor to resume from goes to stderr."""
    printer = Printer(output)
    request = pb.WatchCdrsRequest(tenant_id=tenant, cursor=cursor, unmatched=unmatched)
    last_cursor = cursor
    seen = 0
    with session_of(ctx).connect() as connection:
        stub = connection.stub(CdrServiceStub, "cdr")
        # No deadline unless --duration: a watch runs until it is stopped.
        stream = stub.WatchCdrs(request, timeout=duration or None, metadata=connection.metadata)
        if not printer.json:
            printer.line(_row([(name.upper(), width) for name, width in WATCH_COLUMNS] + [("CURSOR", 0)]))
        arrivals = _Arrivals(stream)
        try:
            for response in arrivals:
                if printer.json:
                    printer.message_json(response, indent=None)
                else:
                    record = response.record
                    values = [(cell(record, name), width) for name, width in WATCH_COLUMNS]
                    printer.line(_row([*values, (response.cursor, 0)]))
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
        note(f"{seen} record(s); resume with --cursor {last_cursor}")
    else:
        note(f"{seen} record(s)")
