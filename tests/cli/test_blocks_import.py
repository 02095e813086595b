"""`numprotect blocks import`: a CSV of many blocks into the real allocation service (TLS, auth, real Redis): the
summary and exit status, the rejects file, the blocks in the pools, a resumed run (journal; a killed process) that
imports no block twice, the progress bar on a pseudo-terminal."""

from __future__ import annotations

import asyncio
import csv
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

from numprotect.allocation.v1 import allocation_pb2 as pb
from numprotect.cli.block_import import JOURNAL_HEADER, read_block_file
from numprotect.core import pool_keys
from support.tcp_proxy import LatencyProxy

from .allocation_cli import HEADER, allocation_cli, block, write_csv
from .conftest import write_secret


def good_rows(count: int, first: int = 0) -> list[str]:
    """`count` valid rows of tenant t1, cities 010 and 0755 in turn."""
    return [f"{block(i)},t1,{'010' if i % 2 == 0 else '0755'},cm" for i in range(first, first + count)]


async def test_many_rows_with_bad_ones_summary_rejects_and_pools(
    redis_env: dict[str, str], redis_sync: Any, tmp_path: Path
) -> None:
    taken = block(900)  # another tenant's block
    rows = good_rows(26)
    rows.insert(3, "12345,t1,010,cm")  # INVALID_ARGUMENT (block)
    rows.insert(7, f"{block(901)},t1,010")  # three fields: a bad CSV row
    rows.insert(12, f"{taken},t1,010,cm")  # FAILED_PRECONDITION (another tenant's)
    rows.append(rows[0])  # the same block again: already imported
    source = write_csv(tmp_path / "blocks.csv", rows)
    assert len(rows) == 30
    async with allocation_cli(redis_env, tmp_path) as a:
        await a.operator.ImportBlock(
            pb.ImportBlockRequest(block=taken, tenant_id="t2", city_code="010", carrier_id="cm")
        )
        result = await a.cli("blocks", "import", str(source), "--concurrency", "4", "-o", "json")
        stats = await a.operator.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1"))
        calls = await a.import_calls()

    assert result.exit_code == 21, result.stderr  # some rows rejected
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("rows", "imported", "already_imported", "rejected", "skipped", "unfinished")} == {
        "rows": 30,
        "imported": 26,
        "already_imported": 1,
        "rejected": 3,
        "skipped": 0,
        "unfinished": 0,
    }
    assert result.stderr == ""  # JSON off a terminal: no progress lines

    rejects = tmp_path / "blocks.rejected.csv"
    assert summary["rejects_file"] == str(rejects)
    with rejects.open(newline="") as handle:
        rejected = list(csv.reader(handle))
    assert rejected[0] == [*HEADER.split(","), "code", "message"]
    by_block = {r[0]: r for r in rejected[1:]}
    assert sorted(by_block) == sorted(["12345", block(901), taken])
    assert by_block["12345"][:4] == ["12345", "t1", "010", "cm"]
    assert by_block["12345"][4] == "INVALID_ARGUMENT" and "BadRequest block:" in by_block["12345"][5]
    # The short row is padded: its code and message under their headings, the missing carrier_id an empty cell.
    assert by_block[block(901)] == [block(901), "t1", "010", "", "BAD_CSV_ROW", "line 9: 3 fields, the header has 4"]
    assert by_block[taken][4] == "FAILED_PRECONDITION" and "another tenant" in by_block[taken][5]

    # The 26 blocks are in t1's pools (13 per city), each imported by exactly one call (its repeat answered OK too).
    assert [(c.city_code, c.total) for c in stats.cities] == [("010", 130_000), ("0755", 130_000)]
    for i in range(26):
        owner = redis_sync.hgetall(pool_keys.block_owner_key(block(i)))
        assert owner[b"tenant"] == b"t1"
    assert calls[block(0)] == ["OK", "OK"]
    assert all(calls[block(i)] == ["OK"] for i in range(1, 26))
    assert block(901) not in calls  # rejected here, never sent


