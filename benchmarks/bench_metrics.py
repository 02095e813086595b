"""Metrics' cost on the hot path: `python -m benchmarks.bench_metrics` (part of `make bench`).

Seeds BENCH_BINDINGS AXB bindings in a fresh redis-server and starts two translation processes as deployed (TLS, a
carrier's bearer token checked on every call), identical but for NUMPROTECT_METRICS: "on" (the gRPC server families,
the Redis round-trip histogram, /metrics served) and "off" (no metrics concern at all, no-op metric objects). Both
are pinned to CPU 0 (taskset); h2load and Redis run on CPU 1. h2load drives unary Translate (one request repeated)
at each in BENCH_METRICS_ROUNDS alternated rounds (on, off, then off, on, ...: a change in the machine's load hits
both alike), BENCH_DURATION each. Reports each server's median RPS and CPU per call, the ratio on/off of the medians
and per round, PASS when the median ratio is >= 0.97 (issue 21), FAIL otherwise; and a scrape of the "on" server
after the run (Translate's handled count and mean handling time), which must have counted every answered call.
Environment: BENCH_METRICS_ROUNDS (10), BENCH_DURATION (6s), BENCH_CLIENTS (4), BENCH_STREAMS (16), BENCH_BINDINGS.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from pathlib import Path

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
from benchmarks.harness import free_port
from numprotect.translation.v1 import translation_pb2 as pb

ROUNDS = int(os.environ.get("BENCH_METRICS_ROUNDS", "10"))
TARGET = 0.97
MODEL = "translation/batch/secured"


def translate_counts(url: str) -> tuple[float, float, float]:
    """Translate's handled-OK count, and its handling-time sum and count, from a scrape of `url`."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    handled = seconds_sum = seconds_count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("grpc_method") != "Translate":
                continue
            if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_code") == "OK":
                handled = sample.value
            elif sample.name == "grpc_server_handling_seconds_sum":
                seconds_sum = sample.value
            elif sample.name == "grpc_server_handling_seconds_count":
                seconds_count = sample.value
    return handled, seconds_sum, seconds_count


def median(results: list[LoadResult]) -> LoadResult:
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def main() -> int:
    if not shutil.which("h2load"):
        print("h2load not found: install Debian package nghttp2-client (make system-deps)")
        return 1
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    lines: list[str] = []
    try:
        with load_side_redis("bench-metrics-") as (workdir, redis_url), started_servers() as servers:
            return measure(workdir, redis_url, servers, lines)
    finally:
        print("\n".join(lines))


def measure(workdir: Path, redis_url: str, servers: list[Server], lines: list[str]) -> int:
    """The rounds and the report (into `lines`); 1 when the metrics missed calls."""
    progress("seeding")
    seeded = asyncio.run(seed(redis_url))
    lines.append(f"seeded {BINDINGS} AXB bindings in {seeded:.1f}s")
    pki, key_file, token = prepare_security(workdir, redis_url)
    security = Security("secured", pki, key_file, token)
    metrics_port = free_port()
    on = translation_server(
        MODEL, redis_url, security, {"NUMPROTECT_METRICS": "on", "NUMPROTECT_METRICS_PORT": str(metrics_port)}
    )
    servers.append(on)
    off = translation_server(MODEL, redis_url, security, {"NUMPROTECT_METRICS": "off"})
    servers.append(off)
    for name, server in (("on", on), ("off", off)):
        lines.append(f"metrics {name}: verified {verify_sample(server)} sampled Translate answers: all correct")
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    handled_before, _, _ = translate_counts(metrics_url)
    request = pb.TranslateRequest(calling_number=party(42, 0), called_number=virtual(42), call_id="bench")
    body = request.SerializeToString()
    targets = {"on": on.target(TRANSLATE, body), "off": off.target(TRANSLATE, body)}
    runs: dict[str, list[LoadResult]] = {"on": [], "off": []}
    for round_number in range(ROUNDS):
        order = ("on", "off") if round_number % 2 == 0 else ("off", "on")
        for name in order:
            runs[name].append(h2load(f"metrics {name} #{round_number + 1}", targets[name], workdir))
    handled_after, seconds_sum, seconds_count = translate_counts(metrics_url)

    lines.append(
        f"{MODEL} (TLS + carrier token), server on CPU {SERVER_CPU} (taskset), h2load + redis on CPU {LOAD_CPU}; "
        f"h2load -D {DURATION} -c {CLIENTS} -m {STREAMS_PER_CLIENT}; {ROUNDS} alternated rounds; load average "
        f"now {os.getloadavg()[0]:.1f}"
    )
    lines.append("")
    lines.append("median of the rounds (RPS per round):")
    medians = {name: median(results) for name, results in runs.items()}
    for name in ("on", "off"):
        per_round = ", ".join(f"{r.rps:.0f}" for r in runs[name])
        lines.append(f"{medians[name].line().replace(medians[name].name, f'metrics {name}', 1)}   rounds: {per_round}")
    ratio = medians["on"].rps / medians["off"].rps
    per_round_ratios = ", ".join(f"{a.rps / b.rps:.3f}" for a, b in zip(runs["on"], runs["off"], strict=True))
    cpu_ratio = medians["off"].cpu_us_per_call / medians["on"].cpu_us_per_call
    extra_cpu = medians["on"].cpu_us_per_call - medians["off"].cpu_us_per_call
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    lines.append("")
    lines.append(
        f"Translate metrics on / off = {ratio:.3f} (target >= {TARGET}): {verdict}; per round {per_round_ratios}"
    )
    lines.append(
        f"server CPU per call: on {medians['on'].cpu_us_per_call:.0f} us, off {medians['off'].cpu_us_per_call:.0f}"
        f" us ({extra_cpu:+.0f} us/call; calls per core on / off = {cpu_ratio:.3f})"
    )
    answered = sum(r.ok for r in runs["on"])
    counted = handled_after - handled_before
    mean_ms = seconds_sum / seconds_count * 1000 if seconds_count else 0.0
    lines.append(
        f"scrape of the 'on' server: Translate handled OK +{counted:.0f} during the rounds (h2load counted "
        f"{answered} answered outside its warm-up second); mean handling time {mean_ms:.3f} ms"
    )
    if counted < answered:
        lines.append("ERROR: the metrics counted fewer calls than h2load saw answered")
        return 1
    failed = sum(r.failed for results in runs.values() for r in results)
    lines.append(f"h2load failed requests: {failed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
