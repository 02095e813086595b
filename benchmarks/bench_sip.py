"""SIP adapter benchmark: `python -m benchmarks.bench_sip` (`make bench BENCH_ARGS=sip`; issue 19).

The issue's target: calls/s through the SIP adapter driven by SIPp at 0 failed calls, as a ratio of unary
Translate/s driven by h2load in the same run, >= 1.0 (a SIP call costs no more than a unary gRPC call end to end).

Seeds BENCH_BINDINGS AXB bindings in a fresh redis-server (bench_translation's seeding and security: a local PKI, a
carrier's API key, the carrier recorded for every seeded block) and starts, both pinned to the server core (CPU 0,
taskset), one translation process as deployed (TLS, the carrier's bearer token checked on every call) and one SIP
adapter (`python -m numprotect.services.sip`) whose credential is the same carrier's token, talking TranslateStream to
that translation. The load side (CPU 1) holds redis-server, h2load, SIPp and this script. In BENCH_ROUNDS interleaved
rounds (the order alternates, so a change of the machine's load hits both alike):
  - h2load drives unary Translate at translation (https, `authorization: Bearer`), BENCH_DURATION, -c BENCH_CLIENTS
    -m BENCH_STREAMS (one request repeated, as bench_translation does);
  - SIPp (UDP, deploy/sip/sipp/bench_uac.xml: INVITE, 100 optional, 302, ACK) drives the adapter with at most
    BENCH_SIP_CONCURRENCY calls open (default: h2load's concurrent calls), about BENCH_DURATION of calls. The calls
    come from injection files: every seeded binding in both directions, shuffled, each run taking the next calls,
    so calls spread over every binding and caller; and SIPp checks every 302 (Contact = the binding's other party,
    P-Asserted-Identity = the dialled 700 number): a wrong or other answer fails the call.
Translation's per-caller and per-binding rate limits are raised as in bench_translation (h2load repeats one request):
the counters still run on every call, they never bite. A SIPp run with a failed call (e.g. a 503: translation missed
the adapter's 200 ms deadline in a stall of the shared host) is repeated at half the open-call limit, down to
MIN_CONCURRENCY: the highest load with 0 failed calls counts. After a warm-up run (1,000 calls, not counted), a
calibration run of 2,000 calls sets the limit of the rounds and the rate that sizes each round's calls (BENCH_DURATION
plus the warm-up second at that rate).
Reports per round and as medians: unary Translate/s with p50/p99 (h2load's request log) and translation's CPU per
call; SIP calls/s with p50/p99 (SIPp's response times INVITE -> 302, 1 ms resolution) and the CPU per call of the
adapter and of translation (/proc/<pid>/stat); the ratio SIP calls/s / unary Translate/s (target >= 1.0) and the
ratio of CPU per call on the server core (unary Translate's over the SIP call's adapter + translation).
Environment: BENCH_ROUNDS (3), BENCH_DURATION (6s), BENCH_CLIENTS (4), BENCH_STREAMS (16), BENCH_BINDINGS (100000),
BENCH_SIP_CONCURRENCY (BENCH_CLIENTS * BENCH_STREAMS), BENCH_SIP_TRANSPORT (u1: SIPp's UDP, one socket; t1: TCP),
BENCH_SIP_TRANSLATE_TIMEOUT (200ms, the adapter's default: on a starved host a longer one keeps stalls from failing
calls, as bench_translation's generous Redis timeout does; h2load's calls have no deadline).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.sipp

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_translation import (
    BINDINGS,
    CLIENTS,
    DURATION,
    LOAD_CPU,
    SERVER_CPU,
    STREAMS_PER_CLIENT,
    TRANSLATE,
    LoadResult,
    Security,
    Server,
    h2load,
    load_side_redis,
    party,
    prepare_security,
    progress,
    seed,
    started_servers,
    translation_server,
    verify_sample,
    virtual,
)
from benchmarks.harness import cpu_seconds, free_port
from benchmarks.load import percentile
from numprotect.core.settings import server_port_variable
from numprotect.translation.v1 import translation_pb2 as pb
from support.sipp import free_port as free_sip_port
from support.sipp import parse_stats

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "deploy" / "sip" / "sipp" / "bench_uac.xml"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONCURRENCY = int(os.environ.get("BENCH_SIP_CONCURRENCY", str(CLIENTS * STREAMS_PER_CLIENT)))
TRANSPORT = os.environ.get("BENCH_SIP_TRANSPORT", "u1")
# The adapter's deadline for one translation (past it: 503, a failed call); the deployed default unless set.
TRANSLATE_TIMEOUT = os.environ.get("BENCH_SIP_TRANSLATE_TIMEOUT", "200ms")
MODEL = "translation/batch/secured"
EGRESS = "127.0.0.1:5070"
CALIBRATION_CALLS = 2000
# A fresh adapter and translation first answer a burst of calls slowly (streams, code paths, allocator): a warm-up
# run that nothing is read from keeps that from halving the open-call limit of the whole benchmark.
WARM_UP_CALLS = 1000
WARM_UP_CONCURRENCY = 8
# At most two halvings: below that the failures are the host's stalls, not the load (see SippRun.stalls).
MIN_CONCURRENCY = 16
# SIPp starts calls as fast as it can: the open-call limit (-l) is what holds the load, as h2load's -c x -m does.
SIPP_RATE = 100_000
# h2load's --warm-up-time: SIPp's first second is left out of the rate and the response times alike.
WARM_UP_MS = 1000


def duration_seconds(text: str) -> float:
    """BENCH_DURATION as h2load reads it (6s, 500ms, 1m, or plain seconds)."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * scale
    return float(text)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port: int = udp.getsockname()[1]
        return port


