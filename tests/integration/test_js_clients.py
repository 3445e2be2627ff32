"""Real JavaScript STOMP clients (pinned in package.json, run in Node 20 with ``ws``) against a gateway
served by uvicorn on a free port: ``@stomp/stompjs`` 7.5.0, ``webstomp-client`` 1.2.6 and the legacy
``stompjs`` 2.3.3. The scripts are in tests/clients/; each reports what its client observed as JSON.

The gateway is an inline app (tests.support.live_server.echo_component): ``/pub/chat/message``
broadcasts to ``/sub/chat/room/{roomId}``, ``/pub/echo`` to the ``x-to`` destination.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import __version__
from tests.support.live_server import LiveServer, live_server
from tests.support.node import run_node

pytestmark = pytest.mark.node

BIG = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    # Frame limit raised for the 1 MB bodies; fast heart-beats so a few seconds prove them.
    with live_server(max_frame_bytes=2 * BIG + 4096, heartbeat_send_min_ms=100, heartbeat_receive_ms=200,
                     heartbeat_grace=4.0) as srv:
        yield srv


def stompjs(server: LiveServer, scenario: str, **args: Any) -> dict[str, Any]:
    return run_node("stompjs7.mjs", {"url": server.ws_url, "scenario": scenario, **args})


def test_installed_versions_are_the_pinned_ones() -> None:
    result = run_node("versions.mjs")
    assert result["versions"] == {"@stomp/stompjs": "7.5.0", "webstomp-client": "1.2.6", "stompjs": "2.3.3",
                                  "ws": "8.23.0"}
    assert result["node"].startswith("v20.")


# -- @stomp/stompjs 7 ------------------------------------------------------------------------


def test_stompjs_connects_with_v12_and_user_name(server: LiveServer) -> None:
    result = stompjs(server, "connect", login="alice")
    assert result["protocol"] == "v12.stomp"
    connected = result["connected"]
    assert connected["version"] == "1.2" and connected["user-name"] == "alice"
    assert connected["heart-beat"] == "100,200" and connected["server"] == f"chat-gateway/{__version__}"


def test_stompjs_send_reaches_handler_that_broadcasts_to_another_session(server: LiveServer) -> None:
    result = stompjs(server, "chat", room="js-room")
    assert result["receipts"] == ["send-0", "send-1", "send-2"]
    bodies = [json.loads(m["body"]) for m in result["exact"]]
    assert [b["message"] for b in bodies] == ["hi 0", "hi 1", "hi 2"]
    assert all(b["roomId"] == "js-room" for b in bodies)
    assert [json.loads(b)["message"] for b in result["pattern"]] == ["hi 0", "hi 1", "hi 2"]   # /sub/chat/room/*
    assert [json.loads(b)["message"] for b in result["all"]] == ["hi 0", "hi 1", "hi 2"]       # /sub/**
    headers = result["exact"][0]["headers"]
    assert headers["destination"] == "/sub/chat/room/js-room"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(result["exact"][0]["body"].encode()))


def test_stompjs_transaction_commit_and_abort(server: LiveServer) -> None:
    result = stompjs(server, "transaction")
    assert result["beforeCommit"] == 0
    assert result["got"] == ["in-tx-1", "in-tx-2", "after-commit", "end"]


def test_stompjs_client_individual_ack_and_nack(server: LiveServer) -> None:
    result = stompjs(server, "ack")
    assert result["count"] == 4 and result["connectedAfter"] is True
    assert all(result["ackHeaders"])                 # 1.2 'ack' header present on every MESSAGE


def test_stompjs_binary_body_round_trip(server: LiveServer) -> None:
    result = stompjs(server, "binary")
    assert result == {"ok": True, "same": True, "length": 4096, "isBinary": True,
                      "contentType": "application/octet-stream"}


def test_stompjs_one_megabyte_body_with_raised_frame_limit(server: LiveServer) -> None:
    result = stompjs(server, "big", size=BIG)
    assert result["same"] is True and result["length"] == BIG


def test_stompjs_split_frames_max_websocket_chunk_size(server: LiveServer) -> None:
    result = stompjs(server, "split", size=50_000, chunk=1024)
    assert result["same"] is True
    assert result["chunks"] >= 49                    # the SEND really went as many WebSocket messages


def test_stompjs_heart_beats_both_ways(server: LiveServer) -> None:
    # Both sides beat every 300 ms; the server closes a client silent for 300 ms x 4 = 1.2 s, so
    # staying connected for 1.6 s needs the client's beats.
    result = stompjs(server, "heartbeats", ms=300, holdMs=1600)
    assert result["heartBeatHeader"] == "100,200"
    assert result["serverBeats"] >= 3                # server beats at max(100, 300) ms
    assert result["pings"] >= 3
    assert result["lost"] == 0 and result["stillConnected"] is True


def test_stompjs_error_frame_and_1002_for_send_to_broker_destination(server: LiveServer) -> None:
    result = stompjs(server, "error")
    assert result["error"]["receiptId"] == "bad"
    assert "not allowed" in result["error"]["message"]
    assert result["closeCode"] == 1002


# -- webstomp-client 1.2.6 --------------------------------------------------------------------


def webstomp(server: LiveServer, scenario: str, **args: Any) -> dict[str, Any]:
    return run_node("webstomp.mjs", {"url": server.ws_url, "scenario": scenario, **args})


def test_webstomp_lists_v10_first_and_still_gets_1_2(server: LiveServer) -> None:
    result = webstomp(server, "chat", room="w-room")
    assert result["protocol"] == "v12.stomp" and result["version"] == "1.2"
    assert result["userName"] == "alice"
    assert result["exact"] == [result["sent"]] and result["pattern"] == [result["sent"]]


def test_webstomp_transaction(server: LiveServer) -> None:
    result = webstomp(server, "transaction")
    assert result["beforeCommit"] == 0 and result["got"] == ["in-tx", "end"]


def test_webstomp_client_ack(server: LiveServer) -> None:
    result = webstomp(server, "ack")
    assert result["count"] == 3 and result["connectedAfter"] is True and all(result["ackHeaders"])


def test_webstomp_heart_beats(server: LiveServer) -> None:
    result = webstomp(server, "heartbeats", ms=300, holdMs=1600)
    assert result["heartBeat"] == "100,200" and result["pongs"] >= 3 and result["stillConnected"] is True


# -- legacy stompjs 2.3.3 ---------------------------------------------------------------------


def legacy(server: LiveServer, scenario: str, **args: Any) -> dict[str, Any]:
    return run_node("stompjs-legacy.mjs", {"url": server.ws_url, "scenario": scenario, **args})


@pytest.mark.parametrize(("transport", "protocol"), [("ws", "v11.stomp"), ("overWS", None)])
def test_legacy_stompjs_negotiates_1_1(server: LiveServer, transport: str, protocol: str | None) -> None:
    result = legacy(server, "chat", transport=transport, room=f"legacy-{transport}")
    assert result["version"] == "1.1"
    assert result["protocol"] == protocol
    assert result["exact"] == [result["sent"]] and result["all"] == [result["sent"]]


def test_legacy_stompjs_transaction(server: LiveServer) -> None:
    result = legacy(server, "transaction")
    assert result["beforeCommit"] == 0 and result["got"] == ["in-tx", "end"]


def test_legacy_stompjs_ack_by_message_id(server: LiveServer) -> None:
    result = legacy(server, "ack")
    assert result["count"] == 3 and result["connectedAfter"] is True and all(result["messageIds"])


def test_legacy_stompjs_heart_beats(server: LiveServer) -> None:
    result = legacy(server, "heartbeats", ms=300, holdMs=1600)
    assert result["version"] == "1.1" and result["heartBeat"] == "100,200"
    assert result["pongs"] >= 3 and result["pings"] >= 3 and result["stillConnected"] is True
