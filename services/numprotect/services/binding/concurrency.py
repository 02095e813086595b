"""Concurrency helper of the binding service: one limit around every RPC."""

from __future__ import annotations

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
