"""The allocation pools' key layout (docs/redis-schema.md, "Allocation"; docs/allocation.md): written by the
allocation service only, read by it and by the invariant checker (numprotect.core.doctor), so it lives here once.

A pool (tenant x city) is N sub-pools, N fixed when the pool is created (its first import). Each sub-pool has
its own hash tag: sub-pool 0 `{pool:<tenant>:<city>}` (the tag every pool had before sub-pools: a pool made then
is one sub-pool, unchanged), sub-pool k > 0 `{pool:<tenant>:<city>:s<k>.<salt>}`, the salt chosen so that the
sub-pools' slots are spread evenly over the cluster's 16,384 slots (PoolLayout). Every number belongs to exactly
one sub-pool (`subpool_of`), and everything one allocation reads and writes (free set, load indexes, the numbers'
reservations and history) lives in that sub-pool's slot, so one script picks and reserves atomically.
A block's owner record has its own tag {blk:<block>}; a tenant's city list {tenant:<tenant>}.
The sub-pool's keys (`<P>:avail`, `:axb`, `:r:<number>`, ...) are listed in allocation's lua/pool_lib.lua.
"""

from __future__ import annotations

import base64
import re
from binascii import crc_hqx
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from numprotect.core.errors import InvalidArgument
from numprotect.core.identifiers import TENANT_ID
from numprotect.core.phone import validate_city_code, validate_virtual

_RID = re.compile(r"[0-9a-f]{16}")
_HANDLE_V1 = "rv1"  # tenant:city:number:rid (a pool of one sub-pool)
_HANDLE_V2 = "rv2"  # tenant:city:number:rid:subpools
BLOCK_SIZE = 10_000  # numbers per imported block (allocation's lua/import_block.lua)
MAX_SUBPOOLS = 16  # a pool on up to 16 primaries: ~16 x 4,000 allocations/s at 50 % of each core


def pool_key(tenant: str, city: str) -> str:
    """Base key of a pool's sub-pool 0, and the pool's record: a hash of tenant, city, total (numbers of this
    sub-pool), subpool (0), subpools (N; absent in pools made before sub-pools, which have one)."""
    return f"np:alloc:{{pool:{tenant}:{city}}}"


def subpool_of(number: str, subpools: int) -> int:
    """The sub-pool that holds `number` in a pool of `subpools`: its last four digits modulo the count, so each
    sub-pool gets an equal share of every block (import_block.lua adds <block><i> to sub-pool i mod N)."""
    return int(number[-4:]) % subpools


def subpool_share(index: int, subpools: int) -> int:
    """How many numbers of one block sub-pool `index` of `subpools` holds."""
    return len(range(index, BLOCK_SIZE, subpools))


def _in_slice(slot: int, wanted: int, subpools: int) -> bool:
    """Whether `slot` lies in the middle half of slice `wanted` when the slots are cut into `subpools` equal slices
    (clear of the slice's edges, where a cluster's slot ranges may be cut one slot off)."""
    position = slot * subpools / REDIS_CLUSTER_HASH_SLOTS - wanted
    return 0.25 <= position < 0.75


