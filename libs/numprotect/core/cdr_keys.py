"""The CDR key layout (docs/redis-schema.md, section CDR): written by the cdr service, read by it and by the
invariant checker (numprotect.core.doctor), so it lives here once.

Every key of one bucket (a tenant, or the operator's "unmatched" bucket) shares one hash tag, so the
ingest script, the list script and the watch read each touch one slot:

    np:cdr:{t:<tenant>}:s                 stream of the tenant's records (field p = CallDetailRecord bytes)
    np:cdr:{t:<tenant>}:id:<n>:<carrier>:<call_id>
                                          dedup key: the stream id the carrier's call_id was stored under
                                          (n = the carrier id's length: carrier ids may hold ':')
    np:cdr:{t:<tenant>}:ix:t              ZSET stream id by call time (ms): time-range listing
    np:cdr:{t:<tenant>}:ix:b:<binding>    ZSET stream id by call time, one binding
    np:cdr:{t:<tenant>}:ix:o:<order>      ZSET stream id by call time, one out_order_id
    np:cdr:{t:<tenant>}:d:<YYYYMMDD>      HASH daily counters (Beijing date of the call)
    np:cdr:{t:<tenant>}:ab:<w>:<X>        HASH abuse counters of window w on virtual number X
    np:cdr:{t:<tenant>}:abf:<w>           ZSET flagged "X|caller" pairs of window w
The unmatched bucket uses the tag {unmatched} in place of {t:<tenant>}.
"""

from __future__ import annotations

from dataclasses import dataclass

UNMATCHED_TAG = "{unmatched}"


@dataclass(frozen=True, slots=True)
class Bucket:
    """The keys of one tenant's records (or of the unmatched records, tenant_id == "")."""

    tenant_id: str

    @property
    def prefix(self) -> str:
        tag = UNMATCHED_TAG if not self.tenant_id else "{t:" + self.tenant_id + "}"
        return f"np:cdr:{tag}:"

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
