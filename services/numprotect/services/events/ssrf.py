"""The SSRF guard of webhook deliveries (docs/events.md, "Receivers"): a tenant names the URL, so without a guard it
could make the service POST to anything the service's network reaches (Redis, the metadata service, admin ports).

Every address a request may go to is checked: an IP-literal URL's before the request, a host name's as the
resolver answers (`GuardedResolver`), and the connection is made to the checked addresses only (aiohttp connects to
what its resolver returned), so a name that resolves to a public address for the check and to a private one for
the connection (DNS rebinding) has no second lookup to exploit. Refused unless inside NUMPROTECT_EVENTS_ALLOWED_
NETWORKS: loopback, link-local, private, multicast, reserved, unspecified and every other non-global address, IPv4
and IPv6, including IPv4 addresses inside IPv6 ones (IPv4-mapped, 6to4, Teredo).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from numprotect.services.events.settings import IpNetwork

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(OSError):
    """The receiver's address is not one deliveries may go to (an OSError: aiohttp hands resolver errors on)."""


class UrlRefused(ValueError):
    """The URL cannot be delivered to at all (scheme, host)."""


def _why_not_global(address: IpAddress) -> str | None:
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not global"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which receiver addresses deliveries may go to: global unicast ones, and any inside `allowed_networks`."""

    allowed_networks: tuple[IpNetwork, ...] = ()

    def refusal(self, address: IpAddress) -> str | None:
        """Why `address` is refused ("address not allowed: 10.0.0.1 (private)"), or None when it is allowed."""
        # An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address: judged, and allowed, as that.
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address.version == network.version and address in network for network in self.allowed_networks):
            return None
        why = _why_not_global(address)
        if why is None and isinstance(address, ipaddress.IPv6Address):
            why = _embedded_refusal(address)
        if why is None:
            return None
        return f"address not allowed: {address} ({why}; NUMPROTECT_EVENTS_ALLOWED_NETWORKS can allow it)"

    def check(self, host: str) -> None:
        """Raises AddressRefused unless `host` (an IP address as text) is allowed."""
        refusal = self.refusal(ipaddress.ip_address(host.partition("%")[0]))
        if refusal is not None:
            raise AddressRefused(refusal)


def _embedded_refusal(address: ipaddress.IPv6Address) -> str | None:
    """An IPv6 address that carries an IPv4 one a relay would forward to (6to4, Teredo) is judged by that too."""
    embedded: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.extend(address.teredo)
    for inner in embedded:
        why = _why_not_global(inner)
        if why is not None:
            return f"{why} IPv4 address {inner} inside"
    return None


def ip_literal(host: str) -> IpAddress | None:
    """The address when `host` (a URL's host, IPv6 without brackets) is an IP literal, else None."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def receiver_url(url: str, *, allow_http: bool) -> URL:
    """The URL as requested: https (or http when allowed), a host, no user info. Raises UrlRefused."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise UrlRefused(f"not a URL: {exc}") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parsed.scheme not in schemes:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise UrlRefused(f"URL scheme {parsed.scheme!r} not allowed (only {allowed})")
    if not parsed.host:
        raise UrlRefused("URL has no host")
    if parsed.user is not None or parsed.password is not None:
        raise UrlRefused("URL carries user info")
    return parsed


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, answering only the allowed addresses of a name (AddressRefused when none is)."""

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._resolver = resolver or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refusals: list[str] = []
        for answer in answers:
            refusal = self.policy.refusal(ipaddress.ip_address(answer["host"].partition("%")[0]))
            if refusal is None:
                allowed.append(answer)
            else:
                refusals.append(refusal)
        if not allowed:
            raise AddressRefused(f"{host}: " + ("; ".join(_unique(refusals)) or "no address"))
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))
