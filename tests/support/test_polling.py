"""The polling helpers: the value returned, the failure message, awaitable conditions, ``ignoring``."""

from __future__ import annotations

import itertools

import pytest

from tests.support.polling import eventually, eventually_sync


async def test_eventually_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert await eventually(lambda: next(calls) >= 3 and "done", "three calls") == "done"


async def test_eventually_reports_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waiting until the impossible \(last: \[\]\)"):
        await eventually(lambda: [], "the impossible", timeout_s=0.05)


async def test_eventually_awaits_an_async_condition() -> None:
    seen: list[int] = []

    async def grows() -> bool:
        seen.append(1)
        return len(seen) == 2
    assert await eventually(grows, "two calls") is True


async def test_eventually_treats_ignored_errors_as_not_yet() -> None:
    attempts = itertools.count()

    def flaky() -> int:
        if next(attempts) < 2:
            raise ConnectionRefusedError("starting")
        return 7
    assert await eventually(flaky, "a started server", ignoring=(OSError,)) == 7
    with pytest.raises(AssertionError, match="last error: ConnectionRefusedError"):
        await eventually(flaky_forever, "never", timeout_s=0.05, ignoring=(OSError,))
    with pytest.raises(ZeroDivisionError):
        await eventually(lambda: 1 / 0, "an unexpected error propagates", ignoring=(OSError,))


def flaky_forever() -> bool:
    raise ConnectionRefusedError("still starting")


def test_eventually_sync_is_the_blocking_twin() -> None:
    calls = itertools.count()
    assert eventually_sync(lambda: next(calls) == 2, "three calls") is True
    with pytest.raises(AssertionError, match="waiting until nothing"):
        eventually_sync(lambda: None, "nothing", timeout_s=0.05)
