"""auth=users over a real server: the right passcode connects, a wrong or missing one gets ERROR + close."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.app import create_app
from gateway.auth import anonymous_authenticator, users_authenticator
from gateway.settings import load_settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed
from tests.support.live_server import LiveServer
from tests.support.stomp_wire import WsStompClient


@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    settings = load_settings(environ={}, auth="users", users=("alice:wonderland", "bob:b:c"), node_id="t",
                             heartbeat_receive_ms=0)
    running = LiveServer(create_app(settings, configure=[])).start()
    try:
        yield running
    finally:
        running.stop()


async def test_right_passcode_connects_with_user_name(server: LiveServer) -> None:
    ws = await WsStompClient.open(server.ws_url)
    connected = await ws.connect({"accept-version": "1.2", "host": "x", "login": "alice", "passcode": "wonderland"})
    assert connected.command == "CONNECTED" and connected.get("user-name") == "alice"
    await ws.close()


@pytest.mark.parametrize("headers", [
    {"login": "alice", "passcode": "wrong"},
    {"login": "alice"},
    {"login": "mallory", "passcode": "wonderland"},
    {},
])
async def test_wrong_or_missing_credentials_get_error_and_close(server: LiveServer,
                                                                headers: dict[str, str]) -> None:
    ws = await WsStompClient.open(server.ws_url)
    await ws.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", **headers})
    error = await ws.next_frame()
    assert error.command == "ERROR"
    assert error.get("message") == "Authentication failed: bad login or passcode"
    assert error.get("content-length") == "0"
    code, _ = await ws.closed()
    assert code == 1002


def test_passcodes_may_contain_colons() -> None:
    authenticate = users_authenticator(("bob:b:c",))
    assert authenticate(Frame.build("CONNECT", {"login": "bob", "passcode": "b:c"})) == "bob"
    with pytest.raises(AuthenticationFailed):
        authenticate(Frame.build("CONNECT", {"login": "bob", "passcode": "b"}))


def test_anonymous_takes_the_login_header_as_name() -> None:
    assert anonymous_authenticator(Frame.build("CONNECT", {"login": "guest7"})) == "guest7"
    assert anonymous_authenticator(Frame.build("CONNECT", {})) is None