def injection_rows(bindings: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(caller, dialled 700 number, expected target) for every binding in both directions, shuffled."""
    rows = [(party(i, side), virtual(i), party(i, 1 - side)) for i in range(bindings) for side in (0, 1)]
    rng.shuffle(rows)
    return rows


class Calls:
    """The calls SIPp places, in turn: each run takes the next ones (wrapping round), so the runs spread over every
    binding and caller instead of repeating the first rows."""

    def __init__(self, rows: Sequence[tuple[str, str, str]]) -> None:
        self._rows = rows
        self._next = 0

    def write(self, path: Path, count: int) -> Path:
        """SIPp's -inf file of the next `count` calls: the read order, then one call's fields a line."""
        rows = self._rows
        lines = ["SEQUENTIAL\n"]
        for n in range(self._next, self._next + count):
            caller, called, target = rows[n % len(rows)]
            lines.append(f"{caller};{called};{target}\n")
        self._next = (self._next + count) % len(rows)
        path.write_text("".join(lines))
        return path


@dataclass
class SippRun:
    """One SIPp run against the adapter, and what the server core spent on it."""

    name: str
    concurrency: int
    ok: int
    failed: int
    rate: float  # successful calls per second after the warm-up second
    response_ms: list[int]  # INVITE sent -> 302 received, per call after the warm-up second
    adapter_cpu_us: float  # per call (successful + failed), user + system
    translation_cpu_us: float
    adapter_busy: float  # CPU time over the run's wall time
    translation_busy: float
    errors: str  # the first lines of SIPp's error log when calls failed
    causes: dict[str, float]  # the adapter's own count of what went wrong meanwhile (its metrics)
    stalls: int  # SIPp's own event loop late by >= 500 ms (its watchdog): the host starved the load side

    @property
    def p50_ms(self) -> float:
        return percentile(self.response_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.response_ms, 0.99)

    def line(self) -> str:
        return (
            f"  {self.name:<24} {self.rate:>6.0f} calls/s  p50 {self.p50_ms:4.0f} ms  p99 {self.p99_ms:4.0f} ms  "
            f"CPU adapter {self.adapter_cpu_us:4.0f} + translation {self.translation_cpu_us:4.0f} = "
            f"{self.adapter_cpu_us + self.translation_cpu_us:4.0f} us/call, busy {self.adapter_busy:4.2f} + "
            f"{self.translation_busy:4.2f}  ({self.ok} ok, {self.failed} failed, -l {self.concurrency})"
            + (f"; the adapter counted {describe(self.causes)}" if self.causes else "")
            + (f"; SIPp itself stalled >= 500 ms {self.stalls} times" if self.stalls else "")
        )


def adapter_troubles(metrics_url: str) -> dict[str, float]:
    """What the adapter counted going wrong so far: final responses other than 302 by code, translation failures
    by status, messages dropped by reason, retransmitted requests by method (its metrics, docs/operations.md)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "numprotect_sip_responses_total" and labels.get("code") != "302":
                key = f"{labels.get('method')} {labels.get('code')} sent"
            elif sample.name == "numprotect_sip_translate_failures_total":
                key = f"translation {labels.get('status')}"
            elif sample.name == "numprotect_sip_dropped_total":
                key = f"dropped ({labels.get('reason')})"
            elif sample.name == "numprotect_sip_retransmissions_total":
                key = f"{labels.get('method')} retransmissions"
            else:
                continue
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def counted_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value > before.get(key, 0.0)}


