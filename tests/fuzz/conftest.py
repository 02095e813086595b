"""Fixtures of the fuzz tests: one platform (all five services as processes, TLS and API keys on, a Redis of its
own) per test process, shared by the package's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz.platform import Platform


@pytest.fixture(scope="package")
def platform() -> Iterator[Platform]:
    running = Platform.start()
    yield running
    running.stop()
