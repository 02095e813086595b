"""Shared fixtures: one real redis-server per test session, flushed before each test that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a Redis emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
