"""numprotect_auth_denials{reason}: every refusal of the identity layer counted once, by reason, in the service's own
registry (a real translation service with TLS and API keys on a real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from numprotect.core.identity.layer import PERMISSION_DENIED_REASONS, UNAUTHENTICATED_REASONS
from numprotect.core.identity.principal import Role
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc

NUMBER = "700100000011234"
CALLER = "13800000001"


@pytest.fixture
async def translation(redis_env: dict[str, str]) -> AsyncIterator[Any]:
    from numprotect.services.translation.app import build_sync
    from support.inprocess import running_sync_service

    async with running_sync_service("translation", build_sync, redis_env) as svc:
        yield svc


def denials(service: Any) -> dict[str, float | None]:
    registry = service.runtime.metrics.registry
    return {
        reason: registry.get_sample_value("numprotect_auth_denials_total", {"reason": reason})
        for reason in (*UNAUTHENTICATED_REASONS, *PERMISSION_DENIED_REASONS)
    }


async def _refused(call: Any, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code


async def test_each_refusal_is_counted_once_under_its_reason(translation: Any) -> None:
    before = denials(translation)
    assert set(before.values()) == {0.0}  # every reason exposed from the start
    listing = translation_pb2.ListBlockedCallersRequest(tenant_id="t1")
    translate = translation_pb2.TranslateRequest(called_number=NUMBER, calling_number=CALLER)

    def stub(channel: grpc.aio.Channel) -> Any:
        return translation_pb2_grpc.TranslationServiceStub(channel)

    await _refused(stub(translation.channel).ListBlockedCallers(listing, timeout=5), grpc.StatusCode.UNAUTHENTICATED)
    await _refused(
        stub(translation.channel_with("np_nope.xyz")).ListBlockedCallers(listing, timeout=5),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    tenant = stub(translation.channel_as(Role.TENANT, "t1"))
    await _refused(tenant.Translate(translate, timeout=5), grpc.StatusCode.PERMISSION_DENIED)
    other_tenant = translation_pb2.ListBlockedCallersRequest(tenant_id="t2")
    await _refused(tenant.ListBlockedCallers(other_tenant, timeout=5), grpc.StatusCode.PERMISSION_DENIED)
    translation.route("carrier-b", NUMBER)  # another carrier routes the number's block
    carrier = stub(translation.channel_as(Role.CARRIER, "carrier-a"))
    await _refused(carrier.Translate(translate, timeout=5), grpc.StatusCode.PERMISSION_DENIED)
    # An allowed call is no denial.
    await tenant.ListBlockedCallers(translation_pb2.ListBlockedCallersRequest(), timeout=5)

    after = denials(translation)
    changed = {reason: after[reason] - before[reason] for reason in after if after[reason] != before[reason]}  # type: ignore[operator]
    assert changed == {
        "missing_credentials": 1.0,
        "invalid_token": 1.0,
        "role_not_allowed": 1.0,
        "other_tenant": 1.0,
        "other_carrier": 1.0,
    }
