"""Fixtures of the doctor tests (the state they check is made in doctor.state)."""

from __future__ import annotations

import pytest

from numprotect.core.settings import Env, RedisSettings


@pytest.fixture
def doctor_redis(redis_env: dict[str, str]) -> RedisSettings:
    """The settings the checker reads (as an operator's environment would give them)."""
    return RedisSettings.from_env(Env(redis_env))
