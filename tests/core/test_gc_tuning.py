"""After start-up a service's heap is frozen and young collections wait for NUMPROTECT_GC_GEN0_THRESHOLD objects."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from support.processes import ROOT, ServiceProcess

# Runs in a child process so the test process keeps Python's own collector settings. Prints the state before
# and after tuning, and how many young collections 200 waves of 64 "calls in flight" then cause: each call holds
# 16 tracked objects until the whole wave is answered, about 1,000 objects alive at once, all freed afterwards.
_CHILD = """
import gc, json, sys
from numprotect.core.gc_tuning import freeze_startup_heap
keep = [[i] for i in range(20_000)]  # "start-up" objects that live on
before = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()[0]}
state = freeze_startup_heap(int(sys.argv[1]))
runs = gc.get_stats()[0]["collections"]
for wave in range(200):
    calls = [[[j] for j in range(15)] for _ in range(64)]
    del calls
young = gc.get_stats()[0]["collections"] - runs
print(json.dumps({"before": before, "frozen": state.frozen_objects, "thresholds": state.thresholds,
                  "now": gc.get_threshold(), "young": young}))
"""


def _tuned(threshold: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threshold)], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_startup_heap_is_frozen_and_the_young_threshold_raised() -> None:
    tuned = _tuned(10_000)
    assert tuned["before"] == {"frozen": 0, "threshold": 700}
    assert tuned["frozen"] > 20_000  # the kept lists, modules, ...
    assert tuned["thresholds"] == tuned["now"] == [10_000, 10, 10]
    # The calls in flight stay under the new threshold: no young collection at all. Under Python's 700 every wave
    # passes it and pays a collection that frees nothing.
    assert tuned["young"] == 0
    assert _tuned(700)["young"] >= 150  # nearly every wave (the counter never goes below 0)


@pytest.mark.parametrize(
    ("service", "environ", "threshold"),
    [
        ("translation", {}, 10_000),  # the sync bootstrap
        ("binding", {}, 10_000),  # the aio bootstrap
        ("translation", {"NUMPROTECT_GC_GEN0_THRESHOLD": "2500"}, 2_500),
    ],
)
def test_a_running_service_logs_its_frozen_heap(
    service: str, environ: dict[str, str], threshold: int, redis_url: str
) -> None:
    process = ServiceProcess(service, {"NUMPROTECT_REDIS_URL": redis_url, **environ})
    try:
        serving = next(json.loads(line) for line in process.lines if '"msg": "serving"' in line)
        assert serving["gc_gen0_threshold"] == threshold
        assert serving["gc_frozen_objects"] > 10_000  # grpc, protobuf, redis, the services' own modules
    finally:
        assert process.stop() == 0
