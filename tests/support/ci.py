"""What a test does when something it needs is missing: skip on a developer machine, fail under CI.

Owns :func:`skip_or_fail`, the suite's one rule for missing prerequisites (PostgreSQL unreachable,
node or the npm packages absent, nginx, redis-server, chromium, Playwright not installed): a developer
without them gets a skip that says why; CI (the ``CI`` environment variable set to anything but
empty) must run every test, so there the same test fails, naming what is missing. ``make test``
installs all of them.

Imports nothing from the gateway.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether the suite runs under CI (``CI`` set and not empty)."""
    return bool(os.environ.get("CI"))


def skip_or_fail(reason: str, *, tests: str = "these tests") -> NoReturn:
    """Skip the calling test, fixture or module with ``reason``; under CI fail it instead.

    ``tests`` names what CI must run, for the failure message ("the PostgreSQL tests").
    """
    if in_ci():
        pytest.fail(f"{reason}; CI must run {tests} (`make test` installs what they need)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
