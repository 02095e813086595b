"""https receivers: a receiver whose certificate comes from a private CA (trustme's) gets its events when
NUMPROTECT_EVENTS_CA_FILE names that CA (the system store is trusted as well); a certificate no trusted CA signed is
a failed attempt with a clear error and nothing sent; a CA file that cannot be loaded stops start-up with one line
naming the setting."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from events.delivery_harness import delivery_rig
from events.test_delivery import attempts_of, eventually
from standardwebhooks.webhooks import Webhook

from numprotect.core.settings import Env, SettingsError
from numprotect.services.events.settings import EventsSettings
from support.webhook_receiver import webhook_receiver

SETTING = "NUMPROTECT_EVENTS_CA_FILE"


@pytest.fixture(scope="module")
def private_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def receiver_tls(private_ca: trustme.CA) -> Iterator[ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1 from the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    private_ca.issue_cert("127.0.0.1").configure_cert(context)
    yield context


def ca_file(ca: trustme.CA, tmp_path: Path, name: str = "ca.pem") -> str:
    path = tmp_path / name
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_a_receiver_with_a_private_ca_gets_its_events_when_the_ca_is_trusted(
    redis_env: dict[str, str], private_ca: trustme.CA, receiver_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    trusted = {SETTING: ca_file(private_ca, tmp_path)}
    async with webhook_receiver(ssl_context=receiver_tls) as receiver, delivery_rig(redis_env, **trusted) as rig:
        assert receiver.url.startswith("https://127.0.0.1:")
        endpoint = await rig.endpoint(receiver.url)
        published = await rig.publish([endpoint], "binding.created", bindingId="b-tls")
        rig.dispatcher()
        [got] = await receiver.wait_for(1)
        assert Webhook(endpoint.secret).verify(got.body, got.headers)["id"] == published.event_id
        [attempt] = await eventually(lambda: attempts_of(rig, endpoint))
        assert attempt.succeeded and attempt.http_status == 200 and attempt.error == ""


@pytest.mark.parametrize("trust", ["system store only", "another private CA"])
async def test_a_certificate_no_trusted_ca_signed_is_a_failed_attempt_with_a_clear_error(
    redis_env: dict[str, str], receiver_tls: ssl.SSLContext, tmp_path: Path, trust: str
) -> None:
    settings = {} if trust == "system store only" else {SETTING: ca_file(trustme.CA(), tmp_path, "other.pem")}
    async with webhook_receiver(ssl_context=receiver_tls) as receiver, delivery_rig(redis_env, **settings) as rig:
        endpoint = await rig.endpoint(receiver.url)
        await rig.publish([endpoint], "binding.created", bindingId="b-untrusted")
        rig.dispatcher()
        [attempt, *_] = await eventually(lambda: attempts_of(rig, endpoint))
        assert not attempt.succeeded and attempt.http_status == 0 and attempt.attempt == 1
        assert attempt.error == "TLS certificate not trusted: unable to get local issuer certificate"
        assert receiver.received == []  # no request was made


def test_a_ca_file_that_cannot_be_loaded_stops_start_up_with_one_line(tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    for path, reason in [
        (tmp_path / "missing.pem", "No such file or directory"),
        (not_pem, "cannot load CA certificates"),
        (empty, "cannot load CA certificates"),
        (tmp_path, "cannot load CA certificates"),
    ]:
        with pytest.raises(SettingsError) as refused:
            EventsSettings.from_env(Env({SETTING: str(path)}))
        message = str(refused.value)
        assert message.startswith(f"{SETTING}={str(path)!r}: ") and reason in message and "\n" not in message


def test_no_ca_file_means_the_system_store(private_ca: trustme.CA, tmp_path: Path) -> None:
    settings = EventsSettings.from_env(Env({}))
    assert settings.ca_file == ""
    assert settings.receiver_tls().verify_mode is ssl.CERT_REQUIRED and settings.receiver_tls().check_hostname
    with_ca = EventsSettings.from_env(Env({SETTING: ca_file(private_ca, tmp_path)}))
    system = len(settings.receiver_tls().get_ca_certs())
    assert len(with_ca.receiver_tls().get_ca_certs()) == system + 1  # the system store and the private CA
    assert os.path.isfile(with_ca.ca_file)
