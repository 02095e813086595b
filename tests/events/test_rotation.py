"""RotateEndpointSecret: during the grace period requests carry both signatures and each secret verifies with the
standardwebhooks library; after it only the new one signs. Secrets appear only in Create and Rotate answers."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from events.conftest import TENANT, ServiceFactory
from google.protobuf import duration_pb2, field_mask_pb2
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from numprotect.events.v1 import events_pb2 as pb
from numprotect.services.events.signing import signed_headers
from support.rpc import fails

URL = "https://hooks.example.com/h"
BODY = json.dumps({"id": "evt_" + "a" * 26, "type": "binding.created", "data": {}}).encode()


def headers_of(secrets: list[str]) -> dict[str, str]:
    return signed_headers(secrets, "evt_" + "a" * 26, int(time.time()), BODY)


def verifies(secret: str, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(BODY, headers)
    except WebhookVerificationError:
        return False
    return True


async def test_both_secrets_sign_during_the_grace_and_only_the_new_one_after(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        old = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint
        before_ms = time.time_ns() // 1_000_000
        rotated = (
            await tenant.RotateEndpointSecret(
                pb.RotateEndpointSecretRequest(
                    endpoint_id=old.endpoint_id, grace_period=duration_pb2.Duration(seconds=3600)
                )
            )
        ).endpoint
        assert rotated.secret.startswith("whsec_") and rotated.secret != old.secret
        until_ms = rotated.previous_secret_expire_time.ToMilliseconds()
        assert before_ms + 3_600_000 <= until_ms <= time.time_ns() // 1_000_000 + 3_600_000

        stored = await events.endpoints.get_stored(TENANT, old.endpoint_id)
        assert stored is not None
        during = stored.signing_secrets(until_ms - 1)
        assert during == [rotated.secret, old.secret]
        headers = headers_of(during)
        assert len(headers["webhook-signature"].split(" ")) == 2
        assert verifies(old.secret, headers) and verifies(rotated.secret, headers)

        after = stored.signing_secrets(until_ms)
        assert after == [rotated.secret]
        headers = headers_of(after)
        assert verifies(rotated.secret, headers)
        assert not verifies(old.secret, headers)

        # Get shows when the previous secret stops, never a secret.
        got = (await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=old.endpoint_id))).endpoint
        assert got.secret == "" and got.previous_secret_expire_time.ToMilliseconds() == until_ms


async def test_a_grace_that_ran_out_leaves_only_the_new_secret(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        old = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint
        rotated = (
            await tenant.RotateEndpointSecret(
                pb.RotateEndpointSecretRequest(
                    endpoint_id=old.endpoint_id, grace_period=duration_pb2.Duration(nanos=200_000_000)
                )
            )
        ).endpoint
        stored = await events.endpoints.get_stored(TENANT, old.endpoint_id)
        assert stored is not None
        now_ms = time.time_ns() // 1_000_000
        if now_ms < stored.previous_secret_expire_ms:
            assert stored.signing_secrets(now_ms) == [rotated.secret, old.secret]
        await asyncio.sleep(max(0.0, (stored.previous_secret_expire_ms - now_ms) / 1000) + 0.01)
        assert stored.signing_secrets(time.time_ns() // 1_000_000) == [rotated.secret]
        got = (await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=old.endpoint_id))).endpoint
        assert not got.HasField("previous_secret_expire_time")
        # The next change of the endpoint stores the old secret no more.
        await tenant.UpdateEndpoint(
            pb.UpdateEndpointRequest(
                endpoint=pb.Endpoint(endpoint_id=old.endpoint_id, description="later"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        )
        after = await events.endpoints.get_stored(TENANT, old.endpoint_id)
        assert after is not None and (after.secret, after.previous_secret) == (rotated.secret, "")


async def test_grace_zero_stops_the_old_secret_at_once_and_the_default_is_the_setting(
    events_service: ServiceFactory,
) -> None:
    async with events_service(background=False, NUMPROTECT_EVENTS_ROTATION_GRACE="90m") as events:
        tenant = events.tenant()
        ep = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint.endpoint_id
        rotated = (
            await tenant.RotateEndpointSecret(
                pb.RotateEndpointSecretRequest(endpoint_id=ep, grace_period=duration_pb2.Duration(seconds=0))
            )
        ).endpoint
        assert not rotated.HasField("previous_secret_expire_time")
        stored = await events.endpoints.get_stored(TENANT, ep)
        assert stored is not None and stored.signing_secrets(0) == [rotated.secret]
        assert stored.previous_secret == ""

        now_ms = time.time_ns() // 1_000_000
        second = (await tenant.RotateEndpointSecret(pb.RotateEndpointSecretRequest(endpoint_id=ep))).endpoint
        until_ms = second.previous_secret_expire_time.ToMilliseconds()
        assert now_ms + 90 * 60_000 <= until_ms <= now_ms + 90 * 60_000 + 5_000
        # A third rotation within the grace: the previous is the second secret; the first signs no more.
        third = (await tenant.RotateEndpointSecret(pb.RotateEndpointSecretRequest(endpoint_id=ep))).endpoint
        stored = await events.endpoints.get_stored(TENANT, ep)
        assert stored is not None
        assert stored.signing_secrets(time.time_ns() // 1_000_000) == [third.secret, second.secret]
        assert rotated.secret not in stored.signing_secrets(0)


@pytest.mark.parametrize("method", ["GetEndpoint", "ListEndpoints", "UpdateEndpoint"])
async def test_no_answer_but_create_and_rotate_carries_a_secret(events_service: ServiceFactory, method: str) -> None:
    async with events_service(background=False) as events:
        tenant = events.tenant()
        created = (await tenant.CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint
        rotated = (
            await tenant.RotateEndpointSecret(pb.RotateEndpointSecretRequest(endpoint_id=created.endpoint_id))
        ).endpoint
        if method == "GetEndpoint":
            answer = await tenant.GetEndpoint(pb.GetEndpointRequest(endpoint_id=created.endpoint_id))
        elif method == "ListEndpoints":
            answer = await events.operator.ListEndpoints(pb.ListEndpointsRequest(tenant_id=TENANT))
        else:
            answer = await tenant.UpdateEndpoint(
                pb.UpdateEndpointRequest(
                    endpoint=pb.Endpoint(endpoint_id=created.endpoint_id, description="x"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"]),
                )
            )
        text = str(answer)
        assert created.secret.removeprefix("whsec_") not in text
        assert rotated.secret.removeprefix("whsec_") not in text
        assert "whsec_" not in text


async def test_rotating_another_tenants_endpoint_is_not_found(events_service: ServiceFactory) -> None:
    async with events_service(background=False) as events:
        ep = (await events.tenant().CreateEndpoint(pb.CreateEndpointRequest(url=URL))).endpoint.endpoint_id
        await fails(
            grpc.StatusCode.NOT_FOUND,
            events.tenant("t2").RotateEndpointSecret(pb.RotateEndpointSecretRequest(endpoint_id=ep)),
        )
        stored = await events.endpoints.get_stored(TENANT, ep)
        assert stored is not None and stored.previous_secret == ""
