"""`numprotect endpoints ...` and `numprotect events ...` against the real events service (with binding making the
events) and a real HTTP receiver on loopback: the JSON output compared with what the service holds, the table output
checked for the same values, webhooks verified with the standardwebhooks library and the secret the CLI printed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

from support.webhook_receiver import Received, Reply, WebhookReceiver, webhook_receiver

from .conftest import TENANT, Stack, StackFactory

OTHER_TENANT = "other"


async def eventually(probe: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    """`await probe()` every 0.1 s until `done` accepts its answer; that answer (the test fails after 15 s)."""
    deadline = time.monotonic() + 15
    while True:
        answer = await probe()
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"still {answer} after 15 s"
        await asyncio.sleep(0.1)


def verified(secret: str, received: Received) -> Any:
    """The webhook's body, once its signature verifies with `secret` (raises otherwise)."""
    return Webhook(secret).verify(received.body, received.headers)


async def test_endpoints_create_get_list_update_rotate_delete(stack: StackFactory) -> None:
    async with stack() as s:
        # A tenant's own key: no --tenant; the secret is printed once, after the table.
        created = await s.cli(
            "--context=tenant",
            "endpoints",
            "create",
            "--url=https://hooks.example.com/np",
            "--event-type=binding.created",
            "--event-type=binding.expired",
            "--description=orders",
        )
        assert created.exit_code == 0, created.stderr
        assert "https://hooks.example.com/np" in created.stdout and "ENABLED" in created.stdout
        secret_line = created.stdout.strip().splitlines()[-1]
        assert secret_line.startswith("signing secret (shown once): whsec_"), created.stdout
        assert created.stdout.count("whsec_") == 1  # not in the table as well
        # The operator names the tenant; JSON is the CreateEndpointResponse, the secret in it.
        made = await s.cli(
            "endpoints", "create", f"--tenant={TENANT}", "--url=https://hooks.example.com/two", "-o", "json"
        )
        assert made.exit_code == 0, made.stderr
        endpoint = made.json()["endpoint"]
        endpoint_id = endpoint["endpoint_id"]
        assert endpoint["secret"].startswith("whsec_") and endpoint["event_types"] == []
        assert endpoint["state"] == "ENDPOINT_STATE_ENABLED" and endpoint["tenant_id"] == TENANT

        got = await s.cli("endpoints", "get", endpoint_id, f"--tenant={TENANT}", "-o", "json")
        assert got.exit_code == 0, got.stderr
        assert got.json()["endpoint"]["url"] == "https://hooks.example.com/two"
        assert got.json()["endpoint"]["secret"] == ""  # shown only by create and rotate-secret
        listed = await s.cli("--context=tenant", "endpoints", "list", "-o", "json")
        assert sorted(e["url"] for e in listed.json()["endpoints"]) == [
            "https://hooks.example.com/np",
            "https://hooks.example.com/two",
        ]
        table = await s.cli("endpoints", "list", f"--tenant={TENANT}")
        assert (
            table.exit_code == 0 and endpoint_id in table.stdout and "binding.created, binding.expired" in table.stdout
        )

        # update: the options given, nothing else; --disable / --enable is the state.
        updated = await s.cli(
            "endpoints", "update", endpoint_id, f"--tenant={TENANT}", "--description=billing", "--disable", "-o", "json"
        )
        assert updated.exit_code == 0, updated.stderr
        after = updated.json()["endpoint"]
        assert (after["description"], after["state"], after["url"]) == (
            "billing",
            "ENDPOINT_STATE_DISABLED",
            "https://hooks.example.com/two",
        )
        enabled = await s.cli("endpoints", "update", endpoint_id, f"--tenant={TENANT}", "--enable", "--batch-size=10")
        assert enabled.exit_code == 0 and "ENABLED" in enabled.stdout and "billing" in enabled.stdout
        nothing = await s.cli("endpoints", "update", endpoint_id, f"--tenant={TENANT}")
        assert nothing.exit_code == 64 and "give at least one of --url" in nothing.stderr
        # --all-types and --event-type contradict each other: a usage error, the endpoint untouched.
        both = await s.cli(
            "endpoints", "update", endpoint_id, f"--tenant={TENANT}", "--all-types", "--event-type=binding.created"
        )
        assert both.exit_code == 64 and "--all-types or --event-type" in both.stderr, both.stderr

        # rotate-secret: a new secret, the previous one signing until the grace period ends.
        rotated = await s.cli(
            "endpoints", "rotate-secret", endpoint_id, f"--tenant={TENANT}", "--grace=1h", "-o", "json"
        )
        assert rotated.exit_code == 0, rotated.stderr
        new = rotated.json()["endpoint"]
        assert new["secret"].startswith("whsec_") and new["secret"] != endpoint["secret"]
        grace_end = datetime.fromisoformat(new["previous_secret_expire_time"])
        assert 3500 < (grace_end - datetime.now(UTC)).total_seconds() <= 3600

        # Errors: one line, the status's exit code.
        bad = await s.cli("endpoints", "create", f"--tenant={TENANT}", "--url=ftp://example.com/x")
        assert bad.exit_code == 3 and bad.stderr.startswith("numprotect: INVALID_ARGUMENT: ") and "url" in bad.stderr
        other = await s.cli("--context=tenant", "endpoints", "get", endpoint_id, f"--tenant={OTHER_TENANT}")
        assert other.exit_code == 7, other.stderr  # another tenant's: PERMISSION_DENIED

        deleted = await s.cli("endpoints", "delete", endpoint_id, f"--tenant={TENANT}")
        assert deleted.exit_code == 0 and deleted.stdout == f"endpoint {endpoint_id} deleted\n"
        gone = await s.cli("endpoints", "get", endpoint_id, f"--tenant={TENANT}")
        assert gone.exit_code == 5 and gone.stderr.startswith("numprotect: NOT_FOUND: ")
        remaining = await s.cli("endpoints", "list", f"--tenant={TENANT}", "-o", "json")
        assert [e["url"] for e in remaining.json()["endpoints"]] == ["https://hooks.example.com/np"]


