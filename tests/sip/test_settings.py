"""The adapter's settings: defaults, and one line naming the variable and its rule for each bad value."""

from __future__ import annotations

import ipaddress

import pytest

from numprotect.core.settings import SettingsError
from numprotect.services.sip.settings import SipSettings

EGRESS = {"NUMPROTECT_SIP_EGRESS": "198.51.100.7:5070"}


def test_defaults() -> None:
    settings = SipSettings.from_env(EGRESS)
    assert (settings.host, settings.port, settings.transports) == ("127.0.0.1", 5060, ("udp", "tcp"))
    assert settings.allowed_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert (settings.translate_timeout, settings.retry_after, settings.streams, settings.batch_max) == (0.2, 5, 2, 64)
    assert (settings.max_transactions, settings.max_message_bytes, settings.max_connections) == (100000, 16384, 1024)
    assert (settings.tcp_idle_timeout, settings.number_format) == (300.0, "national")


def test_values_are_read() -> None:
    settings = SipSettings.from_env(
        {
            "NUMPROTECT_SIP_EGRESS": "sbc.carrier.example",
            "NUMPROTECT_SIP_HOST": "0.0.0.0",
            "NUMPROTECT_SIP_TRANSPORTS": "tcp",
            "NUMPROTECT_SIP_ALLOWED_NETWORKS": "10.0.0.0/8, 192.0.2.1/32",
            "NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "50ms",
            "NUMPROTECT_SIP_RETRY_AFTER": "1m",
            "NUMPROTECT_SIP_NUMBER_FORMAT": "e164",
        }
    )
    assert settings.transports == ("tcp",)
    assert len(settings.allowed_networks) == 2
    assert (settings.translate_timeout, settings.retry_after, settings.number_format) == (0.05, 60, "e164")


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({}, "NUMPROTECT_SIP_EGRESS"),
        ({"NUMPROTECT_SIP_EGRESS": "host:99999"}, "NUMPROTECT_SIP_EGRESS"),
        ({"NUMPROTECT_SIP_EGRESS": "a b"}, "NUMPROTECT_SIP_EGRESS"),
        ({**EGRESS, "NUMPROTECT_SIP_HOST": "localhost"}, "NUMPROTECT_SIP_HOST"),
        ({**EGRESS, "NUMPROTECT_SIP_PORT": "70000"}, "NUMPROTECT_SIP_PORT"),
        ({**EGRESS, "NUMPROTECT_SIP_TRANSPORTS": "udp,tls"}, "NUMPROTECT_SIP_TRANSPORTS"),
        ({**EGRESS, "NUMPROTECT_SIP_ALLOWED_NETWORKS": "10.0.0.0/33"}, "NUMPROTECT_SIP_ALLOWED_NETWORKS"),
        ({**EGRESS, "NUMPROTECT_SIP_TRANSLATE_TIMEOUT": "5ms"}, "NUMPROTECT_SIP_TRANSLATE_TIMEOUT"),
        ({**EGRESS, "NUMPROTECT_SIP_RETRY_AFTER": "1.5s"}, "NUMPROTECT_SIP_RETRY_AFTER"),
        ({**EGRESS, "NUMPROTECT_SIP_STREAMS": "17"}, "NUMPROTECT_SIP_STREAMS"),
        ({**EGRESS, "NUMPROTECT_SIP_MAX_MESSAGE_BYTES": "100"}, "NUMPROTECT_SIP_MAX_MESSAGE_BYTES"),
        ({**EGRESS, "NUMPROTECT_SIP_NUMBER_FORMAT": "international"}, "NUMPROTECT_SIP_NUMBER_FORMAT"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        SipSettings.from_env(environ)
    assert str(caught.value).startswith(variable)
    assert "\n" not in str(caught.value)
