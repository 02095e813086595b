"""The CDR key layout (docs/redis-schema.md, section CDR): written by the cdr service, read by it and by the
invariant checker (numprotect.core.doctor), so it lives here once.

The records of one owner (a tenant, or the operator's "unmatched" records) are split into N buckets, N fixed
for the owner when its first record is stored (`count_key`; NUMPROTECT_CDR_STREAM_BUCKETS for a new owner, 1 for
an owner whose stream was written before buckets existed). A record's bucket is a function of its virtual number
(`bucket_index`), so every record of a binding, and every abuse counter of a number, is in one bucket. Every key
of one bucket shares one hash tag, so the ingest script, the list scripts and a watch read each touch one slot:

    np:cdr:{<tag>}:s                      stream of the bucket's records (field p = CallDetailRecord bytes)
    np:cdr:{<tag>}:id:<n>:<carrier>:<call_id>
                                          dedup key: the stream id the carrier's call_id was stored under
                                          (n = the carrier id's length: carrier ids may hold ':')
    np:cdr:{<tag>}:ix:t                   ZSET stream id by call time (ms): time-range listing
    np:cdr:{<tag>}:ix:b:<binding>         ZSET stream id by call time, one binding
    np:cdr:{<tag>}:ix:o:<order>           ZSET stream id by call time, one out_order_id
    np:cdr:{<tag>}:d:<YYYYMMDD>           HASH daily counters (Beijing date of the call)
    np:cdr:{<tag>}:ab:<w>:<X>             HASH abuse counters of window w on virtual number X
    np:cdr:{<tag>}:abf:<w>                ZSET flagged "X|caller" pairs of window w
    np:cdr:{<tag0>}:buckets               the owner's bucket count N (in bucket 0's slot; no expiry)

Bucket 0's tag is the owner's: `t:<tenant>`, or `unmatched` (the names from before buckets, so an owner's
single-stream data is its bucket 0 as it stands). Bucket k >= 1 has `<tag0>:<k>.<s>`: s is the smallest number
>= 0 that puts the tag within SLOT_SPREAD slots of slot(tag0) + k * 16384 / N, so an owner's buckets sit evenly
around the slot ring (on a cluster whose primaries hold contiguous slot ranges, N <= primaries buckets land on N
different primaries). Tenant ids hold no ':' (identifiers.TENANT_ID), so no tag of one owner is another's.
"""

from __future__ import annotations

import binascii
import itertools
import re
import zlib
from dataclasses import dataclass

UNMATCHED_TAG = "{unmatched}"
# Most buckets an owner may have (NUMPROTECT_CDR_STREAM_BUCKETS' maximum): a watch holds one read per bucket.
MAX_BUCKETS = 64
# Redis Cluster's slots, and how far from its target slot a bucket's tag may hash.
CLUSTER_SLOTS = 16384
SLOT_SPREAD = 64
_TAG = re.compile(r"(?P<owner>t:[^{}:]+|unmatched)(?::(?P<index>[1-9][0-9]*)\.(?P<salt>0|[1-9][0-9]*))?")


def owner_tag(tenant_id: str) -> str:
    """Bucket 0's hash tag (without braces) of a tenant's records, or of the unmatched ones (tenant_id "")."""
    return "t:" + tenant_id if tenant_id else UNMATCHED_TAG[1:-1]


def slot_of(tag: str) -> int:
    """The Redis Cluster slot of a hash tag (CRC16-XMODEM mod 16384, as Redis computes it)."""
    return binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


def bucket_index(virtual_number: str, count: int) -> int:
    """The bucket of a record whose called (virtual) number is `virtual_number`, of `count` buckets. A binding has
    one virtual number, so all of its records share a bucket; CRC-32 spreads consecutive numbers evenly."""
    return zlib.crc32(virtual_number.encode()) % count if count > 1 else 0


def bucket_salt(tenant_id: str, index: int, count: int) -> int:
    """The s of bucket `index` (>= 1) of `count`: the first that hashes its tag near its place on the slot ring."""
    base = owner_tag(tenant_id)
    target = (slot_of(base) + index * CLUSTER_SLOTS // count) % CLUSTER_SLOTS
    for salt in itertools.count():
        distance = (slot_of(f"{base}:{index}.{salt}") - target) % CLUSTER_SLOTS
        if min(distance, CLUSTER_SLOTS - distance) <= SLOT_SPREAD:
            return salt
    raise AssertionError("unreachable")  # pragma: no cover


def count_key(tenant_id: str) -> str:
    """The key holding an owner's bucket count (absent: the owner has stored nothing since buckets exist, so
    whatever it has is in bucket 0)."""
    return Bucket(tenant_id).prefix + "buckets"


@dataclass(frozen=True, slots=True)
class Bucket:
    """The keys of one bucket of a tenant's records (or of the unmatched records, tenant_id == ""). Bucket 0
    (the default) has the names of the single stream an owner had before buckets."""

    tenant_id: str
    index: int = 0
    salt: int = 0

    @classmethod
    def from_tag(cls, tag: str) -> Bucket | None:
        """The bucket whose hash tag (without braces) is `tag`; None for a tag of no CDR bucket."""
        match = _TAG.fullmatch(tag)
        if match is None:
            return None
        owner = match["owner"]
        tenant_id = owner[2:] if owner.startswith("t:") else ""
        if match["index"] is None:
            return cls(tenant_id)
        return cls(tenant_id, int(match["index"]), int(match["salt"]))

    @property
    def tag(self) -> str:
        base = owner_tag(self.tenant_id)
        return base if self.index == 0 else f"{base}:{self.index}.{self.salt}"

    @property
    def prefix(self) -> str:
        return "np:cdr:{" + self.tag + "}:"

    @property
    def stream(self) -> str:
        return self.prefix + "s"

    def dedup(self, carrier_id: str, call_id: str) -> str:
        # Per carrier: call ids are the carrier's own (two switches may issue the same one), and a carrier must
        # not be able to pre-empt another carrier's record by sending its call_id first.
        return f"{self.prefix}id:{len(carrier_id)}:{carrier_id}:{call_id}"

    @property
    def time_index(self) -> str:
        return self.prefix + "ix:t"

    def binding_index(self, binding_id: str) -> str:
        return f"{self.prefix}ix:b:{binding_id}"

    def order_index(self, out_order_id: str) -> str:
        return f"{self.prefix}ix:o:{out_order_id}"

    def daily(self, yyyymmdd: str) -> str:
        return f"{self.prefix}d:{yyyymmdd}"

    def abuse(self, window_start_ms: int, virtual_number: str) -> str:
        return f"{self.prefix}ab:{window_start_ms}:{virtual_number}"

    def abuse_flagged(self, window_start_ms: int) -> str:
        return f"{self.prefix}abf:{window_start_ms}"


@dataclass(frozen=True, slots=True)
class Buckets:
    """All buckets of one owner's records: `all[k]` is bucket k, `for_number` the one a record belongs in."""

    tenant_id: str
    all: tuple[Bucket, ...]

    @classmethod
    def of(cls, tenant_id: str, count: int) -> Buckets:
        if not 1 <= count <= MAX_BUCKETS:
            raise ValueError(f"a CDR bucket count is 1 to {MAX_BUCKETS} ({count} given)")
        rest = (Bucket(tenant_id, k, bucket_salt(tenant_id, k, count)) for k in range(1, count))
        return cls(tenant_id, (Bucket(tenant_id), *rest))

    @property
    def count(self) -> int:
        return len(self.all)

    def for_number(self, virtual_number: str) -> Bucket:
        return self.all[bucket_index(virtual_number, len(self.all))]
