"""The route table: what translation reads on every call, written by the binding service.

One Redis schema shared by two services, so it lives here once. Every key of one virtual number X
carries the hash tag {X}, so translation's single script and binding's writes each touch one slot.

    np:rt:{X}:c:<caller>   AXB: the route for a call from <caller> (party A or B) to X
    np:rt:{X}:n            AXN: the route of the binding that owns X
    np:rt:{X}:e:<ext>      AXE: the route selected by extension <ext> on X
    np:rt:{X}:axe          AXE marker: X serves AXE bindings (a call without extension must collect one)
    np:lock:{X}            written by allocation when an operator locks X: calls to X are rejected

The script that writes them (routes_apply.lua) also writes, when asked, the binding's entry in the number's history
(numprotect.core.binding_records, `np:nh:{X}`: the same tag), so a create writes both in one command.

Each route key holds one encoded `Route` and expires (PXAT) at the binding's expiry, so a binding stops
translating the instant it expires, by Redis alone. While its create is not committed, the keys expire at the
create's deadline instead (docs/binding.md, "Create"): a create that failed and could not be undone stops
translating by Redis alone too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from numprotect.core.redis_batch import Command, raise_first, send_together
from numprotect.core.redis_client import LuaScript, RedisClient

MODE_AXB = 1
MODE_AXN = 2
MODE_AXE = 3
RESTRICTION_NONE = 1
RESTRICTION_A_TO_B_ONLY = 2
RESTRICTION_B_TO_A_ONLY = 3
_FORMAT = "r1"


def caller_key(virtual_number: str, caller: str) -> str:
    return f"np:rt:{{{virtual_number}}}:c:{caller}"


def axn_key(virtual_number: str) -> str:
    return f"np:rt:{{{virtual_number}}}:n"


def extension_key(virtual_number: str, extension: str) -> str:
    return f"np:rt:{{{virtual_number}}}:e:{extension}"


def axe_marker_key(virtual_number: str) -> str:
    return f"np:rt:{{{virtual_number}}}:axe"


def lock_key(virtual_number: str) -> str:
    return f"np:lock:{{{virtual_number}}}"


@dataclass(frozen=True, slots=True)
class Route:
    """Everything translation needs to decide a call, in one compact string value."""

    binding_id: str
    tenant_id: str
    mode: int
    party_a: str
    # AXB/AXE: party B; AXN: the default party N ("" when none).
    party_b: str
    call_restriction: int
    recording_enabled: bool
    # AXE: any caller keying the extension reaches A.
    allow_any_caller: bool
    expire_ms: int

    def encode(self) -> str:
        # binding_id comes first: the scripts compare the prefix "<binding_id>|" to guard their writes.
        return "|".join(
            (
                self.binding_id,
                _FORMAT,
                self.tenant_id,
                str(self.mode),
                self.party_a,
                self.party_b,
                str(self.call_restriction),
                "1" if self.recording_enabled else "0",
                "1" if self.allow_any_caller else "0",
                str(self.expire_ms),
            )
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> Route:
        text = raw.decode() if isinstance(raw, bytes) else raw
        fields = text.split("|")
        if len(fields) != 10 or fields[1] != _FORMAT:
            raise ValueError(f"not a {_FORMAT} route value: {text[:40]!r}")
        return cls(
            binding_id=fields[0],
            tenant_id=fields[2],
            mode=int(fields[3]),
            party_a=fields[4],
            party_b=fields[5],
            call_restriction=int(fields[6]),
            recording_enabled=fields[7] == "1",
            allow_any_caller=fields[8] == "1",
            expire_ms=int(fields[9]),
        )

    def keys(self, virtual_number: str, extension: str = "") -> list[str]:
        """The route keys this binding occupies on `virtual_number`."""
        if self.mode == MODE_AXB:
            return [caller_key(virtual_number, self.party_a), caller_key(virtual_number, self.party_b)]
        if self.mode == MODE_AXN:
            return [axn_key(virtual_number)]
        if self.mode == MODE_AXE:
            if not extension:
                raise ValueError("an AXE route needs its extension")
            return [extension_key(virtual_number, extension)]
        raise ValueError(f"unknown mode {self.mode}")


class RouteConflictError(Exception):
    """A route key is held by another live binding (allocation and route table disagree)."""

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(f"{key} is held by binding {holder}")
        self.key = key
        self.holder = holder


@dataclass(frozen=True, slots=True)
class NumberHistory:
    """The binding's entry in its number's history (numprotect.core.binding_records, `np:nh:{X}`: the same slot as
    the number's routes, so the routes' script writes both at once): its score raised to `end_ms`, never lowered;
    entries that ended more than `retention_ms` ago trimmed; the key kept until its newest end + retention."""

    key: str
    end_ms: int
    retention_ms: int


class RouteTable:
    """Writes of the route table, each one atomic script on the keys of one virtual number (routes_apply.lua, which
    also writes the number's history entry of the binding when given one)."""

    _apply = LuaScript.beside(__file__, "routes_apply.lua")

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def put(
        self,
        virtual_number: str,
        route: Route,
        extension: str = "",
        *,
        replaces: Sequence[str] = (),
        until_ms: int | None = None,
        history: NumberHistory | None = None,
    ) -> None:
        """Writes the binding's route keys (expiring at `until_ms`, by default route.expire_ms) and removes
        `replaces` keys it held; with `history`, the binding's entry in the number's history too.

        Used for create (first until the create's deadline, then again until the binding's expiry once it
        committed), for updates (same keys, new value or expiry) and for a party change (the old party's key goes
        in `replaces`). Raises RouteConflictError, writing nothing, if another binding holds a key.
        """
        command = self.put_command(
            virtual_number, route, extension, replaces=replaces, until_ms=until_ms, history=history
        )
        self.check(raise_first(await send_together(self.redis, [command]))[0])

    async def remove(self, virtual_number: str, route: Route, extension: str = "") -> None:
        """Deletes the binding's route keys (only those still holding this binding)."""
        raise_first(await send_together(self.redis, [self.remove_command(virtual_number, route, extension)]))

    @classmethod
    def put_command(
        cls,
        virtual_number: str,
        route: Route,
        extension: str = "",
        *,
        replaces: Sequence[str] = (),
        until_ms: int | None = None,
        history: NumberHistory | None = None,
    ) -> Command:
        """The command of `put`, to send with others (its reply goes to `check`)."""
        keys = route.keys(virtual_number, extension)
        stale = [key for key in replaces if key not in keys]
        expire_at = route.expire_ms if until_ms is None else until_ms
        return cls._command(
            virtual_number,
            route.binding_id,
            route.encode(),
            expire_at,
            stale,
            keys,
            axe=route.mode == MODE_AXE,
            history=history,
        )

    @classmethod
    def remove_command(cls, virtual_number: str, route: Route, extension: str = "") -> Command:
        return cls._command(virtual_number, route.binding_id, "", 0, route.keys(virtual_number, extension), [])

    @classmethod
    def history_command(cls, virtual_number: str, binding_id: str, history: NumberHistory) -> Command:
        """The binding's entry in the number's history alone (no route key written)."""
        return cls._command(virtual_number, binding_id, "", 0, [], [], history=history)

    @staticmethod
    def check(reply: Any) -> None:
        """Raises RouteConflictError for a reply that says another binding holds a key (nothing was written)."""
        if isinstance(reply, list) and reply and reply[0] in (b"CONFLICT", "CONFLICT"):
            key, holder = (x.decode() if isinstance(x, bytes) else str(x) for x in reply[1:3])
            raise RouteConflictError(key, holder)

    @classmethod
    def _command(
        cls,
        virtual_number: str,
        binding_id: str,
        value: str,
        expire_ms: int,
        delete: Sequence[str],
        put: Sequence[str],
        *,
        axe: bool = False,
        history: NumberHistory | None = None,
    ) -> Command:
        keys = [axe_marker_key(virtual_number), *delete, *put]
        args: list[str | int] = [binding_id, value, expire_ms, len(delete), len(put), 1 if axe else 0]
        if history is not None:
            keys.append(history.key)
            args.extend((history.end_ms, history.retention_ms))
        return Command.run(cls._apply, keys, args)
