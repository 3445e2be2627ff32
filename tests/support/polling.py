"""Waiting for a condition in tests: :func:`eventually` (async) and :func:`eventually_sync` (blocking).

Owns the one polling loop of the suite: call ``condition`` until it returns something truthy and
return that value; after ``timeout_s`` seconds raise :class:`AssertionError` naming ``what`` and the
last value seen. The timeout is a generous deadline on a loaded machine, never a timing assertion: a
test that needs "X happened before Y" orders X and Y with an event, not with a short timeout.

::

    await eventually(lambda: len(node.received) >= 3, "three publications")
    await eventually(client.is_closed, "the close", timeout_s=30)
    value = eventually_sync(lambda: page.state == "ready", "the page to be ready", interval_s=0.1)

The async twin also accepts a condition that returns an awaitable (e.g. an ``async def`` that asks a
server), and awaits it. ``ignoring`` names exceptions that mean "not yet" (a server still starting
refuses connections); any other exception propagates at once.

Imports nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.01

_NOT_CALLED: Any = object()


def _timed_out(what: str, timeout_s: float, last: object, error: BaseException | None) -> AssertionError:
    detail = f"last error: {error!r}" if error is not None and last is _NOT_CALLED else f"last: {last!r}"
    return AssertionError(f"timed out after {timeout_s} s waiting until {what} ({detail})")


async def eventually(condition: Callable[[], T | Awaitable[T]], what: str, *,
                     timeout_s: float = DEFAULT_TIMEOUT_S, interval_s: float = DEFAULT_INTERVAL_S,
                     ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``condition`` until it returns a truthy value; return that value (see the module docstring)."""
    deadline = time.monotonic() + timeout_s
    last: Any = _NOT_CALLED
    error: BaseException | None = None
    while True:
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
        except ignoring as exc:
            error, last = exc, _NOT_CALLED
        else:
            if result:
                return result
            last = result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, last, error)
        await asyncio.sleep(interval_s)


def eventually_sync(condition: Callable[[], T], what: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                    interval_s: float = DEFAULT_INTERVAL_S,
                    ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """:func:`eventually` for code without a running event loop (blocking clients, threads, processes)."""
    deadline = time.monotonic() + timeout_s
    last: Any = _NOT_CALLED
    error: BaseException | None = None
    while True:
        try:
            result = condition()
        except ignoring as exc:
            error, last = exc, _NOT_CALLED
        else:
            if result:
                return result
            last = result
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout_s, last, error)
        time.sleep(interval_s)
