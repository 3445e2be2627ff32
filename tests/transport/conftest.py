"""Fixtures for the transport tests: ``gateway_server(**settings)`` starts an inline gateway app
(tests.support.live_server.echo_component) under a real uvicorn on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.live_server import ServerFactory


@pytest.fixture
async def gateway_server() -> AsyncIterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    await asyncio.to_thread(factory.stop_all)
