"""The invariant checker on real state: zero violations on what the services made, then each kind of violation
planted directly in Redis is reported with its kind and key, and nothing else is."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doctor.state import BLOCK, CITY, OTHER_TENANT, SUBPOOLS, TENANT, doctor_options, made_state

from numprotect.core.binding_records import binding_key, number_history_key, order_key
from numprotect.core.cdr_keys import Bucket
from numprotect.core.doctor import KINDS, Report, scan_async
from numprotect.core.doctor.report import (
    BINDING_HISTORY_GAP,
    BINDING_WITHOUT_ROUTES,
    DUPLICATE_CDR,
    NUMBER_IN_TWO_POOLS,
    POOL_COUNTERS,
    RESERVATION_WITHOUT_BINDING,
    ROUTE_WITHOUT_BINDING,
)
from numprotect.core.phone import mask
from numprotect.core.pool_keys import (
    PoolLayout,
    hash_key_in,
    pool_key,
    reservations_key_in,
    subpool_of,
    subpool_share,
)
from numprotect.core.routes import MODE_AXB, RESTRICTION_NONE, Route, caller_key
from numprotect.core.settings import RedisSettings

GHOST = "b00000000000000ghost0"  # a binding id no record has


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _found(report: Report) -> set[tuple[str, str]]:
    return {(v.kind, v.key) for v in report.violations}


def _ghost_route(virtual_number: str, expire_ms: int) -> str:
    return Route(
        GHOST, TENANT, MODE_AXB, "13900000009", "13800000009", RESTRICTION_NONE, False, False, expire_ms
    ).encode()


async def test_state_made_by_the_services_is_clean_and_each_planted_violation_is_reported_alone(
    redis_env: dict[str, str], redis_sync: Any, tmp_path: Path, doctor_redis: RedisSettings
) -> None:
    async with made_state(redis_env, redis_sync, tmp_path) as state:
        report = await scan_async(doctor_redis, doctor_options())
        assert report.clean, report.to_text()
        assert report.in_flight == 0  # every create is past its lease: everything was judged
        # Every family was read (the checks ran on real keys, not on an empty Redis).
        assert report.scanned["route keys"] >= 6
        assert report.scanned["binding records"] == 6
        assert report.scanned["reservations"] >= 4
        assert report.scanned["pools"] == 2
        assert report.scanned["sub-pools"] == SUBPOOLS[TENANT] + SUBPOOLS[OTHER_TENANT]
        assert report.scanned["block owners"] == 2
        assert report.scanned["CDRs"] == 3

        b = state.bindings
        axb, updated, axe = b["axb"], b["axb_updated"], b["axe"]
        x = axb.virtual_number
        later = _now_ms() + 3_600_000
        pool = pool_key(TENANT, CITY)
        other_pool = pool_key(OTHER_TENANT, CITY)
        subpools = PoolLayout.of(TENANT, CITY, SUBPOOLS[TENANT]).keys
        x_pool = subpools[subpool_of(x, len(subpools))]  # the sub-pool holding x
        x_reservations = reservations_key_in(x_pool, x)
        # A free number of sub-pool 1 (x_pool's numbers serve bindings).
        ones = (f"{BLOCK}{i:04d}" for i in range(1, 100, len(subpools)))
        stray = next(n for n in ones if redis_sync.sismember(f"{subpools[1]}:avail", n))
        stream = Bucket(TENANT).stream
        first_entry = redis_sync.xrange(stream, count=1)[0]
        call_id = "call-1"
        rid = "0123456789abcdef"

        def plant_ghost_route(r: Any) -> None:
            r.set(caller_key(x, "13900000009"), _ghost_route(x, later), pxat=later)

        def drop_a_route(r: Any) -> None:
            r.delete(caller_key(updated.virtual_number, updated.party_b))

        def plant_unconfirmed_reservation(r: Any) -> None:
            r.zadd(x_reservations, {rid: later})
            r.hset(hash_key_in(x_pool, x), f"r:{rid}", "AXB|13900000009|13800000009||")

        def plant_reservation_of_ghost(r: Any) -> None:
            r.zadd(x_reservations, {rid: later})
            r.hset(hash_key_in(x_pool, x), f"r:{rid}", f"AXB|13900000009|13800000009||{GHOST}")

        def import_block_twice(r: Any) -> None:
            # The other tenant's pool gets this tenant's block in full, counters consistent: only ownership breaks.
            numbers = [f"{BLOCK}{i:04d}" for i in range(10_000)]
            r.sadd(f"{other_pool}:blocks", BLOCK)
            for start in range(0, len(numbers), 1000):
                r.sadd(f"{other_pool}:avail", *numbers[start : start + 1000])
            r.hincrby(other_pool, "total", 10_000)

        def miscount_pool(r: Any) -> None:
            r.hincrby(pool, "total", 1)

        def free_a_number_in_use(r: Any) -> None:
            r.sadd(f"{x_pool}:avail", x)  # x serves the AXB binding: it is in its sub-pool's axb set

        def import_into_subpool_0_only(r: Any) -> None:
            # An import that stopped after its first script (sub-pool 0's): the other sub-pools lack the block.
            block = "70010000002"
            r.sadd(f"{pool}:blocks", block)
            r.sadd(f"{pool}:avail", *(f"{block}{i:04d}" for i in range(0, 10_000, len(subpools))))
            r.hincrby(pool, "total", subpool_share(0, len(subpools)))

        def move_a_number_to_another_subpool(r: Any) -> None:
            r.srem(f"{subpools[1]}:avail", stray)  # two slots: no SMOVE
            r.sadd(f"{pool}:avail", stray)

        def store_cdr_twice(r: Any) -> None:
            r.xadd(stream, {"p": first_entry[1][b"p"]})

        def lose_an_event(r: Any) -> None:
            r.hdel(binding_key(updated.binding_id), "h2")  # its update event

        def lose_history_entry(r: Any) -> None:
            r.zrem(number_history_key(axe.virtual_number), axe.binding_id)

        plants: list[tuple[str, Callable[[Any], None], list[str], tuple[str, str] | set[tuple[str, str]]]] = [
            (
                "route of no binding",
                plant_ghost_route,
                [caller_key(x, "13900000009")],
                (ROUTE_WITHOUT_BINDING, f"np:rt:{{{x}}}:c:{mask('13900000009')}"),
            ),
            (
                "binding lost a route",
                drop_a_route,
                [caller_key(updated.virtual_number, updated.party_b)],
                (BINDING_WITHOUT_ROUTES, binding_key(updated.binding_id)),
            ),
            (
                "unconfirmed reservation beyond the lease",
                plant_unconfirmed_reservation,
                [x_reservations, hash_key_in(x_pool, x)],
                (RESERVATION_WITHOUT_BINDING, x_reservations),
            ),
            (
                "reservation confirmed for no binding",
                plant_reservation_of_ghost,
                [x_reservations, hash_key_in(x_pool, x)],
                (RESERVATION_WITHOUT_BINDING, x_reservations),
            ),
            (
                "block in two tenants' pools",
                import_block_twice,
                [other_pool, f"{other_pool}:blocks", f"{other_pool}:avail"],
                (NUMBER_IN_TWO_POOLS, f"{other_pool}:blocks"),
            ),
            ("pool total off by one", miscount_pool, [pool], (POOL_COUNTERS, pool)),
            ("number both in use and free", free_a_number_in_use, [f"{x_pool}:avail"], (POOL_COUNTERS, x_pool)),
            (
                "import that reached sub-pool 0 only",
                import_into_subpool_0_only,
                [pool, f"{pool}:blocks", f"{pool}:avail"],
                {(POOL_COUNTERS, f"{key}:blocks") for key in subpools[1:]},
            ),
            (
                "number in another sub-pool than its own",
                move_a_number_to_another_subpool,
                [f"{pool}:avail", f"{subpools[1]}:avail"],
                {(POOL_COUNTERS, pool), (POOL_COUNTERS, subpools[1])},  # a stranger in 0; 1 short of its total
            ),
            (
                "CDR stored twice",
                store_cdr_twice,
                [stream],
                (DUPLICATE_CDR, Bucket(TENANT).dedup("cmcc", call_id)),
            ),
            (
                "update event lost",
                lose_an_event,
                [binding_key(updated.binding_id)],
                (BINDING_HISTORY_GAP, binding_key(updated.binding_id)),
            ),
            (
                "missing from the number's history",
                lose_history_entry,
                [number_history_key(axe.virtual_number)],
                (BINDING_HISTORY_GAP, binding_key(axe.binding_id)),
            ),
        ]
        for name, plant, touched, expected in plants:
            saved = {key: (redis_sync.dump(key), redis_sync.pttl(key)) for key in touched}
            plant(redis_sync)
            wanted = expected if isinstance(expected, set) else {expected}
            try:
                report = await scan_async(doctor_redis, doctor_options())
                assert _found(report) == wanted, f"{name}: {report.to_text(examples=10)}"
                (kind,) = {kind for kind, _ in wanted}
                assert report.counts[kind] == sum(report.counts.values()) >= len(wanted), name
            finally:
                for key, (dumped, ttl) in saved.items():
                    redis_sync.delete(key)
                    if dumped is not None:
                        redis_sync.restore(key, max(ttl, 0), dumped)
            if plant is free_a_number_in_use:
                assert any(f"1 number(s) both axb and avail (e.g. {x})" in v.detail for v in report.violations)
            if plant is move_a_number_to_another_subpool:
                stranger = f"1 number(s) of another sub-pool of the pool (e.g. {stray})"
                assert any(stranger in v.detail for v in report.violations)
        assert (await scan_async(doctor_redis, doctor_options())).clean  # everything restored


async def test_what_an_unfinished_create_wrote_is_judged_by_its_order_key_deadline_and_recovery(
    redis_sync: Any, doctor_redis: RedisSettings
) -> None:
    """A create's pending record and routes (expiring at its deadline D) are in flight until D + 1 s + a recovery
    round; routes of an uncommitted create lasting past D are a violation at once; past the window an uncommitted
    create's routes are; a create whose order key is done (the commit landed) is judged as committed."""
    x, party_a, party_b = "700100000000042", "13900000042", "13800000042"
    keys = {(ROUTE_WITHOUT_BINDING, f"np:rt:{{{x}}}:c:{mask(party)}") for party in (party_a, party_b)}
    options = doctor_options(create_lease_seconds=60, recovery_seconds=5)

    def plant(create_ms: int, order: str, routes_until_ms: int) -> None:
        later = _now_ms() + 3_600_000
        fields = {
            "t": TENANT, "o": "o-pending", "m": str(MODE_AXB), "a": party_a, "b": party_b, "x": x, "e": "",
            "c": CITY, "r": "1", "cms": str(create_ms), "ems": str(later), "ums": str(create_ms), "dms": "0",
            "st": "p", "n": "1", "h1": f"create|{create_ms}|b={party_b},exp={later}",
        }  # fmt: skip
        redis_sync.hset(binding_key(GHOST), mapping=fields)
        redis_sync.zadd(number_history_key(x), {GHOST: later})
        redis_sync.set(order_key(TENANT, "o-pending"), order.format(deadline=create_ms + 60_000))
        route = Route(GHOST, TENANT, MODE_AXB, party_a, party_b, RESTRICTION_NONE, False, False, later).encode()
        for party in (party_a, party_b):
            redis_sync.set(caller_key(x, party), route, pxat=routes_until_ms)

    now = _now_ms()
    plant(now, f"p|{GHOST}|2{'0' * 16}|{{deadline}}", now + 60_000)  # the routes expire at D
    report = await scan_async(doctor_redis, options)
    assert report.clean, report.to_text()
    assert report.in_flight == 2

    plant(now, f"p|{GHOST}|2{'0' * 16}|{{deadline}}", now + 3_600_000)  # the routes outlive D: at once
    report = await scan_async(doctor_redis, options)
    assert _found(report) == keys
    assert all("not committed" in v.detail and "past its deadline" in v.detail for v in report.violations)

    long_ago = _now_ms() - 120_000  # D + 1 s + the recovery round have passed
    plant(long_ago, f"p|{GHOST}|2{'0' * 16}|{{deadline}}", _now_ms() + 3_600_000)
    report = await scan_async(doctor_redis, options)
    assert _found(report) == keys
    assert all(GHOST in v.detail for v in report.violations)

    # The commit landed (order key done) but the record was not completed: a committed binding, routes and all.
    plant(long_ago, f"d|{GHOST}|2{'0' * 16}|0", _now_ms() + 3_600_000)
    report = await scan_async(doctor_redis, options)
    assert report.clean, report.to_text()
    assert report.scanned["binding records"] == 1


