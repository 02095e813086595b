"""Python's garbage collector on a long-running server: the start-up heap frozen, young collections rarer.

Why: with the default threshold (700 tracked objects) a gRPC server under load starts a young collection every
few calls, only because the objects of the calls in flight (64 calls, a dozen objects each) pass the threshold.
Each such collection promotes those in-flight objects to the older generations, and the promotions soon force a
full collection, which walks the whole heap (50,000+ objects of imported modules, descriptors and clients) with
the GIL held: 44-55 ms on a loaded translation process, every call in flight waiting. So after
start-up the bootstrap collects once, moves every surviving object to the permanent generation (gc.freeze: never
walked again), and raises the young threshold (NUMPROTECT_GC_GEN0_THRESHOLD, default 10,000) above what calls in
flight allocate. Garbage cycles are still collected, later. Figures in docs/deploy.md ("Garbage collection").
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

DEFAULT_GEN0_THRESHOLD = 10_000


@dataclass(frozen=True, slots=True)
class CollectorState:
    """What the collector looks like after tuning (logged at start-up)."""

    frozen_objects: int
    thresholds: tuple[int, int, int]


def freeze_startup_heap(gen0_threshold: int) -> CollectorState:
    """Collects start-up garbage, freezes what survives, sets the young threshold; call once, after start-up."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    return CollectorState(gc.get_freeze_count(), gc.get_threshold())
