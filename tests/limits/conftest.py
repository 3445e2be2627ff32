"""Helpers for the limit tests: a real ``chat-gateway serve`` per test, rooms made over REST, frames."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.stomp_wire import frame


@pytest.fixture
def gateway_factory() -> Iterator[Any]:
    made: list[GatewayProcess] = []

    def make(**settings: Any) -> GatewayProcess:
        settings.setdefault("heartbeat_receive_ms", 0)
        process = GatewayProcess(settings)
        made.append(process)
        return process.start()

    yield make
    for process in made:
        process.cleanup()


async def create_room(gateway: GatewayProcess, name: str = "limits") -> str:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/chat/room", data={"name": name})
        response.raise_for_status()
        return str(response.json()["roomId"])


async def history(gateway: GatewayProcess, room: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        response = await http.get(f"/chat/room/{room}/messages", params={"limit": 500})
        response.raise_for_status()
        return list(response.json())


def chat_send(room: str, text: str, receipt: str | None = None, sender: str = "tester") -> bytes:
    headers = {"destination": "/pub/chat/message", "content-type": "application/json"}
    if receipt is not None:
        headers["receipt"] = receipt
    body = json.dumps({"type": "TALK", "roomId": room, "sender": sender, "message": text})
    return frame("SEND", headers, body)
