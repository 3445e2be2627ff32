"""The members policy across two real ``chat-gateway serve`` processes sharing Redis and a database
(issue 10): REST on one node and STOMP on the other agree, and a member removed on node 0 loses the
room on node 1 within ``authz_cache_ttl_s`` (the documented bound: the cached decision expires and the
node's batched re-check closes the session with an ERROR).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from gateway.jwt_auth import key_from_secret, mint_token
from tests.cluster.conftest import ROOM_PREFIX, chat_body
from tests.support.stomp_wire import WsStompClient

SECRET = base64.b64encode(b"cluster-authorization-secret-0123456789").decode()
SETTINGS = {"auth": "jwt", "jwt_secret": SECRET, "authz_policy": "members", "authz_cache_ttl_s": 1.0}


def token(user: str) -> str:
    return mint_token(user, key_from_secret(SECRET))


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


async def stomp(url: str, user: str) -> WsStompClient:
    ws = await WsStompClient.open(url)
    await ws.connect({"token": token(user)})
    return ws


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_members_policy_holds_across_nodes(cluster_factory: Any, database: str) -> None:
    cluster = await cluster_factory(2, database=database, settings=SETTINGS)
    node0, node1 = cluster.nodes
    async with httpx.AsyncClient(base_url=node0.url, timeout=10) as http0, \
            httpx.AsyncClient(base_url=node1.url, timeout=10) as http1:
        assert (await http1.get("/chat/rooms")).status_code == 401
        room = (await http0.post("/chat/room", data={"name": "shared"}, headers=bearer("alice"))).json()["roomId"]
        added = await http0.post(f"/chat/room/{room}/members", data={"user": "bob"}, headers=bearer("alice"))
        assert added.json()["members"] == ["alice", "bob"]
        assert (await http1.get(f"/chat/room/{room}/messages", headers=bearer("bob"))).status_code == 200
        assert (await http1.get(f"/chat/room/{room}/messages", headers=bearer("carol"))).status_code == 403

        bob = await stomp(node1.ws_url, "bob")
        cluster.clients.append(bob)
        await bob.subscribe(ROOM_PREFIX + room, "1")
        carol = await stomp(node1.ws_url, "carol")
        cluster.clients.append(carol)
        await carol.send_frame("SUBSCRIBE", {"id": "1", "destination": ROOM_PREFIX + room, "receipt": "r"})
        refused = await carol.next_frame()
        assert refused.command == "ERROR"
        assert refused.get("message") == f"Access denied: 'carol' may not subscribe to room '{room}'"

        alice = await stomp(node0.ws_url, "alice")
        cluster.clients.append(alice)
        await alice.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "t"},
                               chat_body(room, "across nodes"))
        assert (await alice.next_frame()).command == "RECEIPT"
        while True:  # bob's ENTER, then the TALK, delivered on the other node
            frame = await bob.next_frame(20)
            assert frame.command == "MESSAGE", frame
            if json.loads(frame.body)["type"] == "TALK":
                assert json.loads(frame.body)["message"] == "across nodes"
                break

        # Removed on node 0: bob's session on node 1 gets its ERROR within the TTL and a re-check.
        assert (await http0.delete(f"/chat/room/{room}/members/bob", headers=bearer("alice"))).status_code == 204
        while True:
            frame = await bob.next_frame(15)
            if frame.command == "ERROR":
                assert frame.get("message") == f"Access to room '{room}' was revoked"
                break
        code, _ = await bob.closed()
        assert code == 1008
        assert (await http1.get(f"/chat/room/{room}/messages", headers=bearer("bob"))).status_code == 403
