"""Structured logs (gateway.logs): JSON lines off a terminal, key=value text on one, uvicorn's loggers
in the same format, one line per session open and close, and no credential or message body at INFO.

The session and uvicorn lines come from a real ``chat-gateway serve`` process (its stderr captured to
a file, so ``auto`` picks JSON); the terminal case runs a real process with stderr on a pseudo-terminal.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from gateway.logs import make_formatter, redact, resolve_format
from tests.support.gateway_process import REPO, GatewayProcess
from tests.support.polling import eventually_sync
from tests.support.stomp_wire import WsStompClient

RAW_KEY = b"a-long-enough-secret-for-hs256-tokens!"
SECRET = base64.b64encode(RAW_KEY).decode()
REQUIRED = ("ts", "level", "logger", "event", "pid")
ANSI = "\x1b["


def token_for(user: str) -> str:
    return jwt.encode({"jti": user, "exp": 4_000_000_000}, RAW_KEY, algorithm="HS256")


def record(name: str, msg: str, *args: Any, level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    item = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    item.__dict__.update(extra)
    return item


# --- the formatter ---------------------------------------------------------------------------------

def test_a_json_line_has_the_required_keys_and_the_extra_fields() -> None:
    line = make_formatter("json").format(record("gateway.session", "session %s", "opened", user="alice",
                                                duration_s=1.5, color_message="dropped"))
    parsed = json.loads(line)
    assert list(parsed)[:4] == ["ts", "level", "logger", "event"]
    assert parsed["event"] == "session opened" and parsed["level"] == "info"
    assert parsed["logger"] == "gateway.session" and parsed["pid"] == os.getpid()
    assert parsed["user"] == "alice" and parsed["duration_s"] == 1.5
    assert "color_message" not in parsed and "positional_args" not in parsed
    assert "\n" not in line


def test_a_json_line_carries_a_traceback_as_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        item = logging.LogRecord("gateway", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = make_formatter("json").format(item)
    parsed = json.loads(line)
    assert parsed["level"] == "error" and "ValueError: boom" in parsed["exception"]
    assert "\n" not in line


def test_uvicorn_access_lines_become_fields_and_query_credentials_are_redacted() -> None:
    token = token_for("alice")
    item = record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                  f"/ws-stomp/info?access_token={token}&t=1", "1.1", 200)
    parsed = json.loads(make_formatter("json").format(item))
    assert parsed["event"] == "http request"
    assert (parsed["client"], parsed["method"], parsed["status"]) == ("127.0.0.1:5000", "GET", 200)
    assert parsed["path"] == "/ws-stomp/info?access_token=[redacted]&t=1"
    assert token not in json.dumps(parsed)


def test_redact_replaces_credential_values_only() -> None:
    assert redact("GET /x?token=abc.def&room=1 passcode=s3cret Authorization=Bearer") == (
        "GET /x?token=[redacted]&room=1 passcode=[redacted] Authorization=[redacted]")
    assert redact("tokens=3 no secrets here") == "tokens=3 no secrets here"


def test_text_lines_are_key_value_and_colourless_off_a_terminal() -> None:
    line = make_formatter("text").format(record("gateway.session", "session closed", user="alice",
                                                close_code=1000))
    assert "session closed" in line and "user=alice" in line and "close_code=1000" in line
    assert ANSI not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_auto_is_text_on_a_terminal_and_json_elsewhere(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            assert resolve_format("auto", terminal) == "text"
    finally:
        os.close(master)
        os.close(slave)
    with open(tmp_path / "log", "w") as file:
        assert resolve_format("auto", file) == "json"
        assert resolve_format("text", file) == "text"
    with pytest.raises(ValueError):
        resolve_format("xml")


_EMIT = ("import logging; from gateway.logs import configure_logging; from gateway.settings import load_settings; "
         "configure_logging(load_settings(environ={})); "
         "logging.getLogger('gateway.session').info('session opened', extra={'user': 'alice'}); "
         "logging.getLogger('uvicorn.error').info('Started server process [1]')")


def test_a_process_logging_to_a_terminal_writes_coloured_key_value_text() -> None:
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-c", _EMIT], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=slave, cwd=REPO)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(60) == 0
    finally:
        os.close(master)
    text = b"".join(chunks).decode()
    assert "session opened" in text and "user" in text and "alice" in text and ANSI in text
    assert "Started server process" in text
    assert not any(line.startswith("{") for line in text.splitlines())


def test_a_process_logging_to_a_pipe_writes_json_lines() -> None:
    result = subprocess.run([sys.executable, "-c", _EMIT], capture_output=True, text=True, timeout=60, cwd=REPO,
                            check=True)
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("gateway.session", "session opened"), ("uvicorn.error", "Started server process [1]")]
    assert lines[0]["user"] == "alice"


# --- a real server ---------------------------------------------------------------------------------

def log_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """Every line of the server's output, each parsed as JSON (a line that is not JSON fails)."""
    out = []
    for line in gateway.log_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


