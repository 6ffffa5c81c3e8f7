"""Awaiting several coroutines at once from trio code."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import trio


async def gather(*aws: Awaitable[Any]) -> list[Any]:
    """Await ``aws`` concurrently (one trio task each); their results in
    order.  If any raises, the others are cancelled and the first
    exception is raised as itself (not as an ExceptionGroup)."""
    results: list[Any] = [None] * len(aws)

    async def one(i: int, aw: Awaitable[Any]) -> None:
        results[i] = await aw

    try:
        async with trio.open_nursery() as n:
            for i, aw in enumerate(aws):
                n.start_soon(one, i, aw)
    except BaseExceptionGroup as eg:
        first: BaseException = eg
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return results