async def test_a_journal_makes_the_run_skip_finished_rows(redis_env: dict[str, str], tmp_path: Path) -> None:
    source = write_csv(tmp_path / "blocks.csv", good_rows(12))
    digest = read_block_file(source, "x").sha256
    # Rows on lines 2..6 finished by an earlier run (one of them rejected), as its journal says.
    journal = tmp_path / "blocks.csv.journal"
    journal.write_text(f"{JOURNAL_HEADER}{digest}\n2\timported\n3\timported\n4\talready_imported\n5\trejected\n6\timp")
    async with allocation_cli(redis_env, tmp_path) as a:
        result = await a.cli("blocks", "import", str(source), "-o", "json")
        calls = await a.import_calls()
        again = await a.cli("blocks", "import", str(source), "-o", "json")
    assert result.exit_code == 21, result.stderr  # the earlier run rejected a row
    summary = json.loads(result.stdout)
    # Line 6's entry was cut short (a kill while writing it): that row is done again.
    assert (summary["skipped"], summary["imported"], summary["already_imported"]) == (4, 8, 0)
    assert (summary["rejected"], summary["skipped_rejected"]) == (0, 1)
    assert sorted(calls) == sorted(block(i) for i in range(4, 12))
    entries = [line.split("\t") for line in journal.read_text().splitlines()[1:]]
    assert entries[4] == ["6", "imp"]  # left as it was; the next entry starts on a line of its own
    assert sorted(int(number) for number, outcome in entries if outcome != "imp") == list(range(2, 14))
    # A finished journal: a run again does nothing.
    assert json.loads(again.stdout)["skipped"] == 12 and json.loads(again.stdout)["imported"] == 0


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill", "ctrl-c", "term"])
async def test_a_stopped_run_resumes_and_imports_no_block_twice(
    redis_env: dict[str, str], tmp_path: Path, stop: signal.Signals
) -> None:
    total = 40
    source = write_csv(tmp_path / "blocks.csv", good_rows(total))
    journal = tmp_path / "blocks.csv.journal"

    def finished_lines() -> int:
        return max(0, len(journal.read_text().splitlines()) - 1) if journal.exists() else 0

    async with allocation_cli(redis_env, tmp_path) as a:
        first = await asyncio.to_thread(a.popen, "blocks", "import", str(source), "--concurrency", "2", "-o", "json")
        deadline = time.monotonic() + 60
        # Polls a file another process writes (no event to wait on).
        while finished_lines() < 5 and first.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        first.send_signal(stop)
        try:
            stopped_stdout, stopped_stderr = await asyncio.to_thread(first.communicate, timeout=60)
        finally:
            first.kill()  # a run that did not stop must not outlive the test
        done_before = finished_lines()
        journal_before = journal.read_text().splitlines()[1 : 1 + done_before]
        resumed = await a.cli("blocks", "import", str(source), "--concurrency", "2", "-o", "json")
        calls = await a.import_calls()
        stats = await a.operator.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1"))

    assert 5 <= done_before < total, "the kill came after the run had finished: nothing to resume"
    if stop is not signal.SIGKILL:  # Ctrl-C, SIGTERM: the summary so far, how to go on, exit status 128 + signal
        assert first.returncode == 128 + stop
        assert "interrupted: run the same command again to resume" in stopped_stderr
        assert json.loads(stopped_stdout)["interrupted"] is True
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] == done_before
    assert summary["skipped"] + summary["imported"] + summary["already_imported"] == total
    # No row journaled by the killed run was sent again. Only rows in flight at the kill (at most the 2 calls in
    # flight, not journaled) were: ImportBlock is idempotent, so the repeat completed or confirmed the import
    # (already_imported when the first call had finished on the server).
    assert sorted(calls) == sorted(block(i) for i in range(total))
    first_run = {block(int(line.split("\t")[0]) - 2) for line in journal_before}
    repeated = {b for b, outcomes in calls.items() if len(outcomes) > 1}
    assert all(len(calls[b]) == 1 for b in first_run)
    assert not repeated & first_run
    assert len(repeated) <= 2 and all(len(calls[b]) == 2 for b in repeated)
    assert summary["already_imported"] <= len(repeated)
    outcomes = [line.split("\t")[1] for line in journal.read_text().splitlines()[1:]]
    assert len(outcomes) == total and outcomes.count("imported") + outcomes.count("already_imported") == total
    # Every block whole in the pools.
    assert sum(c.total for c in stats.cities) == total * 10_000


async def test_calls_that_time_out_are_sent_again_and_progress_lines_off_a_terminal(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "blocks.csv", good_rows(6))
    async with allocation_cli(redis_env, tmp_path) as a:
        proxy = LatencyProxy("127.0.0.1", a.service.port)
        try:
            await a.add_context("slow", proxy.address)
            proxy.delay = 0.4  # each way: every call outlasts the 0.3 s deadline ...
            args = ("--context", "slow", "--timeout", "0.3", "blocks", "import", str(source), "--concurrency", "2")
            running = asyncio.ensure_future(a.cli(*args, "--progress-every", "0.01"))
            # ... until two calls reached the service: each came 0.4 s after it was sent, when its client had given
            # up, so each is sent again (a fixed second was not enough on a loaded host: the CLI had sent none).
            deadline = time.monotonic() + 60
            while sum(map(len, (await a.import_calls()).values())) < 2 and not running.done():
                assert time.monotonic() < deadline, "no call reached the service through the slow proxy"
                await asyncio.sleep(0.05)
            proxy.delay = 0.0  # ... then the network recovers
            result = await running
        finally:
            proxy.close()
        stats = await a.operator.GetPoolStats(pb.GetPoolStatsRequest(tenant_id="t1"))
        calls = await a.import_calls()
    assert result.exit_code == 0, result.stderr
    summary = dict(re.findall(r"│ (\w+) +│ (\d+) +│", result.stdout))
    assert int(summary["retries"]) >= 2
    # A call that timed out on the client may have finished on the server: its repeat answers already_imported.
    assert int(summary["imported"]) + int(summary["already_imported"]) == 6
    assert sum(len(outcomes) for outcomes in calls.values()) >= 6 + 2 - 2  # the first ones may never have arrived
    assert sum(c.total for c in stats.cities) == 60_000
    # Off a terminal: plain progress lines on stderr (count, rate, ETA, tally).
    lines = result.stderr.splitlines()
    assert lines and all(
        re.fullmatch(r"importing \d/6 rows, [\d.]+ rows/s, ETA \d+:\d\d:\d\d: imported .*", x) for x in lines
    )


