"""Redis credentials in RedisSettings: from a file or the URL, never from a variable, never in a repr or error."""

from __future__ import annotations

from pathlib import Path

import pytest

from numprotect.core.settings import Env, RedisSettings, SettingsError

SECRET = "s3cr3t-Pa55word"


def test_the_password_comes_from_its_file_and_stays_out_of_the_repr(tmp_path: Path) -> None:
    path = tmp_path / "redis.password"
    path.write_text(SECRET + "\n")
    env = {
        "NUMPROTECT_REDIS_URL": "redis://10.0.0.5:6379/0",
        "NUMPROTECT_REDIS_USERNAME": "numprotect-cdr",
        "NUMPROTECT_REDIS_PASSWORD_FILE": str(path),
    }
    settings = RedisSettings.from_env(Env(env))
    assert (settings.username, settings.password) == ("numprotect-cdr", SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings)


def test_credentials_in_the_url_are_taken_and_the_password_removed_from_it() -> None:
    settings = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": f"redis://numprotect-binding:{SECRET}@h:6379/0"}))
    assert (settings.username, settings.password) == ("numprotect-binding", SECRET)
    assert settings.url == "redis://numprotect-binding@h:6379/0"
    assert SECRET not in repr(settings)
    legacy = RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": f"redis://:{SECRET}@h:6379/0"}))
    assert (legacy.username, legacy.password, legacy.url) == (None, SECRET, "redis://h:6379/0")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"NUMPROTECT_REDIS_PASSWORD": SECRET}, "NUMPROTECT_REDIS_PASSWORD is not read"),
        ({"NUMPROTECT_REDIS_USERNAME": "u"}, "NUMPROTECT_REDIS_USERNAME needs NUMPROTECT_REDIS_PASSWORD_FILE"),
        ({"NUMPROTECT_REDIS_PASSWORD_FILE": "/nowhere/pw"}, "NUMPROTECT_REDIS_PASSWORD_FILE='/nowhere/pw': cannot"),
        ({"NUMPROTECT_REDIS_URL": f"redis://u:{SECRET}@h/0?password=x"}, "option 'password' is not taken"),
        ({"NUMPROTECT_REDIS_URL": f"bogus://u:{SECRET}@h/0"}, "must be redis://host:port/db"),
    ],
)
def test_bad_credentials_settings_refuse_start_up_without_showing_a_password(
    extra: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_URL": "redis://h:6379/0", **extra}))
    assert message in str(caught.value)
    assert SECRET not in str(caught.value) and "\n" not in str(caught.value)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("\n")
    with pytest.raises(SettingsError, match="the file is empty"):
        RedisSettings.from_env(Env({"NUMPROTECT_REDIS_PASSWORD_FILE": str(path)}))
