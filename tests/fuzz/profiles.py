"""The fuzzer's Hypothesis settings, chosen by NUMPROTECT_FUZZ_PROFILE: "short" (the default, in `make test`:
derandomized, so every run tries the same examples) or "long" (`make chaos`: 20 times the examples, a new seed
each run). Only the fuzz tests use them; the global Hypothesis profile is left alone."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
PROFILES = {
    # Examples per RPC and strategy (random and near-valid each run this many).
    "short": settings(max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=_QUIET),
    "long": settings(
        max_examples=2000,
        derandomize=False,
        database=None,
        deadline=None,
        suppress_health_check=_QUIET,
        print_blob=True,
    ),
}
PROFILE_NAME = os.environ.get("NUMPROTECT_FUZZ_PROFILE", "short")
if PROFILE_NAME not in PROFILES:
    raise RuntimeError(f"NUMPROTECT_FUZZ_PROFILE: {PROFILE_NAME!r} is neither 'short' nor 'long'")
FUZZ = PROFILES[PROFILE_NAME]
