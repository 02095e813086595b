"""The SSRF guard and the HTTP client of deliveries, against real receivers on loopback: refused addresses (IP
literals and resolved names, IPv4 and IPv6), what NUMPROTECT_EVENTS_ALLOWED_NETWORKS allows, no redirects, bounded
answers and timeouts."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Mapping

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from numprotect.core.settings import Env
from numprotect.services.events.sender import WebhookSender, retry_after_ms
from numprotect.services.events.settings import EventsSettings
from numprotect.services.events.ssrf import AddressPolicy, AddressRefused, GuardedResolver
from support.webhook_receiver import Reply, webhook_receiver

HEADERS = {"content-type": "application/json"}
REFUSED_BY_DEFAULT = [
    "127.0.0.1",
    "127.9.9.9",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]


def settings(**environ: str) -> EventsSettings:
    return EventsSettings.from_env(Env({"NUMPROTECT_EVENTS_ALLOW_HTTP": "1", **environ}))


@pytest.mark.parametrize("address", REFUSED_BY_DEFAULT)
def test_non_global_addresses_are_refused_by_default(address: str) -> None:
    refusal = AddressPolicy().refusal(ipaddress.ip_address(address))
    assert refusal is not None and refusal.startswith("address not allowed: ")


@pytest.mark.parametrize("address", GLOBAL)
def test_global_addresses_are_allowed(address: str) -> None:
    assert AddressPolicy().refusal(ipaddress.ip_address(address)) is None


def test_allowed_networks_allow_exactly_what_they_name() -> None:
    policy = AddressPolicy(settings(NUMPROTECT_EVENTS_ALLOWED_NETWORKS="127.0.0.0/8, fd00::/8").allowed_networks)
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None  # the mapped address is the IPv4 one
    assert policy.refusal(ipaddress.ip_address("fd12::1")) is None
    assert policy.refusal(ipaddress.ip_address("10.0.0.1")) is not None
    assert policy.refusal(ipaddress.ip_address("::1")) is not None
    assert policy.refusal(ipaddress.ip_address("fc00::1")) is not None


class _Answers(AbstractResolver):
    """A resolver that answers fixed addresses for any name (what DNS would say), counting the lookups."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_answers_only_allowed_addresses() -> None:
    policy = AddressPolicy(settings(NUMPROTECT_EVENTS_ALLOWED_NETWORKS="127.0.0.0/8").allowed_networks)
    mixed = GuardedResolver(policy, _Answers(["10.0.0.1", "127.0.0.1", "::1", "8.8.8.8"]))
    assert [answer["host"] for answer in await mixed.resolve("hooks.example", 443)] == ["127.0.0.1", "8.8.8.8"]
    private = GuardedResolver(policy, _Answers(["10.0.0.1", "::ffff:192.168.0.1"]))
    with pytest.raises(AddressRefused, match=r"hooks.example: address not allowed: 10.0.0.1 \(private"):
        await private.resolve("hooks.example", 443)


def _sender_with_answers(environ: Mapping[str, str], answers: list[str]) -> tuple[WebhookSender, _Answers]:
    """A sender whose resolver's lookups answer `answers` (so a test names hosts that DNS does not know)."""
    sender = WebhookSender(settings(**environ))
    session = sender._opened()
    resolver = _Answers(answers)
    guarded = session.connector._resolver  # type: ignore[union-attr]
    assert isinstance(guarded, GuardedResolver)
    guarded._resolver = resolver
    return sender, resolver


async def test_a_name_connects_to_the_address_checked_and_a_private_one_is_refused() -> None:
    async with webhook_receiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        allowed, lookups = _sender_with_answers({"NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8"}, ["127.0.0.1"])
        try:
            # hooks.example resolves (here) to 127.0.0.1: the request goes to that address, the checked one.
            result = await allowed.send(f"http://hooks.example:{port}/hook", b"{}", HEADERS)
            assert result.status == 200, result.error
            assert lookups.lookups == 1
        finally:
            await allowed.close()
        refused, _ = _sender_with_answers({}, ["127.0.0.1"])
        try:
            result = await refused.send(f"http://hooks.example:{port}/hook", b"{}", HEADERS)
        finally:
            await refused.close()
        assert result.status == 0 and result.refused
        assert result.error.startswith("hooks.example: address not allowed: 127.0.0.1 (loopback")
        assert len(receiver.received) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hook",
        "http://[::1]:{port}/hook",
        "http://[::ffff:127.0.0.1]:{port}/hook",
        "http://10.0.0.1:{port}/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1%25lo]:{port}/hook",
        "http://localhost:{port}/hook",  # a name: refused by the resolver
        "http://2130706433:{port}/hook",  # 127.0.0.1 in a legacy numeric form
        "http://0x7f.1:{port}/hook",
    ],
)
async def test_private_receivers_are_refused_by_default_before_any_connection(url: str) -> None:
    async with webhook_receiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        sender = WebhookSender(settings())
        try:
            started = time.monotonic()
            result = await sender.send(url.format(port=port), b"{}", HEADERS)
        finally:
            await sender.close()
        assert result.status == 0 and result.refused, result
        assert "not allowed" in result.error or "refused" in result.error or "canonical" in result.error, result.error
        assert time.monotonic() - started < 5
        assert receiver.received == []


