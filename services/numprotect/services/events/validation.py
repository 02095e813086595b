"""Request validation of the EventService: every violation of a request is reported at once, each naming its field
and the rule (google.rpc.BadRequest).

Rules (docs/events.md):
- url: at most 2048 characters, https:// (http:// only with NUMPROTECT_EVENTS_ALLOW_HTTP=on), a host, no user
  name or password, no fragment, no spaces or control characters; an IP-literal host the SSRF guard (ssrf.py)
  refuses is refused here already (the guard checks every address again at send time); so is a host in a legacy
  numeric IPv4 form (127.1, 2130706433, 0x7f000001, 0177.0.0.1): the resolver maps it onto an address, aiohttp
  refuses some of them outright at send time, and a tenant should learn that now, not from its dead letters.
- event_types: each one of event_keys.EVENT_TYPES (empty: every type); a type named twice counts once.
- description: at most 256 characters, no control characters (people read it, the operator's CLI table too: a
  tenant's terminal escapes must not reach their terminal). batch_size: 0 to NUMPROTECT_EVENTS_MAX_BATCH_SIZE.
  max_concurrency: 0 to NUMPROTECT_EVENTS_MAX_ENDPOINT_CONCURRENCY.
- update_mask: at least one path (an empty mask is refused, as UpdateBinding's: a client that forgot it must not
  reset the endpoint); "*" names every updatable field; a path may start with "endpoint.".
- state (UpdateEndpoint): ENDPOINT_STATE_ENABLED or ENDPOINT_STATE_DISABLED; GONE is the service's to set.
"""

from __future__ import annotations

import re
import socket
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from numprotect.core.errors import InvalidArgument, Violations
from numprotect.core.event_keys import EVENT_TYPES
from numprotect.core.identifiers import TENANT_ID, IdentifierRule
from numprotect.events.v1 import events_pb2
from numprotect.services.events.endpoints import DISABLED, ENABLED, ENDPOINT_ID, EndpointSpec
from numprotect.services.events.settings import EventsSettings
from numprotect.services.events.ssrf import AddressPolicy, UrlRefused, ip_literal, receiver_url

MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 256
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# RedriveDeadLetters: event ids named in one call.
MAX_REDRIVE_IDS = 1000
UPDATABLE = ("url", "event_types", "description", "state", "batch_size", "max_concurrency")
EVENT_ID = IdentifierRule(re.compile(r"evt_[a-z2-7]{26}", re.ASCII), "must be an event id (evt_ and 26 characters)")
_QUOTED_PATHS = 3
_QUOTED_PATH_LENGTH = 40
_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f]")
_ALLOWED_TYPES = ", ".join(EVENT_TYPES)


def ids(tenant_id: str, endpoint_id: str, *, prefix: str = "") -> None:
    """INVALID_ARGUMENT unless both ids follow their rules."""
    v = Violations()
    v.identifier(TENANT_ID, f"{prefix}tenant_id", tenant_id)
    v.identifier(ENDPOINT_ID, f"{prefix}endpoint_id", endpoint_id)
    v.raise_if_any()


def event_types(field: str, raw: Sequence[str], v: Violations) -> tuple[str, ...]:
    """The types named, each once, in the order given; a violation for any type that does not exist."""
    unknown = [t for t in raw if t not in EVENT_TYPES]
    if unknown:
        v.add(field, f"{_quoted(unknown)} is not an event type; the types are: {_ALLOWED_TYPES}")
    return tuple(dict.fromkeys(raw))