def describe(causes: dict[str, float]) -> str:
    return ", ".join(f"{key}: {value:.0f}" for key, value in sorted(causes.items()))


def read_response_times(rtt_file: Path) -> tuple[list[int], list[float]]:
    """SIPp's -trace_rtt file (`Date_ms;response_time_ms;rtd_no`): the response times and when each call got its
    answer (ms since SIPp started)."""
    times: list[int] = []
    dates: list[float] = []
    for row in rtt_file.read_text().splitlines()[1:]:
        fields = row.split(";")
        if len(fields) >= 3 and fields[2] == "setup":
            dates.append(float(fields[0]))
            times.append(int(float(fields[1])))
    return times, dates


def read_call_counts(stat_file: Path) -> tuple[int, int]:
    """(successful, failed) calls from the last line of SIPp's -trace_stat file (cumulative columns)."""
    stats = parse_stats(stat_file.read_text())
    return int(stats["SuccessfulCall(C)"]), int(stats["FailedCall(C)"])


def steady_rate(dates: Sequence[float]) -> tuple[float, list[bool]]:
    """Calls per second over the calls answered after the warm-up second, and which calls count; a run shorter
    than three warm-ups (the calibration) counts every call."""
    if len(dates) < 2:
        return 0.0, [True] * len(dates)
    first, last = min(dates), max(dates)
    start = first + WARM_UP_MS if last - first >= 3 * WARM_UP_MS else first
    counted = [date >= start for date in dates]
    return (sum(counted) - 1) / (last - start) * 1000 if last > start else 0.0, counted