async def test_allowed_networks_let_loopback_through() -> None:
    async with webhook_receiver() as receiver:
        sender = WebhookSender(settings(NUMPROTECT_EVENTS_ALLOWED_NETWORKS="127.0.0.0/8"))
        try:
            by_address = await sender.send(receiver.url, b'{"a":1}', HEADERS)
            by_name = await sender.send(receiver.url.replace("127.0.0.1", "localhost"), b'{"a":2}', HEADERS)
            ipv6 = await sender.send(receiver.url.replace("127.0.0.1", "[::1]"), b"{}", HEADERS)
        finally:
            await sender.close()
        assert (by_address.status, by_address.error, by_address.succeeded) == (200, "", True)
        assert by_name.status == 200, by_name.error  # localhost's ::1 is refused, its 127.0.0.1 used
        assert ipv6.refused and "::1 (loopback" in ipv6.error
        assert [r.body for r in receiver.received] == [b'{"a":1}', b'{"a":2}']


async def test_https_only_unless_http_is_allowed() -> None:
    sender = WebhookSender(EventsSettings.from_env(Env({"NUMPROTECT_EVENTS_ALLOWED_NETWORKS": "127.0.0.0/8"})))
    try:
        result = await sender.send("http://127.0.0.1:9/hook", b"{}", HEADERS)
        other = await sender.send("ftp://127.0.0.1/hook", b"{}", HEADERS)
        user_info = await sender.send("https://user:pw@127.0.0.1:9/hook", b"{}", HEADERS)
    finally:
        await sender.close()
    assert result.refused and "scheme 'http' not allowed" in result.error
    assert other.refused and "scheme 'ftp'" in other.error
    assert user_info.refused and "user info" in user_info.error


async def test_redirects_are_not_followed() -> None:
    async with webhook_receiver() as target, webhook_receiver() as redirecting:
        redirecting.script([Reply(307, headers={"Location": target.url})])
        sender = WebhookSender(settings(NUMPROTECT_EVENTS_ALLOWED_NETWORKS="127.0.0.0/8"))
        try:
            result = await sender.send(redirecting.url, b"{}", HEADERS)
        finally:
            await sender.close()
        assert (result.status, result.succeeded) == (307, False)
        assert result.error == "HTTP 307 (redirects are not followed)"
        assert len(redirecting.received) == 1
        assert target.received == []


async def test_an_oversized_answer_is_cut_and_a_slow_one_times_out() -> None:
    async with webhook_receiver() as receiver:
        receiver.script([Reply(200, body=b"x" * 5_000_000), Reply(200, body=b"small"), Reply(200, delay_s=3)])
        sender = WebhookSender(
            settings(
                NUMPROTECT_EVENTS_ALLOWED_NETWORKS="127.0.0.0/8",
                NUMPROTECT_EVENTS_MAX_RESPONSE_BYTES="100",
                NUMPROTECT_EVENTS_REQUEST_TIMEOUT="300ms",
            )
        )
        try:
            big = await sender.send(receiver.url, b"{}", HEADERS)
            small = await sender.send(receiver.url, b"{}", HEADERS)
            started = time.monotonic()
            slow = await sender.send(receiver.url, b"{}", HEADERS)
            waited = time.monotonic() - started
        finally:
            await sender.close()
        assert (big.status, big.body) == (200, b"x" * 100)
        assert (small.status, small.body) == (200, b"small")
        assert (slow.status, slow.error, slow.refused) == (0, "timeout after 0.3s", False)
        assert 0.25 < waited < 2.0


async def test_connections_are_reused() -> None:
    async with webhook_receiver() as receiver:
        receiver.script([Reply(200), Reply(200), Reply(200, body=b"y" * 2_000_000), Reply(200)])
        sender = WebhookSender(
            settings(NUMPROTECT_EVENTS_ALLOWED_NETWORKS="127.0.0.0/8", NUMPROTECT_EVENTS_MAX_RESPONSE_BYTES="10")
        )
        try:
            for _ in range(4):
                assert (await sender.send(receiver.url, b"{}", HEADERS)).status == 200
        finally:
            await sender.close()
        peers = [r.peer for r in receiver.received]
        assert all(peers)
        # One connection for the first three; the third answer was longer than the limit, so its connection was
        # closed rather than drained, and the fourth request came on a new one.
        assert peers[0] == peers[1] == peers[2] != peers[3]


def test_retry_after_values() -> None:
    now = 1_700_000_000_000
    assert retry_after_ms("", now) is None
    assert retry_after_ms("3", now) == 3000
    assert retry_after_ms("soon", now) is None
    assert retry_after_ms("Tue, 14 Nov 2023 22:13:30 GMT", now) == 10_000
    assert retry_after_ms("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0  # already past
    assert retry_after_ms("99999999", now) == 86_400_000
