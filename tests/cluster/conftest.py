"""Fixtures for multi-node tests: real ``chat-gateway serve`` processes on one private redis-server.

``cluster`` builds N nodes (``make(n, database=...)``) sharing one database (a migrated SQLite file
or a throw-away PostgreSQL database) and, for more than one node, one Redis. Everything is stopped
at the end of the test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway_process import GatewayProcess, run_cli
from tests.support.postgres import temporary_database
from tests.support.redis_server import RedisServer
from tests.support.stomp_wire import WsStompClient

ROOM_PREFIX = "/sub/chat/room/"


@dataclass
class Cluster:
    nodes: list[GatewayProcess]
    database_url: str
    redis: RedisServer | None
    clients: list[WsStompClient] = field(default_factory=list)

    async def client(self, node: int, login: str | None = None) -> WsStompClient:
        ws = await WsStompClient.open(self.nodes[node].ws_url)
        headers = {"accept-version": "1.2", "host": "x"}
        if login is not None:
            headers["login"] = login
        connected = await ws.connect(headers)
        assert connected.command == "CONNECTED", connected
        self.clients.append(ws)
        return ws

    async def create_room(self, name: str = "room", node: int = 0) -> str:
        async with httpx.AsyncClient(base_url=self.nodes[node].url) as http:
            response = await http.post("/chat/room", data={"name": name})
            response.raise_for_status()
            return str(response.json()["roomId"])

    async def get(self, path: str, node: int = 0, **params: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.nodes[node].url) as http:
            response = await http.get(path, params=params)
            response.raise_for_status()
            return response.json()

    async def history(self, room: str, node: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            page = await self.get(f"/chat/room/{room}/messages", node, after=after, limit=500)
            out.extend(page)
            if len(page) < 500:
                return out
            after = page[-1]["seq"]


def chat_body(room: str, text: str, **extra: Any) -> bytes:
    return json.dumps({"type": "TALK", "roomId": room, "message": text, **extra}).encode()


async def read_chat(ws: WsStompClient, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        frame = await ws.next_frame(timeout)
        assert frame.command == "MESSAGE", frame
        out.append(json.loads(frame.body))
    return out


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Any]:
    stack = AsyncExitStack()
    made: list[Cluster] = []

    async def make(count: int, *, database: str = "sqlite", redis: RedisServer | None = None,
                   settings: dict[str, Any] | None = None,
                   per_node: list[dict[str, Any]] | None = None, redis_url: str | None = None) -> Cluster:
        """``redis_url`` (e.g. a Sentinel or Cluster URL) replaces the private redis-server."""
        if database == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'cluster.db'}"
        else:
            url = await stack.enter_async_context(temporary_database())
        result = run_cli("migrate", "--database-url", url)
        assert result.returncode == 0, result.stderr
        if count > 1 and redis is None and redis_url is None:
            redis = stack.enter_context(RedisServer())
        nodes = []
        for index in range(count):
            node_settings: dict[str, Any] = {"database_url": url, "node_id": f"node{index}",
                                             "heartbeat_receive_ms": 0, "presence_ttl_s": 3}
            if redis is not None:
                node_settings["redis_url"] = redis.url
            if redis_url is not None:
                node_settings["redis_url"] = redis_url
            node_settings.update(settings or {})
            if per_node is not None:
                node_settings.update(per_node[index])
            nodes.append(GatewayProcess(node_settings, workdir=tmp_path / f"node{index}"))
        for node in nodes:
            node.workdir.mkdir(exist_ok=True)
            node.start(wait=False)
        for node in nodes:
            node.wait_ready(60)
        cluster = Cluster(nodes, url, redis)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            for ws in cluster.clients:
                await ws.close()
            for node in cluster.nodes:
                node.stop()
        await stack.aclose()