async def test_a_real_server_logs_json_session_lines_without_tokens_or_bodies(tmp_path: Path) -> None:
    alice, bob = token_for("alice"), token_for("bob")
    body_text = "a very private message body 7f3a"
    gateway = GatewayProcess({"auth": "jwt", "jwt_secret": SECRET, "heartbeat_receive_ms": 0}, workdir=tmp_path)
    try:
        gateway.start(60)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            response = await http.post("/chat/room", data={"name": "logs"}, headers={"Authorization": f"Bearer {alice}"})
            response.raise_for_status()
            room = str(response.json()["roomId"])
        # The token in the CONNECT's token and passcode headers, and in the URL's query string.
        client = await WsStompClient.open(f"{gateway.ws_url}?access_token={alice}")
        connected = await client.connect({"accept-version": "1.2", "host": "x", "token": alice, "passcode": alice})
        session_id = connected.get("session")
        await client.send_frame("SEND", {"destination": "/pub/chat/message", "receipt": "r1"},
                                json.dumps({"type": "TALK", "roomId": room, "message": body_text}))
        got = await client.next_frame(30)
        assert got.command == "RECEIPT", got
        await client.send_frame("DISCONNECT", {"receipt": "bye"})
        assert (await client.next_frame(30)).command == "RECEIPT"
        assert (await client.closed(30))[0] == 1000
        # A refused CONNECT (an Authorization header with a token signed by another key).
        forged = jwt.encode({"jti": "mallory", "exp": 4_000_000_000}, b"another-key-another-key-another!", "HS256")
        other = await WsStompClient.open(gateway.ws_url)
        await other.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", "Authorization": f"Bearer {forged}"})
        assert (await other.next_frame(30)).command == "ERROR"
        await other.closed(30)
        # Bob's session stays open until the server stops: its close line says why.
        third = await WsStompClient.open(gateway.ws_url)
        await third.connect({"accept-version": "1.2", "host": "x", "Authorization": f"Bearer {bob}"})

        eventually_sync(lambda: any(line.get("event") == "session closed" and line.get("session") == session_id
                                    for line in log_lines(gateway)), "alice's session closed line", timeout_s=30)
        assert gateway.stop(60) is not None
    finally:
        gateway.cleanup()

    lines = log_lines(gateway)
    for line in lines:
        assert all(key in line for key in REQUIRED), line
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "uvicorn.access", "gateway.session"} <= loggers, loggers

    opened = [line for line in lines if line["event"] == "session opened"]
    closed = [line for line in lines if line["event"] == "session closed"]
    mine = [line for line in opened if line["session"] == session_id]
    assert len(mine) == 1 and mine[0]["level"] == "info"
    assert (mine[0]["transport"], mine[0]["user"]) == ("websocket", "alice")
    assert mine[0]["remote"].startswith("127.0.0.1:") and mine[0]["stomp_version"] == "1.2"
    [end] = [line for line in closed if line["session"] == session_id]
    assert (end["close_code"], end["close_reason"], end["connected"]) == (1000, "DISCONNECT", True)
    assert end["sends"] == 1 and end["user"] == "alice" and end["duration_s"] >= 0
    assert {line["user"] for line in opened} == {"alice", "bob"}         # the refused CONNECT opened nothing
    refused = [line for line in closed if not line["connected"]]
    assert len(refused) == 1 and refused[0]["user"] is None and refused[0]["close_code"] == 1002
    drained = [line for line in closed if line["user"] == "bob"]
    assert [line["close_reason"] for line in drained] == ["Server shutting down"]

    # uvicorn logged the WebSocket's URL, with the query's token redacted.
    assert any(line["logger"] == "uvicorn.error" and "access_token=[redacted]" in line["event"] for line in lines)
    text = gateway.log_text()
    for secret in (alice, bob, forged, body_text):
        assert secret not in text
    for token in (alice, bob, forged):   # nor any part of a token (its signature, say)
        assert token.rsplit(".", 1)[-1] not in text


def test_configure_logging_without_replace_keeps_a_handler_already_there() -> None:
    code = ("import logging, sys; from gateway.logs import configure_logging; "
            "from gateway.settings import load_settings; "
            "logging.basicConfig(stream=sys.stderr, format='PLAIN %(message)s', level='INFO'); "
            "configure_logging(load_settings(environ={}), replace=False); logging.getLogger('x').info('kept'); "
            "configure_logging(load_settings(environ={})); logging.getLogger('x').info('replaced')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                            check=True)
    first, second = result.stderr.splitlines()
    assert first == "PLAIN kept"
    assert json.loads(second)["event"] == "replaced"
