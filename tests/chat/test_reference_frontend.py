"""The reference frontend's exact calls, with JWT auth on, over every SockJS transport Node offers.

``new SockJS("/ws-stomp")``, ``Stomp.over(sock)`` (stompjs 2.3.3) or ``@stomp/stompjs`` 7,
``connect({"token": token})``, ``subscribe("/sub/chat/room/" + roomId)``,
``send("/pub/chat/message", {"token": token}, JSON.stringify({type, roomId, message}))`` against a real
gateway process; the token is minted like jjwt 0.9 does with the Base64 secret.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.jwt_auth import key_from_secret, mint_token
from tests.support.gateway_process import GatewayProcess
from tests.support.node import require_node

pytestmark = pytest.mark.node

SCRIPT = Path(__file__).resolve().parents[1] / "transport" / "sockjs" / "sockjs_client_stomp.mjs"
SECRET = base64.b64encode(b"govlepel@$&").decode()   # the reference's spring.jwt.secret, as jjwt reads it


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with GatewayProcess({"auth": "jwt", "jwt_secret": SECRET, "heartbeat_receive_ms": 0}) as process:
        yield process


def run_client(gateway: GatewayProcess, transport: str, client: str, room: str, token: str,
               text: str) -> list[dict[str, object]]:
    node = require_node()
    body = json.dumps({"type": "TALK", "roomId": room, "message": text})
    result = subprocess.run(
        [node, str(SCRIPT), "--url", gateway.url + "/ws-stomp", "--transport", transport, "--client", client,
         "--subscribe", "/sub/chat/room/" + room, "--send-to", "/pub/chat/message", "--body", body,
         "--count", "1", "--expect", "2", "--header", "token:" + token, "--timeout-ms", "20000"],
        capture_output=True, text=True, timeout=40, check=False)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (result.stdout, result.stderr)
    return events


@pytest.mark.parametrize("client", ["stompjs", "stomp7"])
@pytest.mark.parametrize("transport", ["websocket", "xhr-streaming", "xhr-polling", "eventsource"])
def test_reference_calls_work_over_every_transport(gateway: GatewayProcess, transport: str, client: str) -> None:
    user = f"user-{transport}-{client}"
    token = mint_token(user, key_from_secret(SECRET))
    bearer = {"Authorization": f"Bearer {token}"}   # REST needs the same authentication (issue 10)
    room = httpx.post(gateway.url + "/chat/room", data={"name": f"{transport}-{client}"},
                      headers=bearer).json()["roomId"]
    events = run_client(gateway, transport, client, room, token, f"hello over {transport}")
    connected = next(e for e in events if e["event"] == "connected")
    assert connected["transport"] == transport
    assert connected["headers"]["user-name"] == user  # type: ignore[index]
    bodies = [json.loads(str(e["body"])) for e in events if e["event"] == "message"]
    assert [(b["type"], b["message"]) for b in bodies] == [
        ("ENTER", f"{user}님이 방에 입장했습니다."), ("TALK", f"hello over {transport}")]
    assert bodies[1]["sender"] == user
    history = httpx.get(f"{gateway.url}/chat/room/{room}/messages", headers=bearer).json()
    assert [(m["type"], m["sender"]) for m in history][:2] == [("ENTER", "[알림]"), ("TALK", user)]


@pytest.mark.parametrize("token", ["", "not-a-jwt", "expired"])
def test_bad_token_gets_error_and_no_connected(gateway: GatewayProcess, token: str) -> None:
    if token == "expired":
        token = mint_token("late", key_from_secret(SECRET), ttl_s=-10)
    node = require_node()
    result = subprocess.run(
        [node, str(SCRIPT), "--url", gateway.url + "/ws-stomp", "--transport", "websocket", "--client", "stompjs",
         "--header", "token:" + token, "--count", "0", "--expect", "0", "--timeout-ms", "10000"],
        capture_output=True, text=True, timeout=30, check=False)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 1
    assert not any(e["event"] == "connected" for e in events)
    errors = [e for e in events if e["event"] == "error"]
    assert errors and "Authentication failed" in json.dumps(errors[0])
