"""Transport limits a hostile client meets before any servicer runs (docs/security.md "Limits")."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numprotect.core.identity.principal import Role
from numprotect.services.translation.app import build_sync
from numprotect.translation.v1 import translation_pb2, translation_pb2_grpc
from support.inprocess import running_sync_service


async def test_an_oversized_request_is_refused_before_parsing_and_the_service_stays_healthy(
    redis_env: dict[str, str],
) -> None:
    environ = {**redis_env, "NUMPROTECT_MAX_RECEIVE_MESSAGE_BYTES": "2048"}
    async with running_sync_service("translation", build_sync, environ) as svc:
        stub = translation_pb2_grpc.TranslationServiceStub(svc.channel_as(Role.TENANT, "t1"))
        huge = translation_pb2.BlockCallerRequest(tenant_id="t1", calling_number="13800000001", reason="x" * 4096)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.BlockCaller(huge, timeout=5)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2048" in (raised.value.details() or "")
        reply = await stub.ListBlockedCallers(translation_pb2.ListBlockedCallersRequest(tenant_id="t1"), timeout=5)
        assert list(reply.entries) == []
        health = await health_pb2_grpc.HealthStub(svc.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_limits_are_validated_settings(redis_env: dict[str, str]) -> None:
    from numprotect.core.settings import Env, ServerSettings, SettingsError

    settings = ServerSettings.from_env(Env({"NUMPROTECT_MAX_CONCURRENT_STREAMS": "64"}), "translation")
    assert settings.max_concurrent_streams == 64 and settings.max_receive_message_bytes == 4 * 1024 * 1024
    with pytest.raises(SettingsError, match="NUMPROTECT_MAX_RECEIVE_MESSAGE_BYTES"):
        ServerSettings.from_env(Env({"NUMPROTECT_MAX_RECEIVE_MESSAGE_BYTES": "10"}), "translation")