def run_sipp(
    name: str,
    sip_port: int,
    injection: Path,
    calls: int,
    concurrency: int,
    workdir: Path,
    adapter: int,
    translation: int,
    metrics_url: str,
) -> SippRun:
    """SIPp on LOAD_CPU: `calls` calls at most `concurrency` open at once; every file it writes goes to its own
    directory. `adapter` and `translation` are the process ids whose CPU time is measured, `metrics_url` the
    adapter's metrics (what it counted going wrong)."""
    progress(f"SIPp {name}: {calls} calls, -l {concurrency}")
    run_dir = workdir / name.replace(" ", "_").replace("#", "")
    run_dir.mkdir()
    stat_file, rtt_glob = run_dir / "stat.csv", "*_rtt.csv"
    command = [
        "taskset",
        "-c",
        LOAD_CPU,
        "sipp",
        f"127.0.0.1:{sip_port}",
        "-sf",
        str(SCENARIO),
        "-inf",
        str(injection),
        "-i",
        "127.0.0.1",
        "-p",
        str(free_udp_port() if TRANSPORT.startswith("u") else free_port()),
        "-t",
        TRANSPORT,
        "-r",
        str(SIPP_RATE),
        "-l",
        str(concurrency),
        "-m",
        str(calls),
        # A call whose answer never comes fails after 5 s instead of waiting out the UDP retransmissions.
        "-recv_timeout",
        "5000",
        "-timeout",
        f"{max(60, calls // 200)}s",
        "-timeout_error",
        "-nostdin",
        "-trace_stat",
        "-stf",
        str(stat_file),
        "-fd",
        "1",
        "-trace_rtt",
        "-rtt_freq",
        "1",
        "-trace_err",
        "-error_file",
        str(run_dir / "errors.log"),
    ]
    troubles_before = adapter_troubles(metrics_url)
    cpu_before = cpu_seconds(adapter), cpu_seconds(translation)
    started = time.monotonic()
    result = subprocess.run(command, cwd=run_dir, capture_output=True, text=True, timeout=max(60, calls // 200) + 30)
    wall = time.monotonic() - started
    adapter_cpu, translation_cpu = cpu_seconds(adapter) - cpu_before[0], cpu_seconds(translation) - cpu_before[1]
    causes = counted_since(troubles_before, adapter_troubles(metrics_url))
    rtt_files = sorted(run_dir.glob(rtt_glob))
    if not stat_file.exists() or not rtt_files:
        raise RuntimeError(f"SIPp {name} wrote no statistics (exit {result.returncode}):\n{result.stderr[-2000:]}")
    ok, failed = read_call_counts(stat_file)
    times, dates = read_response_times(rtt_files[0])
    rate, counted = steady_rate(dates)
    errors_file = run_dir / "errors.log"
    error_log = errors_file.read_text() if errors_file.exists() else ""
    errors = error_log[:600] if failed else ""
    total = max(1, ok + failed)
    return SippRun(
        name,
        concurrency,
        ok,
        failed,
        rate,
        [t for t, keep in zip(times, counted, strict=True) if keep],
        adapter_cpu / total * 1e6,
        translation_cpu / total * 1e6,
        adapter_cpu / wall,
        translation_cpu / wall,
        errors,
        causes,
        error_log.count("minor watchdog timer"),
    )


def adapter_server(
    security: Security, redis_url: str, translation_port: int, token_file: Path, sip_port: int, metrics_port: int
) -> Server:
    """The SIP adapter on the server core, a client of `translation_port` with the carrier's token."""
    grpc_port = free_port()
    env = {
        **security.env(),  # TLS for its health server and the CA it checks translation's certificate with
        "NUMPROTECT_REDIS_URL": redis_url,
        server_port_variable("sip"): str(grpc_port),
        "NUMPROTECT_SIP_HOST": "127.0.0.1",
        "NUMPROTECT_SIP_PORT": str(sip_port),
        "NUMPROTECT_SIP_EGRESS": EGRESS,
        "NUMPROTECT_SIP_TRANSLATE_TIMEOUT": TRANSLATE_TIMEOUT,
        "NUMPROTECT_TRANSLATION_ADDR": f"127.0.0.1:{translation_port}",
        "NUMPROTECT_SERVICE_TOKEN_FILE": str(token_file),
        "NUMPROTECT_CPU_SCHEDULING": MODEL.split("/")[1],
        "NUMPROTECT_METRICS": "on",
        "NUMPROTECT_METRICS_PORT": str(metrics_port),
        "NUMPROTECT_LOG_LEVEL": "WARNING",
        "NUMPROTECT_GRACE_PERIOD": "1s",
    }
    return Server(["-m", "numprotect.services.sip"], env, grpc_port, security)


def highest_clean(run: Callable[[str, int, int], SippRun], name: str, calls: int, concurrency: int) -> list[SippRun]:
    """Runs SIPp with at most `concurrency` calls open, halving it after a run with failed calls (down to
    MIN_CONCURRENCY): every attempt, the last being the one that counts (0 failed calls, or the smallest limit)."""
    attempts = [run(name, calls, concurrency)]
    while attempts[-1].failed and concurrency > MIN_CONCURRENCY:
        concurrency //= 2
        attempts.append(run(f"{name} -l {concurrency}", calls, concurrency))
    return attempts


def main() -> int:
    for tool, package in (("h2load", "nghttp2-client"), ("sipp", "sip-tester")):
        if not shutil.which(tool):
            print(f"{tool} not found: install Debian package {package} (make system-deps)")
            return 1
    # This process runs beside h2load, SIPp and Redis, off the server core.
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    duration = duration_seconds(DURATION)
    lines: list[str] = []
    with load_side_redis("bench-sip-") as (workdir, redis_url), started_servers() as servers:
        progress("seeding")
        seconds = asyncio.run(seed(redis_url))
        rows = injection_rows(BINDINGS, random.Random(19))
        call_source = Calls(rows)
        lines.append(
            f"seeded {BINDINGS} AXB bindings in {seconds:.1f}s; SIPp's calls: {len(rows)} (every binding, both "
            f"directions, shuffled), each run taking the next ones"
        )
        pki, key_file, token = prepare_security(workdir, redis_url)
        token_file = workdir / "carrier.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        security = Security(MODEL.split("/")[2], pki, key_file, token)
        translation = translation_server(MODEL, redis_url, security)
        servers.append(translation)
        lines.append(f"translation: verified {verify_sample(translation)} sampled Translate answers: all correct")
        sip_port = free_sip_port()
        progress("starting the SIP adapter")
        metrics_port = free_port()
        adapter = adapter_server(security, redis_url, translation.port, token_file, sip_port, metrics_port)
        servers.append(adapter)
        pids = adapter.process.pid, translation.process.pid
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        def sipp(name: str, count: int, concurrency: int) -> SippRun:
            injection = call_source.write(workdir / f"calls-{name.replace(' ', '_').replace('#', '')}.csv", count)
            return run_sipp(name, sip_port, injection, count, concurrency, workdir, *pids, metrics_url)

        warm_up = sipp("warm-up", WARM_UP_CALLS, WARM_UP_CONCURRENCY)
        calibration = highest_clean(sipp, "calibration", CALIBRATION_CALLS, CONCURRENCY)
        concurrency, rate = calibration[-1].concurrency, calibration[-1].rate
        request = pb.TranslateRequest(calling_number=party(42, 0), called_number=virtual(42), call_id="bench")
        target = translation.target(TRANSLATE, request.SerializeToString())
        unary: list[LoadResult] = []
        sip: list[list[SippRun]] = []
        for round_number in range(1, ROUNDS + 1):
            steps = ("unary", "sip") if round_number % 2 else ("sip", "unary")
            for step in steps:
                if step == "unary":
                    unary.append(h2load(f"translate #{round_number}", target, workdir))
                else:
                    calls = max(CALIBRATION_CALLS, round(rate * (duration + WARM_UP_MS / 1000)))
                    sip.append(highest_clean(sipp, f"sip #{round_number}", calls, concurrency))
                    rate = statistics.median(attempts[-1].rate for attempts in sip)
        lines.extend(report([warm_up, *calibration], unary, sip, os.getloadavg()[0], pids))
    print("\n".join(lines))
    return 0


def report(
    preliminaries: Sequence[SippRun],
    unary: Sequence[LoadResult],
    attempts: Sequence[Sequence[SippRun]],
    load: float,
    pids: tuple[int, int],
) -> list[str]:
    adapter_pid, translation_pid = pids
    sip = [round_attempts[-1] for round_attempts in attempts]
    lines = [
        f"where: translation (pid {translation_pid}) and the SIP adapter (pid {adapter_pid}) share CPU "
        f"{SERVER_CPU}, the server core (taskset); redis-server, h2load, SIPp and this script run on CPU {LOAD_CPU}; "
        f"load average now {load:.1f} (a shared host: compare the ratios, not the absolute figures)",
        f"unary: h2load -D {DURATION} -c {CLIENTS} -m {STREAMS_PER_CLIENT} ({CLIENTS * STREAMS_PER_CLIENT} calls "
        "open), https + the carrier's bearer token, one Translate request repeated",
        f"SIP: SIPp -t {TRANSPORT} -l <calls open at most> {SCENARIO.relative_to(ROOT)} (INVITE, 100, 302, ACK; "
        f"every 302's Contact and P-Asserted-Identity checked), about {DURATION} of calls a round; a run with a "
        f"failed call is repeated at half the -l (from {CONCURRENCY}, down to {MIN_CONCURRENCY}): the highest load "
        f"with 0 failed calls counts. The adapter talks TranslateStream to translation (TLS + the same token) with a "
        f"deadline of {TRANSLATE_TIMEOUT} per call (BENCH_SIP_TRANSLATE_TIMEOUT; 200ms as deployed)",
        "translation's rate limits raised (as bench_translation): the counters run on every call, never bite",
        f"{ROUNDS} interleaved rounds (order alternating); the first second of each run is left out (warm-up)",
        "",
        f"warm-up ({WARM_UP_CALLS} calls, not counted) and calibration ({CALIBRATION_CALLS} calls; sets the -l of the "
        "rounds and the calls of the first):",
        *(run.line() for run in preliminaries),
        "",
        "per round:",
    ]
    for translate_run, round_attempts in zip(unary, attempts, strict=True):
        lines.append(translate_run.line())
        for run in round_attempts[:-1]:
            lines.append(f"{run.line()}  -> repeated at half the -l")
        lines.append(round_attempts[-1].line())
    median_unary = sorted(unary, key=lambda r: r.rps)[len(unary) // 2]
    median_sip = sorted(sip, key=lambda r: r.rate)[len(sip) // 2]
    lines += ["", "median of the rounds:", median_unary.line(), median_sip.line(), ""]
    ratio = median_sip.rate / median_unary.rps
    per_round = ", ".join(f"{s.rate / u.rps:.2f}" for u, s in zip(unary, sip, strict=True))
    failed = sum(run.failed for run in sip)
    verdict = "PASS" if ratio >= 1.0 and not failed else "FAIL"
    lines.append(
        f"SIP calls/s / unary Translate/s = {median_sip.rate:.0f} / {median_unary.rps:.0f} = {ratio:.2f} (target "
        f">= 1.0 at 0 failed calls): {verdict}; per round {per_round}"
    )
    sip_cpu = statistics.median(run.adapter_cpu_us + run.translation_cpu_us for run in sip)
    unary_cpu = statistics.median(run.cpu_us_per_call for run in unary)
    adapter_cpu = statistics.median(run.adapter_cpu_us for run in sip)
    translation_cpu = statistics.median(run.translation_cpu_us for run in sip)
    lines.append(
        f"CPU per call on the server core (medians): unary Translate {unary_cpu:.0f} us (translation); SIP call "
        f"{sip_cpu:.0f} us (adapter {adapter_cpu:.0f} + translation {translation_cpu:.0f}); unary / SIP = "
        f"{unary_cpu / max(1e-9, sip_cpu):.2f} (>= 1.0: a SIP call costs the server core no more than a unary call)"
    )
    lines.append(
        f"response times (median round): unary p50 {median_unary.p50_ms:.1f} / p99 {median_unary.p99_ms:.1f} ms at "
        f"{CLIENTS * STREAMS_PER_CLIENT} open; SIP p50 {median_sip.p50_ms:.0f} / p99 {median_sip.p99_ms:.0f} ms at "
        f"-l {median_sip.concurrency} (INVITE -> 302; SIPp measures whole milliseconds)"
    )
    repeated = sum(len(round_attempts) - 1 for round_attempts in attempts)
    lines.append(
        f"failed SIP calls in the runs that count: {failed} (per round {', '.join(str(r.failed) for r in sip)}); "
        f"runs repeated at a lower -l: {repeated}; h2load failed requests: {sum(r.failed for r in unary)}"
    )
    if failed:
        lines.append(
            "calls failed at every -l tried: with 503s for translation DEADLINE_EXCEEDED and SIPp's own stalls, the "
            "host starved the processes (compare the unary p99); repeat on a quieter host, or with "
            "BENCH_SIP_TRANSLATE_TIMEOUT=1s to ride out stalls as h2load's deadline-free calls do"
        )
    for run in (*preliminaries, *(run for round_attempts in attempts for run in round_attempts)):
        # Failures the adapter answered (503, 404, ...) are in its counts; SIPp's log tells about the others
        # (no answer, a wrong Contact or P-Asserted-Identity).
        answered = sum(n for key, n in run.causes.items() if key.startswith("INVITE ") and key.endswith(" sent"))
        if run.errors and run.failed > answered:
            lines.append(f"{run.name}: SIPp's first errors: {run.errors.strip()[:400]!r}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
