"""A peer channel waits for a slow handshake: grpc takes grpc.min_reconnect_backoff_ms as the connect timeout of
each attempt, so with the 100 ms it once had, a peer slower than that to answer (a CPU-starved allocation, seen by
the write-path bench at load 17: "connection attempt timed out before receiving SETTINGS frame") failed every call
until an attempt happened to be quick. Here the peer sits behind a proxy that delays each chunk by 300 ms."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from numprotect.core.server import PEER_CHANNEL_OPTIONS
from support.tcp_proxy import LatencyProxy


@pytest.fixture
def slow_peer() -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    proxy = LatencyProxy("127.0.0.1", port)
    proxy.delay = 0.3
    try:
        yield proxy.address
    finally:
        proxy.close()
        server.stop(None)


def test_a_peer_slower_to_handshake_than_the_reconnect_backoff_is_reached(slow_peer: str) -> None:
    async def check() -> int:
        async with grpc.aio.insecure_channel(slow_peer, options=PEER_CHANNEL_OPTIONS) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return int(reply.status)

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING
