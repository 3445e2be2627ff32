"""The chat page with authentication on (auth=jwt and auth=users), in Chromium against one real gateway.

A single ``chat-gateway serve`` process (tests.support.gateway_process) is enough here: what is under
test is the page's login form, the token or credentials it sends in CONNECT, and the sender the
server derives from them.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.conftest import ChatPage, wait_for
from tests.support.gateway_process import GatewayProcess

if TYPE_CHECKING:  # only for annotations: without Playwright the fixtures skip (or fail in CI)
    from playwright.sync_api import BrowserContext

pytestmark = [pytest.mark.browser]

SECRET = "c2VjcmV0LWtleS1mb3ItdGhlLWNoYXQtZ2F0ZXdheS1icm93c2VyLXRlc3Rz"


@pytest.fixture(scope="module", params=["jwt", "users"])
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    settings: dict[str, Any] = {"auth": request.param, "users": "alice:wonderland,bob:builder"}
    if request.param == "jwt":
        settings["jwt_secret"] = SECRET
    with GatewayProcess(settings) as process:
        yield process


def create_room(base: str, name: str) -> str:
    # REST needs authentication in these modes (issue 10): alice's, as a Basic (users) or Bearer (jwt) header.
    headers = {"Authorization": "Basic " + base64.b64encode(b"alice:wonderland").decode()}
    request = urllib.request.Request(base + "/chat/login", data=b"login=alice&passcode=wonderland", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        token = json.loads(response.read())["token"]
    if token:
        headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(base + "/chat/room", data=f"name={name}".encode(), method="POST",
                                     headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(json.loads(response.read())["roomId"])


def log_in(page: ChatPage, login: str, passcode: str) -> None:
    form = page.page.locator("#login-form")
    form.locator("input[name=login]").fill(login)
    form.locator("input[name=passcode]").fill(passcode)
    form.locator("button[type=submit]").click()


def test_page_asks_for_a_login_and_chats_as_that_user(gateway: GatewayProcess,
                                                      contexts: Callable[..., BrowserContext]) -> None:
    auth = str(gateway.settings["auth"])
    room_id = create_room(gateway.url, "members only")
    context = contexts()
    page = ChatPage.open(context, f"{gateway.url}/chat/room/enter/{room_id}")
    page.wait_state("login")
    assert page.page.locator("#login").is_visible()

    log_in(page, "alice", "not her password")
    wait_for(lambda: page.page.locator("#login-error").text_content() == "bad login or passcode",
             "the login error")
    assert page.state == "login"

    log_in(page, "alice", "wonderland")
    page.wait_state("connected")
    assert page.me == "alice"
    assert not page.page.locator("#login").is_visible()
    page.send(f"signed in with auth={auth}")
    page.wait_texts([f"signed in with auth={auth}"])
    talk = [m for m in page.messages() if m["kind"] == "talk"]
    assert talk[-1]["sender"] == "alice"
    assert any("alice님이 방에 입장했습니다." == m["text"] for m in page.messages())

    cookies = {c["name"]: c for c in context.cookies()}
    # Both modes: the HttpOnly session cookie the REST calls need (users: signed with the users-mode key).
    assert cookies["chat_session"]["httpOnly"] is True
    assert page.page.evaluate("document.cookie").find("chat_session") == -1

    # A reload keeps the login (jwt: the HttpOnly cookie; users: this tab's sessionStorage).
    page.page.reload()
    page.wait_state("connected")
    assert page.me == "alice"
    page.wait_texts([f"signed in with auth={auth}"])

    # Log out: the next visit asks again.
    page.page.locator("#logout").click()
    page.wait_state("login")


def test_each_user_is_the_sender_of_their_own_messages(gateway: GatewayProcess,
                                                       contexts: Callable[..., BrowserContext]) -> None:
    room_id = create_room(gateway.url, "two members")
    pages = []
    for login, passcode in (("alice", "wonderland"), ("bob", "builder")):
        page = ChatPage.open(contexts(), f"{gateway.url}/chat/room/enter/{room_id}")
        page.wait_state("login")
        log_in(page, login, passcode)
        page.wait_state("connected")
        pages.append(page)
    alice, bob = pages
    alice.send("from alice")
    bob.send("from bob")
    for page in pages:
        page.wait_texts(["from alice", "from bob"])
        senders = {m["text"]: m["sender"] for m in page.messages() if m["kind"] == "talk"}
        assert senders == {"from alice": "alice", "from bob": "bob"}
    wait_for(lambda: alice.user_count() == "2", "alice's page to count 2 users")
