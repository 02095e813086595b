"""NUMPROTECT_EVENTS_RETENTION against the retry schedule: an event must still be in the tenant's log at its last
attempt, which the jitter may put up to (1 + jitter) x the schedule's total after the first (claim.lua drops a
queued event whose log entry was trimmed: no delivery, no dead letter)."""

from __future__ import annotations

import pytest

from numprotect.core.settings import Env, SettingsError
from numprotect.services.events.settings import EventsSettings


def settings(**environ: str) -> EventsSettings:
    return EventsSettings.from_env(Env({"NUMPROTECT_EVENTS_RETRY_SCHEDULE": "10h", **environ}))


def test_retention_must_outlast_the_schedule_lengthened_by_its_jitter() -> None:
    # 10 h with +/- 20 %: the last attempt may come 12 h after the first, so 11 h (the total + 1 h) is too short.
    with pytest.raises(SettingsError, match="NUMPROTECT_EVENTS_RETENTION") as refused:
        settings(NUMPROTECT_EVENTS_RETENTION="11h", NUMPROTECT_EVENTS_RETRY_JITTER="0.2")
    assert "13.0 h" in str(refused.value)
    assert settings(NUMPROTECT_EVENTS_RETENTION="13h", NUMPROTECT_EVENTS_RETRY_JITTER="0.2").retention_s == 13 * 3600


def test_without_jitter_the_schedule_total_plus_an_hour_is_enough() -> None:
    assert settings(NUMPROTECT_EVENTS_RETENTION="11h", NUMPROTECT_EVENTS_RETRY_JITTER="0").retention_s == 11 * 3600
    with pytest.raises(SettingsError, match="NUMPROTECT_EVENTS_RETENTION"):
        settings(NUMPROTECT_EVENTS_RETENTION="10h", NUMPROTECT_EVENTS_RETRY_JITTER="0")


def test_the_defaults_pass() -> None:
    defaults = EventsSettings.from_env(Env({}))
    assert defaults.retention_s >= sum(defaults.retry_schedule) * (1 + defaults.retry_jitter) + 3600
