"""NUMPROTECT_CPU_SCHEDULING: every thread of a service runs the chosen Linux policy, later threads included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from numprotect.core.scheduling import apply_cpu_scheduling, thread_ids
from support.processes import ROOT, ServiceProcess

POLICY_NUMBERS = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}

# Runs in a child process so the test process keeps its own policy: starts a thread, applies the policy, prints
# the policy of every thread, then starts another thread and prints the policy it inherited.
_CHILD = """
import os, sys, threading
from numprotect.core.scheduling import apply_cpu_scheduling, thread_ids
before = threading.Event(); release = threading.Event()
def wait() -> None:
    before.set(); release.wait()
early = threading.Thread(target=wait); early.start(); before.wait()
changed = apply_cpu_scheduling(sys.argv[1])
# Counted before the late thread: once joined, a thread can still be listed in /proc/self/task for a moment.
threads = thread_ids()
policies = sorted({os.sched_getscheduler(t) for t in threads})
late_policy = []
late = threading.Thread(target=lambda: late_policy.append(os.sched_getscheduler(0))); late.start(); late.join()
print(changed, len(threads), policies, late_policy[0])
release.set(); early.join()
"""


@pytest.mark.parametrize("policy", ["batch", "normal"])
def test_apply_sets_every_thread_and_later_threads_inherit(policy: str) -> None:
    # Start from the other policy so the change is visible.
    other = "normal" if policy == "batch" else "batch"
    script = f"from numprotect.core.scheduling import apply_cpu_scheduling; apply_cpu_scheduling({other!r})\n" + _CHILD
    done = subprocess.run(
        [sys.executable, "-c", script, policy], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    changed, threads, policies, late = done.stdout.split(maxsplit=3)
    assert int(changed) == int(threads) >= 2  # the main thread and the one started before
    assert policies.strip() == f"[{POLICY_NUMBERS[policy]}]"
    assert int(late) == POLICY_NUMBERS[policy]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown CPU scheduling policy 'fifo'"):
        apply_cpu_scheduling("fifo")


@pytest.mark.parametrize(
    ("service", "environ", "policy"),
    [
        ("translation", {}, "batch"),  # the sync bootstrap, default
        ("binding", {}, "batch"),  # the aio bootstrap, default
        ("translation", {"NUMPROTECT_CPU_SCHEDULING": "normal"}, "normal"),
        ("binding", {"NUMPROTECT_CPU_SCHEDULING": "normal"}, "normal"),
    ],
)
def test_every_thread_of_a_running_service_has_the_policy(
    service: str, environ: dict[str, str], policy: str, redis_url: str
) -> None:
    process = ServiceProcess(service, {"NUMPROTECT_REDIS_URL": redis_url, **environ})
    try:
        process.wait_serving()
        tids = thread_ids(process.process.pid)
        assert len(tids) > 3  # grpc's threads, the workers or the event loop, not just the main thread
        assert {tid: os.sched_getscheduler(tid) for tid in tids} == dict.fromkeys(tids, POLICY_NUMBERS[policy])
    finally:
        assert process.stop() == 0
