"""A room with a long history opens at its end: the page shows the last messages, not seq 1 onwards."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import ChatPage, wait_for
from tests.support.gateway_process import GatewayProcess
from tests.support.stomp_wire import WsStompClient, frame

if TYPE_CHECKING:  # only for annotations: without Playwright the fixtures skip (or fail in CI)
    from playwright.sync_api import BrowserContext

pytestmark = [pytest.mark.browser]

TOTAL = 260
WINDOW = 200   # OPEN_WINDOW in static/js/room.js


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with GatewayProcess({"heartbeat_receive_ms": 0}) as process:
        yield process


async def fill(gateway: GatewayProcess, room: str, count: int) -> None:
    ws = await WsStompClient.open(gateway.ws_url)
    await ws.connect({"accept-version": "1.2", "host": "x", "login": "history"})
    burst = b"".join(frame("SEND", {"destination": "/pub/chat/message"},
                           json.dumps({"type": "TALK", "roomId": room, "message": f"old {i}"}))
                     for i in range(count))
    await ws.send(burst + frame("DISCONNECT", {"receipt": "done"}))
    assert (await ws.next_frame(60)).command == "RECEIPT"
    await ws.close()


def test_a_big_room_opens_at_its_last_messages(gateway: GatewayProcess,
                                              contexts: Callable[..., BrowserContext]) -> None:
    request = urllib.request.Request(gateway.url + "/chat/room", data=b"name=archive", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        room = str(json.loads(response.read())["roomId"])
    # Playwright's sync API owns this thread's event loop: drive the raw client from another thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, fill(gateway, room, TOTAL)).result(90)
    page = ChatPage.open(contexts(), f"{gateway.url}/chat/room/enter/{room}")
    page.wait_state("connected")
    page.wait_texts([f"old {TOTAL - 1}"])
    wait_for(lambda: len(page.texts()) == WINDOW, "the opening window")
    talk = [m for m in page.messages() if m["kind"] == "talk"]
    assert [m["seq"] for m in talk] == list(range(TOTAL - WINDOW + 1, TOTAL + 1))
    page.send("new one")
    page.wait_texts(["new one"])
    assert page.texts()[-1] == "new one"