def url(field: str, raw: str, settings: EventsSettings, v: Violations) -> str:
    if not raw:
        v.add(field, "is required (the https:// URL the events are POSTed to)")
        return raw
    if len(raw) > MAX_URL_LENGTH:
        v.add(field, f"must be at most {MAX_URL_LENGTH} characters")
        return raw
    if _UNPRINTABLE.search(raw):
        v.add(field, "must not contain spaces or control characters")
        return raw
    schemes = ("https", "http") if settings.allow_http else ("https",)
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        v.add(field, f"is not a URL ({exc})")
        return raw
    if parts.scheme.lower() not in schemes:
        rule = (
            "must be https:// or http://"
            if settings.allow_http
            else "must be https:// (http:// only with NUMPROTECT_EVENTS_ALLOW_HTTP=on)"
        )
        v.add(field, rule)
    elif not parts.hostname:
        v.add(field, "must name a host")
    elif parts.username is not None or parts.password is not None:
        v.add(field, "must not carry a user name or password (the request is signed instead)")
    elif parts.fragment or raw.endswith("#"):
        v.add(field, "must not have a fragment (#...): it is never sent")
    elif port == 0:
        v.add(field, "must not name port 0")
    else:
        _ip_literal(field, raw, parts.hostname, settings, v)
    return raw


def _ip_literal(field: str, raw: str, host: str, settings: EventsSettings, v: Violations) -> None:
    """What the sender would refuse anyway: a URL it cannot parse as this one, or an IP-literal host outside the
    allowed networks (refused now rather than at every delivery; names are resolved and checked at send time)."""
    try:
        receiver_url(raw, allow_http=settings.allow_http)
    except UrlRefused as exc:
        v.add(field, str(exc))
        return
    legacy = _legacy_ipv4(host)
    if legacy is not None:
        v.add(field, f"must write an IPv4 address as four decimal numbers ({legacy}), not {host[:64]!r}")
        return
    address = ip_literal(host)
    refusal = None if address is None else AddressPolicy(settings.allowed_networks).refusal(address)
    if refusal is not None:
        v.add(field, refusal)


def _legacy_ipv4(host: str) -> str | None:
    """The dotted-decimal address a host in a legacy numeric IPv4 form stands for (inet_aton reads 127.1,
    2130706433, 0x7f000001 and 0177.0.0.1 as 127.0.0.1); None for a standard IP literal or a name."""
    if ip_literal(host) is not None:
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def description(field: str, raw: str, v: Violations) -> str:
    if len(raw) > MAX_DESCRIPTION_LENGTH:
        v.add(field, f"must be at most {MAX_DESCRIPTION_LENGTH} characters")
    elif any(unicodedata.category(c) == "Cc" for c in raw):
        v.add(field, "must not contain control characters (such as terminal escapes, tabs or line breaks)")
    return raw


def batch_size(field: str, raw: int, settings: EventsSettings, v: Violations) -> int:
    if not 0 <= raw <= settings.max_batch_size:
        v.add(
            field,
            f"must be from 0 (one event per request) to {settings.max_batch_size} (NUMPROTECT_EVENTS_MAX_BATCH_SIZE)",
        )
    return raw


def max_concurrency(field: str, raw: int, settings: EventsSettings, v: Violations) -> int:
    if not 0 <= raw <= settings.max_endpoint_concurrency:
        v.add(
            field,
            f"must be from 0 (the service default, {settings.endpoint_concurrency}) to "
            f"{settings.max_endpoint_concurrency} (NUMPROTECT_EVENTS_MAX_ENDPOINT_CONCURRENCY)",
        )
    return raw


def create_spec(request: events_pb2.CreateEndpointRequest, tenant_id: str, settings: EventsSettings) -> EndpointSpec:
    """`tenant_id`: the tenant the call acts for (the caller's own, or the one the operator names)."""
    v = Violations()
    v.identifier(TENANT_ID, "tenant_id", tenant_id)
    spec = EndpointSpec(
        tenant_id=tenant_id,
        url=url("url", request.url, settings, v),
        event_types=event_types("event_types", request.event_types, v),
        description=description("description", request.description, v),
        batch_size=batch_size("batch_size", request.batch_size, settings, v),
        max_concurrency=max_concurrency("max_concurrency", request.max_concurrency, settings, v),
    )
    v.raise_if_any()
    return spec


