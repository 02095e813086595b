"""SIPp (Debian's sip-tester) run against a SIP server, with what it saw parsed for the test to assert on.

    sipp = Sipp(("127.0.0.1", port), tmp_path)
    result = await sipp.run("axb.xml", service="700100000000001", rows=[[A, X, B], [B, X, A]])
    result.check()                                   # exit code 0, else an AssertionError with SIPp's errors
    [redirect] = result.received(302)
    assert redirect.header("Contact") == "<sip:13900000002@...;user=phone>"

Every run is bounded: SIPp's own `-timeout` with `-timeout_error` (a run that times out exits non-zero), `-m`
calls, and a kill after `time_limit` + a margin should SIPp itself hang. Its traces go to a fresh folder under the
test's tmp_path: messages (`-trace_msg`), errors (`-trace_err`), the final statistics row (`-trace_stat`) and
the scenarios' <log> actions (`-trace_logs`); `SippResult` holds them parsed. Scenarios are looked up in
deploy/sip/sipp/ unless given as a path.

SIPp exit codes: 0 every call succeeded, 1 at least one failed, 97 stopped by an internal command, 99 ended with
no call processed, 255 a fatal error (including the global timeout with -timeout_error).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import itertools
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypedDict

from typing_extensions import Unpack

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "deploy" / "sip" / "sipp"
SIPP = "sipp"
# Beyond SIPp's own -timeout: how long the runner waits before killing a SIPp that did not exit.
KILL_MARGIN_SECONDS = 5.0

_SEPARATOR = re.compile(r"-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n")
_LOST = "UDP message lost (recv)."
_DIRECTION = re.compile(r"^(UDP|TCP|TLS|SCTP) message (sent|received)\b")
# RFC 3261 7.3.3 compact header forms, so `header("Via")` finds `v:` too.
_COMPACT = {
    "i": "call-id",
    "m": "contact",
    "e": "content-encoding",
    "l": "content-length",
    "c": "content-type",
    "f": "from",
    "k": "supported",
    "s": "subject",
    "t": "to",
    "v": "via",
}
_runs = itertools.count(1)


@dataclass(frozen=True)
class SipMessage:
    """One SIP message SIPp sent or received, as its -trace_msg log shows it."""

    at: float  # Unix time (seconds) SIPp logged it at
    direction: str  # "sent" | "received"
    transport: str  # "UDP" | "TCP"
    text: str
    lost: bool = False  # received, then dropped by the scenario (emulated loss): SIPp acted as if it never came

    @property
    def start_line(self) -> str:
        return self.text.split("\r\n" if "\r\n" in self.text else "\n", 1)[0].strip()

    @property
    def is_response(self) -> bool:
        return self.start_line.startswith("SIP/2.0 ")

    @property
    def status(self) -> int | None:
        """The status code of a response, None for a request."""
        return int(self.start_line.split()[1]) if self.is_response else None

    @property
    def reason_phrase(self) -> str:
        return self.start_line.split(" ", 2)[2] if self.is_response else ""

    @property
    def method(self) -> str:
        """A request's method, or the CSeq method of a response."""
        if self.is_response:
            return (self.header("CSeq") or " ").split()[-1]
        return self.start_line.split()[0]

    @property
    def request_uri(self) -> str:
        return "" if self.is_response else self.start_line.split()[1]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(name, value) in order, folded lines joined (names as written)."""
        lines: list[str] = []
        for line in self.text.splitlines()[1:]:
            if not line.strip():
                break
            if line[0] in " \t" and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        pairs = []
        for line in lines:
            name, _, value = line.partition(":")
            pairs.append((name.strip(), value.strip()))
        return pairs

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive, compact form included), in order."""
        wanted = _COMPACT.get(name.lower(), name.lower())
        return [value for key, value in self.headers if _COMPACT.get(key.lower(), key.lower()) == wanted]

    def header(self, name: str) -> str | None:
        """The first value of header `name`, None when absent."""
        values = self.header_values(name)
        return values[0] if values else None

    @property
    def call_id(self) -> str:
        return self.header("Call-ID") or ""

    def __str__(self) -> str:
        return f"{self.direction} {self.transport} at {self.at:.6f}:\n{self.text}"


def uri_user(value: str) -> str:
    """The user part of the first SIP/tel URI in a header value: '<sip:139...@host;user=phone>' -> '139...'."""
    match = re.search(r"(?:sips?|tel):([^@;>\s]+)", value)
    return match.group(1) if match else ""