async def _failing_endpoint(s: Stack, receiver: WebhookReceiver) -> tuple[str, str]:
    """An endpoint of TENANT for binding.created at `receiver`: (its id, its secret)."""
    created = await s.cli(
        "endpoints",
        "create",
        f"--tenant={TENANT}",
        f"--url={receiver.url}",
        "--event-type=binding.created",
        "-o",
        "json",
    )
    assert created.exit_code == 0, created.stderr
    endpoint = created.json()["endpoint"]
    return endpoint["endpoint_id"], endpoint["secret"]


async def test_deliveries_dead_letters_redrive_replay_and_watch(stack: StackFactory) -> None:
    async with stack() as s, webhook_receiver() as receiver:
        receiver.script([Reply(500)])
        endpoint_id, secret = await _failing_endpoint(s, receiver)
        before = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        binding = await s.create_binding("order-events-1")

        # Three attempts (the first, then 200 ms and 400 ms later), each answered 500, all signed, one event id.
        received = await receiver.wait_for(3)
        event_id = received[0].webhook_id
        assert [r.webhook_id for r in received] == [event_id] * 3
        body = verified(secret, received[0])
        assert body["type"] == "binding.created" and body["data"]["bindingId"] == binding.binding_id

        async def dead() -> Any:
            return await s.cli("events", "dead-letters", endpoint_id, f"--tenant={TENANT}", "-o", "json")

        letters = await eventually(dead, lambda r: r.exit_code == 0 and r.json()["dead_letters"])
        (letter,) = letters.json()["dead_letters"]
        assert (letter["event_id"], letter["event_type"], letter["attempts"]) == (event_id, "binding.created", 3)
        assert "500" in letter["last_error"]
        table = await s.cli("--context=tenant", "events", "dead-letters", endpoint_id)
        assert table.exit_code == 0 and event_id in table.stdout and "EVENT_TYPE" in table.stdout

        attempts = await s.cli("events", "deliveries", endpoint_id, f"--tenant={TENANT}", "-o", "json")
        assert attempts.exit_code == 0, attempts.stderr
        deliveries = attempts.json()["deliveries"]
        assert [d["attempt"] for d in deliveries] == [3, 2, 1]  # newest first
        assert {(d["event_id"], d["http_status"], d["succeeded"]) for d in deliveries} == {(event_id, 500, False)}
        only = await s.cli("events", "deliveries", endpoint_id, f"--tenant={TENANT}", f"--event-id={event_id}")
        assert only.exit_code == 0 and only.stdout.count(event_id) == 3 and "500" in only.stdout

        # The receiver works again: redrive sends the dead letter once more, same id, and it succeeds.
        receiver.script([Reply(200)])
        redriven = await s.cli("events", "redrive", endpoint_id, f"--tenant={TENANT}")
        assert redriven.exit_code == 0 and redriven.stdout == f"1 event(s) requeued to {endpoint_id}\n", redriven
        received = await receiver.wait_for(4)
        assert received[3].webhook_id == event_id
        assert verified(secret, received[3]) == body
        after = await eventually(dead, lambda r: r.exit_code == 0 and not r.json()["dead_letters"])
        assert after.json()["dead_letters"] == []

        async def succeeded() -> Any:
            return await s.cli("events", "deliveries", endpoint_id, f"--tenant={TENANT}", "-o", "json")

        await eventually(succeeded, lambda r: any(d["succeeded"] for d in r.json()["deliveries"]))

        # Replay: the events of a time range, again, with their ids.
        replayed = await s.cli("events", "replay", endpoint_id, f"--tenant={TENANT}", f"--since={before}", "-o", "json")
        assert replayed.exit_code == 0, replayed.stderr
        assert replayed.json() == {"events_queued": "1"}
        received = await receiver.wait_for(5)
        assert received[4].webhook_id == event_id and verified(secret, received[4]) == body
        refused = await s.cli("events", "replay", endpoint_id, f"--tenant={TENANT}", "--since=yesterday")
        assert refused.exit_code == 64 and "--since: 'yesterday' is not an RFC 3339 time" in refused.stderr

        # watch: the tenant's log from its oldest event, the same id and body as the webhook; the cursor resumes.
        watched = await s.cli(
            "--context=tenant",
            "events",
            "watch",
            "--cursor=0",
            "--limit=1",
            "--event-type=binding.created",
            "-o",
            "json",
        )
        assert watched.exit_code == 0, watched.stderr
        (line,) = watched.stdout.splitlines()
        streamed = json.loads(line)
        assert streamed["event"]["event_id"] == event_id and json.loads(streamed["event"]["payload_json"]) == body
        assert watched.stderr == f"1 event(s); resume with --cursor {streamed['cursor']}\n"
        table = await s.cli("events", "watch", f"--tenant={TENANT}", "--cursor=0", "--limit=1")
        assert table.exit_code == 0 and event_id in table.stdout and "binding.created" in table.stdout
        quiet = await s.cli(
            "events", "watch", f"--tenant={TENANT}", f"--cursor={streamed['cursor']}", "--duration=1", "-o", "json"
        )
        assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr.startswith("0 event(s)"), quiet
        # A tenant cannot read another tenant's deliveries.
        other = await s.cli("--context=tenant", "events", "deliveries", endpoint_id, f"--tenant={OTHER_TENANT}")
        assert other.exit_code == 7, other.stderr