@dataclass(frozen=True)
class UpdateSpec:
    """The checked new values of the fields an UpdateEndpoint names (`paths`)."""

    paths: frozenset[str]
    url: str
    event_types: tuple[str, ...]
    description: str
    state: int
    batch_size: int
    max_concurrency: int

    def apply(self, endpoint: events_pb2.Endpoint) -> None:
        if "url" in self.paths:
            endpoint.url = self.url
        if "event_types" in self.paths:
            del endpoint.event_types[:]
            endpoint.event_types.extend(self.event_types)
        if "description" in self.paths:
            endpoint.description = self.description
        if "state" in self.paths and endpoint.state != self.state:
            endpoint.state = self.state  # type: ignore[assignment]
            endpoint.state_reason = ""
        if "batch_size" in self.paths:
            endpoint.batch_size = self.batch_size
        if "max_concurrency" in self.paths:
            endpoint.max_concurrency = self.max_concurrency

    def resumes(self, before: events_pb2.Endpoint) -> bool:
        """Whether deliveries should start again at once: enabled again, or a new URL (the old receiver's pause and
        failure count no longer apply)."""
        enabled_again = "state" in self.paths and self.state == ENABLED and before.state != ENABLED
        new_url = "url" in self.paths and self.url != before.url
        return enabled_again or new_url


def update_spec(request: events_pb2.UpdateEndpointRequest, tenant_id: str, settings: EventsSettings) -> UpdateSpec:
    v = Violations()
    endpoint = request.endpoint
    v.identifier(TENANT_ID, "endpoint.tenant_id", tenant_id)
    v.identifier(ENDPOINT_ID, "endpoint.endpoint_id", endpoint.endpoint_id)
    paths = [p.removeprefix("endpoint.") for p in request.update_mask.paths]
    if paths == ["*"]:
        paths = list(UPDATABLE)
    unknown = sorted({p for p in paths if p not in UPDATABLE})
    if not paths:
        v.add("update_mask", f"name at least one of: {', '.join(UPDATABLE)} (or *: all of them)")
    elif unknown:
        v.add("update_mask", f"cannot update {_quoted(unknown)}; updatable: {', '.join(UPDATABLE)} (or *)")
    state = int(endpoint.state)
    if "state" in paths and state not in (ENABLED, DISABLED):
        v.add(
            "endpoint.state",
            "must be ENDPOINT_STATE_ENABLED or ENDPOINT_STATE_DISABLED (GONE is set by the service on a 410 answer)",
        )
    spec = UpdateSpec(
        paths=frozenset(paths),
        url=url("endpoint.url", endpoint.url, settings, v) if "url" in paths else "",
        event_types=event_types("endpoint.event_types", endpoint.event_types, v) if "event_types" in paths else (),
        description=description("endpoint.description", endpoint.description, v) if "description" in paths else "",
        state=state,
        batch_size=batch_size("endpoint.batch_size", endpoint.batch_size, settings, v) if "batch_size" in paths else 0,
        max_concurrency=(
            max_concurrency("endpoint.max_concurrency", endpoint.max_concurrency, settings, v)
            if "max_concurrency" in paths
            else 0
        ),
    )
    v.raise_if_any()
    return spec


def page_size(raw: int) -> int:
    if not 0 <= raw <= MAX_PAGE_SIZE:
        raise InvalidArgument.field("page_size", f"must be from 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
    return raw or DEFAULT_PAGE_SIZE


def event_ids(field: str, raw: Sequence[str], *, most: int) -> list[str]:
    v = Violations()
    if len(raw) > most:
        v.add(field, f"at most {most} event ids per call ({len(raw)} sent)")
    else:
        for index, event_id in enumerate(raw):
            v.identifier(EVENT_ID, f"{field}[{index}]", event_id)
    v.raise_if_any()
    return list(dict.fromkeys(raw))


def _quoted(values: Sequence[str]) -> str:
    """At most a few of the caller's values, each cut short (an error travels in a trailer of bounded size)."""
    shown = [repr(value[:_QUOTED_PATH_LENGTH]) for value in values[:_QUOTED_PATHS]]
    more = len(values) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