def _doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "numprotect.core.doctor", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_exit_status_json_and_masked_text(redis_env: dict[str, str], redis_sync: Any) -> None:
    clean = _doctor("--output", "json", "--recheck", "0", env=redis_env)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["clean"] is True

    party, x = "13912345678", "700100000000007"
    later = _now_ms() + 3_600_000
    redis_sync.set(caller_key(x, party), _ghost_route(x, later), pxat=later)
    found = _doctor("--output", "json", "--recheck", "0.05", env=redis_env)
    assert found.returncode == 1, found.stderr
    body = json.loads(found.stdout)
    assert body["clean"] is False
    assert body["counts"] == {kind: int(kind == ROUTE_WITHOUT_BINDING) for kind in KINDS}
    assert body["violations"][0]["key"] == f"np:rt:{{{x}}}:c:{mask(party)}"

    text = _doctor(env=redis_env)
    assert text.returncode == 1
    assert "FAIL       1  route_without_binding" in text.stdout
    assert party not in text.stdout and mask(party) in text.stdout  # numbers are masked, as in logs


def test_command_answers_2_on_a_bad_setting_or_an_unreachable_redis(redis_env: dict[str, str]) -> None:
    bad = _doctor("--batch", "0", env=redis_env)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "--batch" in bad.stderr
    # A port nothing listens on (Redis refuses the connection): status 2, one line naming the URL.
    down = _doctor("--redis-url", "redis://127.0.0.1:1/0", "--redis-mode", "standalone", env=redis_env)
    assert down.returncode == 2
    assert "redis://127.0.0.1:1/0" in down.stderr and len(down.stderr.strip().splitlines()) == 1


async def test_the_walk_keeps_to_its_pace(redis_sync: Any, doctor_redis: RedisSettings) -> None:
    """--keys-per-second bounds the walk from above (what makes it safe on a live Redis): 600 keys at 1,000 keys/s
    take at least 0.5 s (the first batch goes at once), and every key is still walked; a key of the wrong type is
    counted as not judged, not a crash."""
    for start in range(0, 600, 100):
        pipe = redis_sync.pipeline(transaction=False)
        for i in range(start, start + 100):
            pipe.set(f"np:pace:{{{i}}}", "x")
        pipe.execute()
    redis_sync.set(binding_key("b-not-a-hash"), "x")  # a key of a record's name but another type: not judged
    started = time.monotonic()
    report = await scan_async(doctor_redis, doctor_options(batch=50, keys_per_second=1000))
    assert time.monotonic() - started >= 0.5
    assert report.clean
    assert report.walked >= 601
    assert report.unchecked == {"keys of an unexpected type": 1}
    assert report.scanned == {}  # no family the checks read: the walk itself was paced
