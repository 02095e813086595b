"""`numprotect pool stats`: per city, numbers by state, the allocation rate and the days of stock left, checked
against a hand computation from the blocks and allocations the test made (real allocation service, real Redis)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.common.v1 import common_pb2
from numprotect.core import pool_keys

from .allocation_cli import allocation_cli, block, write_csv

DAY_S = 86_400


async def test_per_city_figures_and_days_left_match_a_hand_computation(
    redis_env: dict[str, str], redis_sync: Any, tmp_path: Path
) -> None:
    # 010: two blocks; 0755 and 020: one each.
    rows = [f"{block(0)},t1,010,cm", f"{block(1)},t1,010,cm", f"{block(2)},t1,0755,cm", f"{block(3)},t1,020,cm"]
    source = write_csv(tmp_path / "blocks.csv", rows)
    async with allocation_cli(redis_env, tmp_path) as a:
        imported = await a.cli("blocks", "import", str(source), "-o", "json")
        assert imported.exit_code == 0, imported.stderr

        async def allocate(city: str, i: int) -> pb.AllocateNumberResponse:
            request = pb.AllocateNumberRequest(
                tenant_id="t1", mode=common_pb2.BINDING_MODE_AXN, parties=[f"138{i:08d}"], city_code=city
            )
            request.strict_city = True
            return await a.binding.AllocateNumber(request)  # type: ignore[no-any-return]

        async def cancel(reservation: pb.AllocateNumberResponse) -> None:
            await a.binding.CancelReservation(pb.CancelReservationRequest(reservation_id=reservation.reservation_id))

        in_010 = [await allocate("010", i) for i in range(7)]
        for reservation in in_010[:2]:
            await cancel(reservation)  # net 5 in 010
        for i in range(3):
            await allocate("0755", 100 + i)  # net 3
        for reservation in [await allocate("020", 200 + i) for i in range(2)]:
            await cancel(reservation)  # net 0: the free set is not shrinking there
        await a.operator.LockNumber(pb.LockNumberRequest(virtual_number=f"{block(2)}9999", reason="abuse"))

        server_ms = int(redis_sync.time()[0]) * 1000
        result = await a.cli("pool", "stats", "--tenant", "t1", "-o", "json")
        table = await a.cli("pool", "stats", "--tenant", "t1")
        one_city = await a.cli("pool", "stats", "--tenant", "t1", "--city", "0755", "-o", "json")

    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    window_s = float(stats["rate_window"].removesuffix("s"))
    # The window: from 00:00 UTC six days before today (server time) until now.
    expected_window_s = (server_ms - (server_ms // pool_keys.DAY_MS - 6) * pool_keys.DAY_MS) / 1000
    assert abs(window_s - expected_window_s) < 5
    window_days = window_s / DAY_S

    # Hand computation: numbers imported, taken (net of the cancelled ones), locked.
    expected = {
        "010": {"total": 20_000, "in_use": 5, "locked": 0, "net_taken": 5},
        "0755": {"total": 10_000, "in_use": 3, "locked": 1, "net_taken": 3},
        "020": {"total": 10_000, "in_use": 0, "locked": 0, "net_taken": 0},
    }
    cities = {c["city_code"]: c for c in stats["cities"]}
    assert list(cities) == ["010", "020", "0755"]
    for city, want in expected.items():
        got = cities[city]
        available = want["total"] - want["in_use"] - want["locked"]
        rate = want["net_taken"] / window_days
        assert int(got["total"]) == want["total"]
        assert int(got["available"]) == available
        assert int(got.get("in_use", 0)) == want["in_use"]
        assert int(got.get("locked", 0)) == want["locked"]
        assert int(got.get("net_taken", 0)) == want["net_taken"]
        assert abs(got.get("net_taken_per_day", 0.0) - rate) < 1e-9
        if rate > 0:
            assert abs(got["days_of_stock_left"] - available / rate) < 1e-6
        else:
            assert got["days_of_stock_left"] is None
    # 010: 19,995 free at 5 per ~6.x days: about 24,000-28,000 days. The whole tenant: 8 per window.
    assert 19_995 / (5 / 6) <= cities["010"]["days_of_stock_left"] <= 19_995 / (5 / 7)
    assert int(stats["net_taken"]) == 8
    assert int(stats["available"]) == 40_000 - 8 - 1
    assert abs(stats["days_of_stock_left"] - (40_000 - 9) / (8 / window_days)) < 1e-6

    assert table.exit_code == 0, table.stderr
    lines = {line.split("│")[2].strip(): line for line in table.stdout.splitlines() if line.count("│") >= 9}
    assert set(lines) == {"010", "020", "0755", "all"}
    assert "DAYS_LEFT" in table.stdout
    # The table is a second call, a moment after the JSON one: its window is that much longer, and 010's days left
    # grow by ~0.05 a second (19,995 free / 5 taken per window), so compare within a day rather than to the digit.
    days_010 = [float(cell) for cell in re.findall(r"│\s*(\d+\.\d)\s*(?=│|$)", lines["010"])]
    assert days_010, lines["010"]
    assert abs(days_010[-1] - cities["010"]["days_of_stock_left"]) < 1.0, (days_010, cities["010"])
    assert lines["020"].rstrip().rstrip("│").rstrip().endswith("-")  # no net take: no figure
    assert re.search(r"rate over the last [67]\.\d days", table.stdout)

    assert [c["city_code"] for c in json.loads(one_city.stdout)["cities"]] == ["0755"]
    assert int(json.loads(one_city.stdout)["net_taken"]) == 3


async def test_an_operator_must_name_the_tenant(redis_env: dict[str, str], tmp_path: Path) -> None:
    async with allocation_cli(redis_env, tmp_path) as a:
        result = await a.cli("pool", "stats")
    assert result.exit_code == 3
    (line,) = result.stderr.splitlines()
    assert line.startswith("numprotect: INVALID_ARGUMENT: ") and "tenant_id" in line
