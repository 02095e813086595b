"""cdr.created for a record the real cdr service ingested: the webhook's `data` is the record exactly as the
tenant's ListCdrs shows it, ingest_time included (the stored bytes carry none: both take it from the record's
stream id, the outbox entry's `at`)."""

from __future__ import annotations

import json
from typing import Any

from cdr import conftest as cdr_fixtures
from google.protobuf import json_format

from numprotect.cdr.v1 import cdr_pb2
from support.event_routing import log_entries, router_parts

TENANT = "t1"
# The cdr tests' fixtures: the served cdr service (its carrier routes cdr_fixtures.X), records, bindings.
cdr_service = cdr_fixtures.cdr_service
make_record = cdr_fixtures.make_record
make_binding = cdr_fixtures.make_binding
redis = cdr_fixtures.redis


async def test_a_cdr_created_webhook_carries_the_record_as_list_cdrs_shows_it(
    cdr_service: Any, make_binding: Any, make_record: Any, redis_env: dict[str, str], redis_sync: Any
) -> None:
    await make_binding("b1", tenant_id=TENANT)
    async with cdr_service() as cdr, router_parts(redis_env) as (_, _, router, _):
        reply = await cdr.carrier.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=[make_record("call-1")]))
        assert reply.accepted == 1
        listed = (await cdr.tenant(TENANT).ListCdrs(cdr_pb2.ListCdrsRequest(page_size=10))).records
        assert [r.call_id for r in listed] == ["call-1"]
        assert listed[0].HasField("ingest_time") and listed[0].binding_id == "b1"

        await router.sweep()
        bodies = [json.loads(fields["p"]) for _, fields in log_entries(redis_sync, TENANT)]
        created = [body for body in bodies if body["type"] == "cdr.created"]
        assert len(created) == 1
        assert created[0]["data"] == json_format.MessageToDict(listed[0])
        assert created[0]["data"]["ingestTime"] == json_format.MessageToDict(listed[0])["ingestTime"]
