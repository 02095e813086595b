"""Runs every benchmark module (benchmarks/bench_*.py), or the ones named: python -m benchmarks [name ...].

Each module is run in its own process (`python -m benchmarks.bench_<name>`) and prints its own report;
the reports are also written to bench-results/<name>.txt.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "bench-results"


def main(argv: list[str]) -> int:
    available = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    chosen = argv or available
    unknown = [name for name in chosen if name not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name in chosen:
        print(f"=== {name} ===", flush=True)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", f"benchmarks.bench_{name}"], cwd=HERE.parent, capture_output=True, text=True
        )
        report = result.stdout + (f"\n[stderr]\n{result.stderr}" if result.returncode else "")
        print(report, flush=True)
        print(f"({name}: {time.monotonic() - started:.0f}s, exit {result.returncode})", flush=True)
        (RESULTS / f"{name}.txt").write_text(report)
        if result.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
