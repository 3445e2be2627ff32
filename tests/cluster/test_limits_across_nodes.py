"""Sessions per user and the SEND rate hold across 2 real gateway nodes sharing one redis-server.

Per node they would not: each node alone would accept ``max_sessions_per_user`` sessions and a full
burst of SENDs for the same user.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.stomp_wire import WsStompClient, frame

pytestmark = pytest.mark.timeout(180)

USERS = "alice:secret-a,bob:secret-b"
PASSCODES = {"alice": "secret-a", "bob": "secret-b"}


async def _connect(url: str, user: str) -> tuple[WsStompClient, str]:
    """(client, command of the answer): CONNECTED, or ERROR (then the server closes)."""
    client = await WsStompClient.open(url)
    await client.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", "login": user,
                                        "passcode": PASSCODES[user], "heart-beat": "0,0"})
    answer = await client.next_frame(20)
    if answer.command == "ERROR":
        assert answer.get("message") == f"Too many sessions for user {user!r} (limit 2)", answer
    return client, answer.command


async def _burst(client: WsStompClient, count: int, tag: str) -> int:
    """Send ``count`` receipted SENDs at once; how many got a RECEIPT (the rest: rate limit exceeded)."""
    await client.send(b"".join(frame("SEND", {"destination": "/sub/limits/probe", "receipt": f"{tag}-{i}"},
                                     f"{tag} {i}") for i in range(count)))
    receipts = 0
    answered = 0
    while answered < count:
        got = await client.next_frame(20)
        if got.command == "RECEIPT":
            receipts += 1
            answered += 1
        elif got.command == "ERROR":
            assert got.get("message") == "rate limit exceeded", got
            answered += 1
    return receipts


async def test_sessions_per_user_and_the_send_rate_hold_across_two_nodes(cluster_factory: Any) -> None:
    cluster = await cluster_factory(2, settings={
        "auth": "users", "users": USERS, "max_sessions_per_user": 2, "send_rate_per_s": 1,
        "send_burst": 10, "send_rate_close_after": 0, "allow_client_broker_send": True})
    node0, node1 = (node.ws_url for node in cluster.nodes)
    clients: list[WsStompClient] = []
    try:
        # --- sessions per user: 2 in the whole cluster, not 2 per node -----------------------------------
        a0, answer = await _connect(node0, "alice")
        clients.append(a0)
        assert answer == "CONNECTED"
        a1, answer = await _connect(node1, "alice")
        clients.append(a1)
        assert answer == "CONNECTED"
        for url in (node0, node1):
            refused, answer = await _connect(url, "alice")
            clients.append(refused)
            assert answer == "ERROR"
            assert (await refused.closed())[0] == 1002
        b1, answer = await _connect(node1, "bob")          # another user is not affected
        clients.append(b1)
        assert answer == "CONNECTED"

        # --- the SEND rate: one bucket (burst 10, 1/s) for alice on both nodes ---------------------------
        started = time.monotonic()
        on_node0 = await _burst(a0, 10, "n0")
        assert on_node0 == 10                                # the whole burst, on node 0
        # Let node 0 report what alice spent (every rate_limit_sync_s = 0.1 s) before she goes on node 1.
        await asyncio.sleep(1.0)
        on_node1 = await _burst(a1, 10, "n1")
        elapsed = time.monotonic() - started
        # Per node, node 1 would accept 10 more. Cluster-wide: only what refilled meanwhile (1/s), + 1 slack.
        assert on_node1 <= elapsed * 1 + 1, (on_node1, elapsed)
        assert on_node0 + on_node1 <= 10 + elapsed * 1 + 1
        assert await _burst(b1, 10, "bob") == 10            # bob's bucket is his own

        # --- a session that ends frees its place, cluster-wide -------------------------------------------
        await a0.close()
        deadline = time.monotonic() + 30
        while True:
            again, answer = await _connect(node1, "alice")
            clients.append(again)
            if answer == "CONNECTED":
                break
            assert time.monotonic() < deadline, "alice could not connect again after one session ended"
            await asyncio.sleep(0.2)
    finally:
        for client in clients:
            await client.close()
