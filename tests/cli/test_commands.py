"""Every command against the real services: the JSON output parsed and compared with what the services hold
(read back through their own stubs), the table output checked for the same values."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from google.protobuf import json_format

from numprotect.admin.v1 import admin_pb2, admin_pb2_grpc
from numprotect.allocation.v1 import allocation_pb2
from numprotect.binding.v1 import binding_pb2
from numprotect.cdr.v1 import cdr_pb2
from numprotect.core.identity.audit import LOG_KEY
from support.identity import Role

from .conftest import BLOCK, CITY, TENANT, StackFactory, cdr_record

NUMBER = f"{BLOCK}0042"


def as_dict(message: object) -> object:
    """The protobuf JSON mapping the CLI prints: proto field names, defaults included."""
    return json_format.MessageToDict(
        message,  # type: ignore[arg-type]
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


async def test_keys_create_list_revoke(stack: StackFactory, tmp_path: Path) -> None:
    async with stack() as s:
        created = await s.cli(
            "keys", "create", "--role=carrier", "--carrier=cu", "--description=cu switches", "-o", "json"
        )
        assert created.exit_code == 0, created.stderr
        key = created.json()["key"]
        token = created.json()["token"]
        assert key["role"] == "ROLE_CARRIER" and key["carrier_id"] == "cu" and token.startswith(f"npk_{key['key_id']}_")

        token_file = tmp_path / "tenant2.token"
        quiet = await s.cli("keys", "create", "--role=tenant", "--tenant=demo", f"--token-file={token_file}")
        assert quiet.exit_code == 0, quiet.stderr
        written = token_file.read_text().strip()
        assert written.startswith("npk_") and written not in quiet.stdout + quiet.stderr
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        again = await s.cli("keys", "create", "--role=tenant", "--tenant=demo", f"--token-file={token_file}")
        assert again.exit_code == 64 and token_file.read_text().strip() == written  # never overwritten

        admin = admin_pb2_grpc.AdminServiceStub(s.allocation.channel_with(s.operator_token))
        held = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(page_size=1000))
        listed = await s.cli("keys", "list", "--page-size=1000", "-o", "json")
        assert listed.json() == as_dict(held)
        assert key["key_id"] in [k["key_id"] for k in listed.json()["keys"]]
        table = await s.cli("keys", "list", "--role=carrier")
        assert key["key_id"] in table.stdout and "CARRIER" in table.stdout and "cu switches" in table.stdout

        revoked = await s.cli("keys", "revoke", key["key_id"], "-o", "json")
        assert revoked.exit_code == 0 and "revoke_time" in revoked.json()["key"]
        after = await s.cli("keys", "list", "--role=carrier", "-o", "json")
        with_revoked = await s.cli("keys", "list", "--role=carrier", "--show-revoked", "-o", "json")
        held_tokens = [s.operator_token, s.tenant_token, token, written]
        outputs = [created, quiet, listed, table, revoked, after, with_revoked]
    assert key["key_id"] not in [k["key_id"] for k in after.json()["keys"]]
    assert key["key_id"] in [k["key_id"] for k in with_revoked.json()["keys"]]
    # Tokens appear only where a key is minted and printed: created's JSON.
    for result in outputs[1:]:
        for held_token in held_tokens:
            assert held_token not in result.stdout + result.stderr


async def test_numbers_get_lock_unlock_release_history(stack: StackFactory) -> None:
    async with stack() as s:
        got = await s.cli("numbers", "get", NUMBER, "-o", "json")
        held = await s.allocation_stub.GetNumber(allocation_pb2.GetNumberRequest(virtual_number=NUMBER))
        assert got.json() == as_dict(held)
        assert got.json()["number"]["tenant_id"] == TENANT and got.json()["number"]["city_code"] == CITY

        locked = await s.cli("numbers", "lock", NUMBER, "--reason=fraud case 7", "--actor=alice", "-o", "json")
        assert locked.json()["number"]["state"] == "NUMBER_STATE_LOCKED"
        assert locked.json()["number"]["lock_reason"] == "fraud case 7"
        table = await s.cli("numbers", "get", NUMBER)
        assert "LOCKED" in table.stdout and "fraud case 7" in table.stdout and TENANT in table.stdout
        unlocked = await s.cli("numbers", "unlock", NUMBER, "--actor=alice", "-o", "json")
        assert unlocked.json()["number"]["state"] == "NUMBER_STATE_AVAILABLE"
        released = await s.cli("numbers", "release", NUMBER, "--reason=returned", "--actor=bob", "-o", "json")
        assert released.exit_code == 0, released.stderr
        held = await s.allocation_stub.GetNumber(allocation_pb2.GetNumberRequest(virtual_number=NUMBER))
        assert released.json() == {"number": as_dict(held)["number"]}  # type: ignore[index]

        history = await s.cli("numbers", "history", NUMBER, "--all", "-o", "json")
        paged = await s.cli("numbers", "history", NUMBER, "--page-size=1", "-o", "json")
        history_table = await s.cli("numbers", "history", NUMBER)
    kinds = [event["kind"] for event in history.json()["events"]]
    assert {"import", "lock", "unlock", "release"} <= set(kinds)
    lock_event = next(event for event in history.json()["events"] if event["kind"] == "lock")
    assert lock_event["actor"] == "alice" and lock_event["reason"] == "fraud case 7"
    assert history.json()["next_page_token"] == ""
    assert len(paged.json()["events"]) == 1 and paged.json()["next_page_token"]
    assert "fraud case 7" in history_table.stdout and "alice" in history_table.stdout


async def test_bindings_get_list_all_pages_and_trace(stack: StackFactory) -> None:
    async with stack() as s:
        made = [await s.create_binding(f"order-{i}") for i in range(3)]
        ids = {binding.binding_id for binding in made}
        everything = await s.cli("bindings", "list", f"--tenant={TENANT}", "--page-size=2", "--all", "-o", "json")
        first_page = await s.cli("bindings", "list", f"--tenant={TENANT}", "--page-size=2", "-o", "json")
        table = await s.cli("bindings", "list", f"--tenant={TENANT}", "--page-size=2")
        got = await s.cli("bindings", "get", made[0].binding_id, f"--tenant={TENANT}", "--history", "-o", "json")
        held = await s.binding_stub.GetBinding(
            binding_pb2.GetBindingRequest(binding_id=made[0].binding_id, tenant_id=TENANT, include_history=True)
        )
        traced = await s.cli("bindings", "trace", made[0].virtual_number, "--party=13800000001", "-o", "json")
        traced_table = await s.cli("bindings", "trace", made[0].virtual_number)
        as_tenant = await s.cli("--context", "tenant", "bindings", "list", "-o", "json")
    assert {b["binding_id"] for b in everything.json()["bindings"]} == ids
    assert everything.json()["next_page_token"] == ""
    assert len(first_page.json()["bindings"]) == 2 and first_page.json()["next_page_token"]
    assert "more: --page-token " in table.stderr
    assert sum(binding_id in table.stdout for binding_id in ids) == 2
    assert got.json() == as_dict(held)
    assert got.json()["history"][0]["kind"] == "create"
    assert [b["binding_id"] for b in traced.json()["bindings"]] == [made[0].binding_id]
    assert made[0].binding_id in traced_table.stdout
    assert {b["binding_id"] for b in as_tenant.json()["bindings"]} == ids  # the tenant's key: its own


async def test_cdrs_list_and_watch_resuming_from_the_cursor(stack: StackFactory) -> None:
    async with stack() as s:
        binding = await s.create_binding("order-cdr")
        records = [cdr_record(f"call-{i}", binding.virtual_number, binding.binding_id) for i in range(3)]
        ingested = await s.cdr_stub.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records[:2]))
        assert ingested.accepted == 2, ingested
        listed = await s.cli("cdrs", "list", f"--tenant={TENANT}", "--all", "-o", "json")
        table = await s.cli("cdrs", "list", f"--tenant={TENANT}")
        watched = await s.cli("cdrs", "watch", f"--tenant={TENANT}", "--cursor=0", "--limit=2", "-o", "json")
        cursor = watched.stderr.split("--cursor ")[1].strip()
        await s.cdr_stub.IngestCdrs(cdr_pb2.IngestCdrsRequest(records=records[2:]))
        resumed = await s.cli("cdrs", "watch", f"--tenant={TENANT}", f"--cursor={cursor}", "--limit=1")
        quiet = await s.cli("cdrs", "watch", f"--tenant={TENANT}", f"--cursor={cursor}", "--duration=1", "-o", "json")
    assert {r["call_id"] for r in listed.json()["records"]} == {"call-0", "call-1"}
    assert all(r["binding_id"] == binding.binding_id for r in listed.json()["records"])
    assert "call-0" in table.stdout and "call-1" in table.stdout
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [line["record"]["call_id"] for line in lines] == ["call-0", "call-1"]
    assert cursor == lines[-1]["cursor"]
    assert watched.exit_code == 0 and watched.stderr.startswith("2 record(s); resume with --cursor ")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0].split()[:2] == ["CALL_TIME", "CALL_ID"]
    assert ["call-2" in line for line in resumed.stdout.splitlines()[1:]] == [True]
    # --duration ends a watch without an error: the one record after the cursor, then the deadline.
    assert quiet.exit_code == 0, quiet.stderr
    assert [json.loads(line)["record"]["call_id"] for line in quiet.stdout.splitlines()] == ["call-2"]


async def test_audit_list_and_verify_with_a_broken_chain(stack: StackFactory, redis_sync: object) -> None:
    async with stack() as s:
        await s.cli("--context", "tenant", "keys", "list")  # refused: an audit event with outcome PERMISSION_DENIED
        listed = await s.cli("audit", "list", "--page-size=1000", "-o", "json")
        admin = admin_pb2_grpc.AdminServiceStub(s.allocation.channel_as(Role.OPERATOR))
        held = await admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(page_size=1000))
        denied = await s.cli(
            "audit", "list", "--principal=tenant:demo", "--method=/numprotect.admin.v1.AdminService/ListApiKeys"
        )
        verified = await s.cli("audit", "verify", "-o", "json")
        verified_table = await s.cli("audit", "verify")
        events = redis_sync.xrange(LOG_KEY)  # type: ignore[attr-defined]
        redis_sync.xdel(LOG_KEY, events[1][0])  # type: ignore[attr-defined]
        broken = await s.cli("audit", "verify", "-o", "json")
    # The listing is what the service holds, less the events written since (the read of the stub's own call).
    listed_ids = [e["event_id"] for e in listed.json()["events"]]
    held_ids = [e.event_id for e in held.events]
    assert listed_ids and held_ids[-len(listed_ids) :] == listed_ids
    assert "PERMISSION_DENIED" in denied.stdout and "tenant:demo" in denied.stdout
    assert verified.exit_code == 0 and verified.json()["ok"] is True and int(verified.json()["events_checked"]) > 0
    assert "events_checked" in verified_table.stdout
    assert broken.exit_code == 20
    assert broken.json()["ok"] is False and broken.json()["first_bad_event_id"]
    assert broken.stderr.startswith("numprotect: audit chain broken at ")


async def test_doctor_runs_the_invariant_checker(stack: StackFactory, redis_env: dict[str, str]) -> None:
    async with stack() as s:
        await s.create_binding("order-doctor")
        url = redis_env["NUMPROTECT_REDIS_URL"]
        mode = redis_env["NUMPROTECT_REDIS_MODE"]
        as_json = await s.cli("doctor", f"--redis-url={url}", f"--redis-mode={mode}", "-o", "json")
        as_text = await s.cli("doctor", f"--redis-url={url}", f"--redis-mode={mode}", "--output", "table")
        usage = await s.cli("doctor", "--batch=0")
    assert as_json.exit_code == 0, as_json.stdout + as_json.stderr
    report = as_json.json()
    assert report["clean"] is True and report["scanned"]
    assert as_text.exit_code == 0 and as_text.stdout.startswith("numprotect-doctor: clean")
    assert usage.exit_code == 78 and "--batch" in usage.stderr
