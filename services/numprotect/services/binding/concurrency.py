"""Concurrency helpers of the binding service: one limit around every RPC, and steps run side by side."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any


def limit_methods(target: object, method_names: Iterable[str], limit: AbstractAsyncContextManager[Any]) -> None:
    """Makes each named method of `target` run inside `limit` (`async with limit:`), all of them the same one,
    so no method can be left out of it."""
    for name in method_names:
        setattr(target, name, _inside(limit, getattr(target, name)))


def _inside(
    limit: AbstractAsyncContextManager[Any], method: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def limited(*args: Any, **kwargs: Any) -> Any:
        async with limit:
            return await method(*args, **kwargs)

    return limited


async def gather_all(steps: Iterable[Awaitable[Any]]) -> list[Any]:
    """Runs steps concurrently and waits for all of them; then raises the first failure, if any."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
