"""The installed ``chat-gateway`` binary, started the way ``make run`` starts it (a migrated database,
then ``chat-gateway serve --port P``), driven from the outside:

- ``@stomp/stompjs`` 7 connects to ``ws://127.0.0.1:P/ws-stomp/websocket`` and a SEND to the
  application destination ``/pub/chat/message`` reaches the chat handler, which broadcasts to the
  ``/sub/chat/room/{roomId}`` subscriber of another session;
- an invalid setting (flag or environment variable) exits 2 with one line naming the setting;
- ``chat-gateway settings`` lists every setting.
"""

from __future__ import annotations

import json
import signal
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.support.gateway_process import GatewayProcess, http_request, run_cli
from tests.support.node import run_node


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with GatewayProcess() as process:
        yield process


@pytest.mark.node
def test_make_run_like_gateway_serves_stompjs(gateway: GatewayProcess) -> None:
    result = run_node("stompjs7.mjs", {"url": gateway.ws_url, "scenario": "connect", "login": "alice"})
    assert result["protocol"] == "v12.stomp"
    assert result["connected"]["version"] == "1.2" and result["connected"]["user-name"] == "alice"


@pytest.mark.node
def test_real_chat_handler_broadcasts_to_another_session(gateway: GatewayProcess) -> None:
    data = urllib.parse.urlencode({"name": "integration room"}).encode()
    status, body = http_request(gateway.url + "/chat/room", data)
    assert status == 200, body
    room = json.loads(body)
    result = run_node("stompjs7.mjs", {"url": gateway.ws_url, "scenario": "room", "room": room["roomId"],
                                       "text": "hello from bob"})
    talks = [m for m in result["got"] if m["payload"]["type"] == "TALK"]
    assert len(talks) == 1
    payload, headers = talks[0]["payload"], talks[0]["headers"]
    assert payload["roomId"] == room["roomId"] and payload["message"] == "hello from bob"
    assert payload["sender"] == "bob"                       # the server sets sender from the session
    assert headers["destination"] == f"/sub/chat/room/{room['roomId']}"
    assert headers["content-type"] == "application/json"


def test_health_endpoints_and_no_traceback_in_the_log(gateway: GatewayProcess) -> None:
    assert http_request(gateway.url + "/healthz")[0] == 200
    gateway.wait_ready()
    assert "Traceback" not in gateway.log_text()


@pytest.mark.parametrize(("args", "env", "setting"), [
    (["--max-frame-bytes", "lots"], {}, "max_frame_bytes"),
    (["--port", "70000"], {}, "port"),
    ([], {"GATEWAY_HEARTBEAT_GRACE": "0.5"}, "heartbeat_grace"),
    ([], {"GATEWAY_ALLOW_CLIENT_BROKER_SEND": "maybe"}, "allow_client_broker_send"),
])
def test_invalid_setting_exits_2_with_one_line_naming_it(args: list[str], env: dict[str, str],
                                                         setting: str) -> None:
    result = run_cli("serve", *args, env=env, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chat-gateway: invalid setting: ") and setting in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_settings_command_lists_every_setting() -> None:
    result = run_cli("settings")
    assert result.returncode == 0
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    for name in ("port", "max_frame_bytes", "max_headers", "max_header_line_bytes", "max_subscriptions",
                 "outbound_max_bytes", "outbound_send_timeout_s", "connect_timeout_s", "heartbeat_send_min_ms",
                 "heartbeat_receive_ms", "heartbeat_grace", "allow_client_broker_send", "allowed_origins"):
        assert name in names
    assert "GATEWAY_MAX_FRAME_BYTES" in result.stdout


def test_sigterm_stops_the_gateway_cleanly() -> None:
    process = GatewayProcess().start()
    try:
        code = process.stop(timeout=20)
        log = process.log_text()
        # uvicorn re-raises the signal after a clean shutdown, so the exit status is "killed by SIGTERM"
        assert code in (0, -signal.SIGTERM), log
        assert "Application shutdown complete" in log and "Traceback" not in log
    finally:
        process.cleanup()


def test_kill_is_a_crash_without_drain() -> None:
    process = GatewayProcess().start()
    try:
        assert process.running and process.pid is not None
        assert process.kill() == -signal.SIGKILL
        assert not process.running
        assert "Application shutdown complete" not in process.log_text()
    finally:
        process.cleanup()
