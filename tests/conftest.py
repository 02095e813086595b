"""Shared fixtures: one real Redis per test session, emptied before each test that asks for it.

NUMPROTECT_TEST_REDIS_MODE=cluster runs the same tests against a real 3-master Redis Cluster (with replicas)
instead of a single redis-server: tests that take `redis_env` pass it to the services they start.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from support.redis_cluster import RedisClusterServers
from support.redis_server import RedisServer
from support.tls import remove_test_pki

TEST_REDIS_MODE = os.environ.get("NUMPROTECT_TEST_REDIS_MODE", "standalone")


@pytest.fixture(scope="session", autouse=True)
def _test_pki_removed_at_the_end() -> Iterator[None]:
    """The test PKI (support/tls.py) is made on first use; its folder goes when the session ends."""
    yield
    remove_test_pki()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A standalone redis-server (for tests that are about a single node whatever the mode)."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster_servers() -> Iterator[RedisClusterServers | None]:
    if TEST_REDIS_MODE != "cluster":
        yield None
        return
    cluster = RedisClusterServers()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a standalone Redis emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def redis_env(redis_server: RedisServer, redis_cluster_servers: RedisClusterServers | None) -> dict[str, str]:
    """NUMPROTECT_REDIS_URL / NUMPROTECT_REDIS_MODE of the Redis under test (standalone or cluster), emptied."""
    if redis_cluster_servers is not None:
        redis_cluster_servers.flushall()
        return {"NUMPROTECT_REDIS_URL": redis_cluster_servers.url, "NUMPROTECT_REDIS_MODE": "cluster"}
    redis_server.client().flushall()
    return {"NUMPROTECT_REDIS_URL": redis_server.url, "NUMPROTECT_REDIS_MODE": "standalone"}


@pytest.fixture
def redis_sync(redis_env: dict[str, str]) -> Iterator[Any]:
    """A synchronous client of the Redis under test, to read back what services wrote."""
    client: Any
    if redis_env["NUMPROTECT_REDIS_MODE"] == "cluster":
        client = RedisCluster.from_url(redis_env["NUMPROTECT_REDIS_URL"])
    else:
        client = redis.Redis.from_url(redis_env["NUMPROTECT_REDIS_URL"])
    yield client
    client.close()