async def test_calls_the_server_sheds_are_sent_again_after_its_retry_info(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    source = write_csv(tmp_path / "blocks.csv", good_rows(8))
    # One call at a time and none waiting: the others are refused at once, RESOURCE_EXHAUSTED with RetryInfo (1 s).
    capacity = {"NUMPROTECT_MAX_INFLIGHT_CALLS": "1", "NUMPROTECT_MAX_QUEUED_CALLS": "0"}
    async with allocation_cli(redis_env, tmp_path, **capacity) as a:
        started = time.monotonic()
        result = await a.cli("blocks", "import", str(source), "--concurrency", "3", "-o", "json")
        elapsed = time.monotonic() - started
        calls = await a.import_calls()
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["imported"], summary["rejected"], summary["unfinished"]) == (8, 0, 0)
    assert summary["retries"] >= 2
    assert elapsed >= 1.0  # a shed call waited at least its RetryInfo delay
    # Shed calls never reach the service (load shedding comes before identity and audit): one served call a block.
    assert calls == {block(i): ["OK"] for i in range(8)}


# 80 columns: a common terminal, where the count was cut to "12/…" while the tally kept its room.
@pytest.mark.parametrize("columns", [180, 80])
async def test_progress_bar_rate_and_eta_on_a_terminal(redis_env: dict[str, str], tmp_path: Path, columns: int) -> None:
    source = write_csv(tmp_path / "blocks.csv", good_rows(30))
    async with allocation_cli(redis_env, tmp_path) as a:

        def run_in_a_terminal() -> tuple[str, int | None]:
            command = a.command("blocks", "import", str(source), "--concurrency", "1")
            environ = {k: v for k, v in a.environ().items() if k not in ("COLUMNS", "LINES")}  # the pty's size
            child = pexpect.spawn(
                command[0], command[1:], env=environ, dimensions=(30, columns), encoding="utf-8", timeout=60
            )
            child.expect(pexpect.EOF)
            child.close()
            return str(child.before), child.exitstatus

        raw, status = await asyncio.to_thread(run_in_a_terminal)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # colours and cursor moves
    assert status == 0, screen
    frames = re.findall(
        r"importing ([━╸╺ ]+) +(\d+)/30 ([\d.]+) rows/s ETA (\d+:\d\d:\d\d) (imported \d+[^\r\n]*)", screen
    )
    # Frames while it ran: the bar, the count, a rate and an estimate; the last one complete.
    running = [f for f in frames if int(f[1]) < 30]
    assert running, screen
    assert all(float(rate) > 0 for _, _, rate, _, _ in running)
    assert frames[-1][1:] == ("30", frames[-1][2], "0:00:00", "imported 30 · already 0 · rejected 0")
    assert "RESULT" in screen  # the summary table


async def test_an_unknown_key_stops_the_run_with_its_status(redis_env: dict[str, str], tmp_path: Path) -> None:
    source = write_csv(tmp_path / "blocks.csv", good_rows(20))
    async with allocation_cli(redis_env, tmp_path) as a:
        await a.add_context("stale", a.service.address, write_secret(tmp_path / "stale.token", "np_" + "0" * 40))
        result = await a.cli("--context", "stale", "blocks", "import", str(source), "-o", "json")
    # Every row would fail alike: no rejects, no summary, the status's line and exit status (16).
    assert result.exit_code == 16, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("numprotect: UNAUTHENTICATED: ")
    assert result.stdout == ""
    assert (tmp_path / "blocks.rejected.csv").read_text() == HEADER + ",code,message\n"
    assert (tmp_path / "blocks.csv.journal").read_text().count("\n") == 1  # the header: nothing finished


async def test_a_file_of_the_wrong_shape_is_refused_up_front(redis_env: dict[str, str], tmp_path: Path) -> None:
    wrong = write_csv(tmp_path / "wrong.csv", good_rows(3), header="block,tenant,city_code,carrier_id,block")
    async with allocation_cli(redis_env, tmp_path) as a:
        result = await a.cli("blocks", "import", str(wrong))
        calls = await a.import_calls()
    assert result.exit_code == 64
    (line,) = result.stderr.splitlines()
    assert line == (
        f"numprotect: {wrong}: line 1: the header 'block,tenant,city_code,carrier_id,block' has missing column(s) "
        "tenant_id and repeated column(s) block "
        "(expected the columns block,tenant_id,city_code,carrier_id, in any order)"
    )
    assert calls == {}
    assert not (tmp_path / "wrong.csv.journal").exists()