def parse_messages(text: str) -> list[SipMessage]:
    """The messages of a SIPp -trace_msg log: blocks after a dashed line stamped with the local time. SIPp appends
    "UDP message lost (recv)." to a received message its scenario dropped (lost="..."), without a line break
    before the next block: such a message is kept with `lost` set."""
    messages: list[SipMessage] = []
    parts = _SEPARATOR.split(text)
    # parts: [before the first block, stamp 1, block 1, stamp 2, block 2, ...]
    for stamp, block in zip(parts[1::2], parts[2::2], strict=True):
        head, _, body = block.lstrip("\n").partition("\n")
        direction = _DIRECTION.match(head)
        if direction is None:
            continue
        body = body.strip("\n")
        lost = body.endswith(_LOST)
        if lost:
            body = body.removesuffix(_LOST).rstrip("\n")
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        messages.append(SipMessage(at, direction.group(2), direction.group(1), body + "\n", lost))
    return messages


def parse_stats(text: str) -> dict[str, str]:
    """The last row of a SIPp -trace_stat CSV (';'-separated), by column name."""
    rows = [row for row in csv.reader(text.splitlines(), delimiter=";") if row]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


@dataclass(frozen=True)
class SippResult:
    """What one SIPp run did: its exit code, every message (when traced), its statistics, errors and logs."""

    returncode: int
    messages: list[SipMessage]
    stats: dict[str, str]
    errors: str
    logs: str
    output: str
    command: list[str]
    folder: Path

    def _count(self, column: str) -> int:
        return int(self.stats.get(column) or 0)

    @property
    def successful_calls(self) -> int:
        return self._count("SuccessfulCall(C)")

    @property
    def failed_calls(self) -> int:
        return self._count("FailedCall(C)")

    def failed(self, cause: str) -> int:
        """Calls failed for `cause`, a column FailedXxx(C) of the statistics: "StrcmpDoesntMatch",
        "RegexpDoesntMatch", "RegexpHdrNotFound", "UnexpectedMessage", "TimeoutOnRecv", "MaxUDPRetrans"..."""
        return self._count(f"Failed{cause}(C)")

    def received(self, status: int | None = None, method: str | None = None) -> list[SipMessage]:
        """Responses SIPp received, optionally only those of `status` and/or CSeq `method`."""
        return [
            m
            for m in self.messages
            if m.direction == "received"
            and m.is_response
            and (status is None or m.status == status)
            and (method is None or m.method == method)
        ]

    def received_requests(self, method: str | None = None) -> list[SipMessage]:
        """Requests SIPp received (a redirect server sends none; a party B scenario does)."""
        return [
            m
            for m in self.messages
            if m.direction == "received" and not m.is_response and (method is None or m.method == method)
        ]

    def sent(self, method: str | None = None) -> list[SipMessage]:
        """Requests SIPp sent (responses it sent too when method is None)."""
        return [m for m in self.messages if m.direction == "sent" and (method is None or m.method == method)]

    def of_call(self, call_id: str) -> list[SipMessage]:
        return [m for m in self.messages if m.call_id == call_id]

    def final_response_times(self, method: str = "INVITE") -> dict[str, float]:
        """Per Call-ID: seconds from the first `method` request sent to the first final (>= 200) response to it
        received, from SIPp's own timestamps (so the harness's scheduling is not in the figure)."""
        first_sent: dict[str, float] = {}
        times: dict[str, float] = {}
        for message in self.messages:
            if message.direction == "sent" and not message.is_response and message.method == method:
                first_sent.setdefault(message.call_id, message.at)
            elif (
                message.direction == "received"
                and message.is_response
                and message.method == method
                and (message.status or 0) >= 200
                and message.call_id in first_sent
                and message.call_id not in times
            ):
                times[message.call_id] = message.at - first_sent[message.call_id]
        return times

    def check(self, calls: int | None = None) -> None:
        """Asserts SIPp exited 0 (and, given `calls`, that this many succeeded), explaining a failure."""
        ok = self.returncode == 0 and (calls is None or self.successful_calls == calls)
        assert ok, self.explain()

    def explain(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        received = "\n".join(str(m) for m in self.messages if m.direction == "received")[-4000:]
        return (
            f"sipp exited {self.returncode} ({self.successful_calls} ok, {self.failed_calls} failed): "
            f"{' '.join(self.command)}\n--- errors:\n{self.errors[-4000:]}\n--- logs:\n{self.logs[-2000:]}\n"
            f"--- received:\n{received}\n--- screen:\n{tail}"
        )


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now (SIPp listens on both with -t t1)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no loopback port free for both UDP and TCP in 100 tries")


class SippOptions(TypedDict, total=False):
    """The options of one run (all optional): see `Sipp.command`."""

    service: str
    calls: int
    rate: float
    limit: int | None
    transport: str
    rows: Sequence[Sequence[str]] | None
    variables: Mapping[str, str] | None
    trace: bool
    local_port: int | None
    extra: Iterable[str]


@dataclass(frozen=True)
class Sipp:
    """Runs SIPp scenarios as a client of the SIP server at `target` (host, port), tracing into `folder`."""

    target: tuple[str, int]
    folder: Path
    local_ip: str = "127.0.0.1"
    extra: Sequence[str] = field(default_factory=tuple)

    def command(
        self,
        scenario: str | Path,
        run_folder: Path,
        *,
        service: str = "",
        calls: int = 1,
        rate: float = 100.0,
        limit: int | None = None,
        transport: str = "u1",
        rows: Sequence[Sequence[str]] | None = None,
        variables: Mapping[str, str] | None = None,
        time_limit: float = 10.0,
        trace: bool = True,
        local_port: int | None = None,
        extra: Iterable[str] = (),
    ) -> list[str]:
        """SIPp's argv for one run: `scenario` (a name in deploy/sip/sipp/ or a path), service (-s, the
        scenario's [service]), calls (-m), rate (-r, calls/s), limit (-l, calls at once), transport ("u1" UDP,
        "t1" TCP: one socket for every call), rows (CSV injection, -inf: [field0], [field1]... of row n for call
        n), variables (-set name value: [$name]), time_limit (SIPp's -timeout, seconds, with -timeout_error),
        trace (the messages traced: off for load), local_port (default: a free one), extra (more arguments)."""
        path = Path(scenario)
        if not path.is_absolute() and not path.exists():
            path = SCENARIOS / path
        host, port = self.target
        argv = [
            SIPP,
            f"{host}:{port}",
            "-sf",
            str(path),
            "-i",
            self.local_ip,
            "-p",
            str(local_port or free_port()),
            "-t",
            transport,
            "-m",
            str(calls),
            "-r",
            f"{rate:g}",
            "-timeout",
            f"{time_limit:g}s",
            "-timeout_error",
            "-nostdin",
            "-trace_err",
            "-error_file",
            str(run_folder / "errors.log"),
            "-trace_stat",
            "-stf",
            str(run_folder / "stats.csv"),
            "-fd",
            "3600",  # one statistics row at the end (plus SIPp's first), not one a minute
            "-trace_logs",
            "-log_file",
            str(run_folder / "logs.log"),
        ]
        if limit is not None:
            argv += ["-l", str(limit)]
        if service:
            argv += ["-s", service]
        if trace:
            argv += ["-trace_msg", "-message_file", str(run_folder / "messages.log")]
        if rows is not None:
            injection = run_folder / "injection.csv"
            injection.write_text("SEQUENTIAL\n" + "".join(";".join(row) + "\n" for row in rows))
            argv += ["-inf", str(injection)]
        for name, value in (variables or {}).items():
            argv += ["-set", name, value]
        return [*argv, *self.extra, *extra]

    def _run_folder(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"sipp-{next(_runs)}-", dir=self.folder))

    async def run(
        self, scenario: str | Path, *, time_limit: float = 10.0, **options: Unpack[SippOptions]
    ) -> SippResult:
        """Runs `scenario` to completion without blocking the event loop (an in-process server keeps serving);
        options as `command`."""
        run_folder = self._run_folder()
        argv = self.command(scenario, run_folder, time_limit=time_limit, **options)
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=run_folder
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), time_limit + KILL_MARGIN_SECONDS)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        assert process.returncode is not None
        return self._result(process.returncode, output.decode(errors="replace"), argv, run_folder)

    def run_blocking(
        self, scenario: str | Path, *, time_limit: float = 10.0, **options: Unpack[SippOptions]
    ) -> SippResult:
        """`run` for callers without an event loop (servers in other processes): blocks until SIPp exits."""
        run_folder = self._run_folder()
        argv = self.command(scenario, run_folder, time_limit=time_limit, **options)
        try:
            done = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=run_folder,
                timeout=time_limit + KILL_MARGIN_SECONDS,
                check=False,
            )
            returncode, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as expired:  # subprocess.run killed it
            returncode, output = -9, expired.stdout or b""
        return self._result(returncode, output.decode(errors="replace"), argv, run_folder)

    @staticmethod
    def _result(returncode: int, output: str, argv: list[str], run_folder: Path) -> SippResult:
        def read(name: str) -> str:
            path = run_folder / name
            return path.read_text(errors="replace") if path.exists() else ""

        return SippResult(
            returncode=returncode,
            messages=parse_messages(read("messages.log")),
            stats=parse_stats(read("stats.csv")),
            errors=read("errors.log"),
            logs=read("logs.log"),
            output=output,
            command=argv,
            folder=run_folder,
        )
