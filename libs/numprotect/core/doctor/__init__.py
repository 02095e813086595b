"""numprotect-doctor: the invariant checker operators (and the chaos suite) run against a live Redis.

    report = scan(RedisSettings.from_env(Env(os.environ)))      # blocking; `await scan_async(...)` in a loop
    assert report.clean, report.to_text()

It walks every key under np:* with SCAN (each primary of a cluster in turn), reads in pipelined batches at a
bounded pace, and reports every broken invariant (report.KINDS; docs/operations.md, "Checking invariants").
A suspect whose state can change under live traffic (a create, update or delete in progress) is checked again
after a pause and reported only if it is still broken; what an unfinished create wrote is no violation until its
deadline, 1 s and a recovery round have passed (binding's recovery resolves it by then).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from numprotect.core.doctor.checks import Checks, Finding, Judge
from numprotect.core.doctor.keyspace import Pace, primaries, scan_batches, server_time_ms
from numprotect.core.doctor.report import KINDS, Report, Violation
from numprotect.core.redis_client import RedisClient, create_redis
from numprotect.core.settings import RedisSettings

__all__ = ["KINDS", "Options", "Report", "Violation", "scan", "scan_async", "scan_with"]

# Suspects kept for the second look; past this many, the rest are reported as found (memory stays bounded).
_MAX_SUSPECTS = 10_000


@dataclass(frozen=True)
class Options:
    """How the walk paces itself and judges in-flight work.

    batch: SCAN COUNT and the size of each pipelined read. keys_per_second: the pace, in keys walked and
    members, reservations and CDRs read inside them (0: as fast as Redis answers). create_lease_seconds:
    binding's NUMPROTECT_BINDING_CREATE_LEASE and recovery_seconds its NUMPROTECT_BINDING_RECOVERY_INTERVAL (what
    a create wrote is no violation until its deadline, 1 s and a recovery round have passed).
    grace_seconds: clock skew and in-flight margin. recheck_seconds: the pause before a suspect is checked again
    (0: no second look). listed_per_kind: violations kept per kind in the report.
    """

    batch: int = 200
    keys_per_second: float = 0.0
    create_lease_seconds: float = 10.0
    recovery_seconds: float = 5.0
    grace_seconds: float = 2.0
    recheck_seconds: float = 1.0
    listed_per_kind: int = 100


def scan(settings: RedisSettings, options: Options | None = None) -> Report:
    """Checks every invariant of the Redis `settings` name (blocking; raises RedisError when Redis fails)."""
    return asyncio.run(scan_async(settings, options))


async def scan_async(settings: RedisSettings, options: Options | None = None) -> Report:
    redis = create_redis(settings)
    try:
        return await scan_with(redis, options or Options())
    finally:
        await redis.aclose()


async def scan_with(redis: RedisClient, options: Options) -> Report:
    """The walk over a client the caller owns."""
    started = time.monotonic()
    report = Report(listed_per_kind=options.listed_per_kind)
    if not await redis.ping():
        raise ConnectionError("Redis did not answer PING")
    report.nodes = len(await primaries(redis))
    pace = Pace(options.batch, options.keys_per_second)
    checks = Checks(redis, await _judge(redis, options, report), pace)
    suspects: list[Finding] = []
    async for keys in scan_batches(redis, pace):
        report.walked += len(keys)
        for finding in await checks.run(keys):
            if finding.recheck is not None and options.recheck_seconds > 0 and len(suspects) < _MAX_SUSPECTS:
                suspects.append(finding)
            else:
                report.add(finding.violation)
    for finding in await checks.pool_findings():
        report.add(finding.violation)
    for violation in await _second_look(redis, options, suspects):
        report.add(violation)
    report.seconds = time.monotonic() - started
    return report


async def _judge(redis: RedisClient, options: Options, report: Report) -> Judge:
    offset = await server_time_ms(redis) - time.time_ns() // 1_000_000
    return Judge(
        now_ms=lambda: time.time_ns() // 1_000_000 + offset,
        create_lease_ms=round(options.create_lease_seconds * 1000),
        recovery_ms=round(options.recovery_seconds * 1000),
        grace_ms=round(options.grace_seconds * 1000),
        report=report,
    )


async def _second_look(redis: RedisClient, options: Options, suspects: list[Finding]) -> list[Violation]:
    """The suspects still broken after a pause: the same kind on the same key when their keys are checked again."""
    if not suspects:
        return []
    await asyncio.sleep(options.recheck_seconds)
    again = Checks(redis, await _judge(redis, options, Report()), Pace(options.batch, options.keys_per_second))
    keys = list(dict.fromkeys(f.recheck for f in suspects if f.recheck is not None))
    still: dict[tuple[str, str], list[Violation]] = {}
    for start in range(0, len(keys), options.batch):
        for finding in await again.run(keys[start : start + options.batch]):
            still.setdefault((finding.violation.kind, finding.violation.key), []).append(finding.violation)
    seen = dict.fromkeys((f.violation.kind, f.violation.key) for f in suspects)
    return [violation for pair in seen for violation in still.get(pair, [])]