def subpool_key(tenant: str, city: str, index: int, subpools: int) -> str:
    """Base key of sub-pool `index` of a pool of `subpools`. Sub-pool 0 is `pool_key`, wherever its slot falls;
    sub-pool k lies k slices after it (the slots cut into `subpools` equal slices), in the middle half of that slice:
    on a cluster whose primaries serve equal runs of slots (the layout `redis-cli --cluster create` makes), the
    sub-pools of a pool sit on min(N, primaries) different primaries, spread evenly when N is a multiple of the
    primaries. The salt is the first that lands there (about 2N tries of a CRC16: callers keep layouts they reuse)."""
    if not 0 <= index < subpools:
        raise ValueError(f"sub-pool {index} of {subpools}")
    if index == 0:
        return pool_key(tenant, city)
    base = f"pool:{tenant}:{city}"
    wanted = (key_slot(base.encode()) * subpools // REDIS_CLUSTER_HASH_SLOTS + index) % subpools
    prefix = f"{base}:s{index}."
    salt = 0
    while not _in_slice(crc_hqx(f"{prefix}{salt}".encode(), 0) % REDIS_CLUSTER_HASH_SLOTS, wanted, subpools):
        salt += 1
    return f"np:alloc:{{{prefix}{salt}}}"


@dataclass(frozen=True)
class PoolLayout:
    """The sub-pools of one pool: their base keys (index = sub-pool) and which one holds a number."""

    tenant: str
    city: str
    keys: tuple[str, ...]

    @classmethod
    def of(cls, tenant: str, city: str, subpools: int) -> PoolLayout:
        return cls(tenant, city, tuple(subpool_key(tenant, city, k, subpools) for k in range(subpools)))

    @property
    def subpools(self) -> int:
        return len(self.keys)

    def key_of(self, number: str) -> str:
        """Base key of the sub-pool holding `number`."""
        return self.keys[subpool_of(number, len(self.keys))]

    def history_key(self, number: str) -> str:
        return history_key_in(self.key_of(number), number)


def block_owner_key(block: str) -> str:
    return f"np:alloc:{{blk:{block}}}:owner"


def block_history_key(block: str) -> str:
    return f"np:alloc:{{blk:{block}}}:hist"


def tenant_cities_key(tenant: str) -> str:
    return f"np:alloc:{{tenant:{tenant}}}:cities"


def number_subpool_key(tenant: str, city: str, number: str, subpools: int = 1) -> str:
    """Base key of the sub-pool holding `number` in a pool of `subpools` (the pool record's `subpools` field)."""
    return subpool_key(tenant, city, subpool_of(number, subpools), subpools)


def expired_key_in(subpool: str) -> str:
    """Bindings whose confirmed reservation lapsed in the sub-pool (their end) not yet counted by a process
    (pool_lib.lua's prune adds, allocation's pool metrics take it with GETDEL: each counted once)."""
    return f"{subpool}:expired"


# A number's keys inside the sub-pool (base key `subpool`) that holds it.
def history_key_in(subpool: str, number: str) -> str:
    return f"{subpool}:hist:{number}"


def reservations_key_in(subpool: str, number: str) -> str:
    return f"{subpool}:r:{number}"


def hash_key_in(subpool: str, number: str) -> str:
    return f"{subpool}:h:{number}"


# Allocation's net take from a sub-pool's free set per UTC day (allocate.lua counts, pool_stats.lua sums the last
# RATE_WINDOW_DAYS days, today included): in the sub-pool's slot, so the scripts touch one slot.
DAY_MS = 86_400_000
RATE_WINDOW_DAYS = 7


def taken_key_in(subpool: str, day: int) -> str:
    """The net take counter of UTC day `day` (days since the epoch) in the sub-pool with base key `subpool`."""
    return f"{subpool}:taken:{day}"


def rate_window_ms(now_ms: int) -> int:
    """The rate window at `now_ms`: from 00:00 UTC of the day RATE_WINDOW_DAYS - 1 days before today until now."""
    return now_ms - (now_ms // DAY_MS - (RATE_WINDOW_DAYS - 1)) * DAY_MS


def number_history_key(tenant: str, city: str, number: str, subpools: int = 1) -> str:
    return history_key_in(number_subpool_key(tenant, city, number, subpools), number)


def number_reservations_key(tenant: str, city: str, number: str, subpools: int = 1) -> str:
    return reservations_key_in(number_subpool_key(tenant, city, number, subpools), number)


def number_hash_key(tenant: str, city: str, number: str, subpools: int = 1) -> str:
    return hash_key_in(number_subpool_key(tenant, city, number, subpools), number)


@dataclass(frozen=True)
class Handle:
    """What a reservation id encodes: enough to find its sub-pool's keys without a lookup. `subpools` is the pool's
    sub-pool count: with the number it names the sub-pool. Pools of one sub-pool get `rv1` handles (as before
    sub-pools, so a process of the previous release reads them), others `rv2`; both decode."""

    tenant: str
    city: str
    number: str
    rid: str
    subpools: int = 1

    def encode(self) -> str:
        fields = [self.tenant, self.city, self.number, self.rid]
        version = _HANDLE_V1
        if self.subpools != 1:
            fields.append(str(self.subpools))
            version = _HANDLE_V2
        raw = ":".join(fields).encode()
        return f"{version}.{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"

    @classmethod
    def decode(cls, field: str, handle: str) -> Handle:
        if not handle:
            raise InvalidArgument.field(field, "is required")
        version, _, body = handle.partition(".")
        try:
            if version not in (_HANDLE_V1, _HANDLE_V2):
                raise ValueError
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
            parts = raw.split(":")
            subpools = 1
            if version == _HANDLE_V2:
                count = parts.pop()
                if not count.isdigit() or not 2 <= int(count) <= MAX_SUBPOOLS:
                    raise ValueError
                subpools = int(count)
            tenant, city, number, rid = parts
            if not (TENANT_ID.matches(tenant) and _RID.fullmatch(rid)):
                raise ValueError
            validate_city_code(city)
            validate_virtual(number)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument.field(field, "is not a reservation id issued by AllocateNumber") from None
        return cls(tenant, city, number, rid, subpools)
