"""Who may read and write which room (issue 10, authorization half), over the wire.

Real servers (tests.chat.conftest.make_server: uvicorn + the chat domain on a migrated SQLite file),
real clients (stomp-py, and @stomp/stompjs 7 through tests/clients/authz.mjs) and real HTTP requests
(httpx), in every auth mode (anonymous, users, jwt):

- the ``open`` policy refuses pattern subscriptions that can match rooms unless
  ``authz_room_wildcards``; exact rooms and non-room patterns are fine;
- the ``members`` policy: only members subscribe, send, read history and see a room listed; members
  are added and removed over REST; a removed member's subscribed session is closed with an ERROR, at
  once on the node that made the change and within ``authz_cache_ttl_s`` on another node;
- a hook policy (``tests.chat.authz_hook:decide``);
- SEND checks hit the per-session cache: 50 SENDs cost one policy call;
- REST authentication (401 without or with bad credentials in users/jwt modes) and the Origin check on
  every state-changing call;
- client message ids scoped to the sender;
- reserved names in the anonymous mode.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import stomp

from gateway.app import create_app
from gateway.auth import SYSTEM_SENDER_NAME, is_reserved_name
from gateway.authz import wildcard_may_match
from gateway.chat.migrations import upgrade
from gateway.chat.payload import SYSTEM_SENDER
from gateway.chat.service import ChatService
from gateway.jwt_auth import key_from_secret, mint_token
from gateway.settings import SettingsError, load_settings
from tests.support.live_server import LiveServer
from tests.support.node import require_node, run_node
from tests.support.polling import eventually_sync
from tests.support.redis_server import redis_server

SECRET = base64.b64encode(b"a-secret-for-the-authorization-tests-0123456789").decode()
USERS = ("alice:wonderland", "bob:builder", "carol:singer", "mute:quiet", "admin:root")
MODES = ["anonymous", "users", "jwt"]
AUTHENTICATED = ["users", "jwt"]


def mode_settings(auth: str, **extra: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"auth": auth, **extra}
    if auth != "anonymous":
        settings["users"] = USERS
    if auth == "jwt":
        settings["jwt_secret"] = SECRET
    return settings


@dataclass
class Who:
    """One user of a server in its auth mode: CONNECT headers and an authenticated REST client."""

    name: str
    auth: str
    server: LiveServer
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.server.url, timeout=10)
        if self.auth == "users":
            passcode = dict(pair.split(":") for pair in USERS)[self.name]
            response = self.http.post("/chat/login", data={"login": self.name, "passcode": passcode})
            assert response.status_code == 200 and "chat_session" in self.http.cookies
        elif self.auth == "jwt":
            self.http.headers["Authorization"] = f"Bearer {self.token()}"

    def token(self) -> str:
        return mint_token(self.name, key_from_secret(SECRET))

    def connect_headers(self) -> dict[str, str]:
        if self.auth == "jwt":
            return {"token": self.token()}
        if self.auth == "users":
            return {"login": self.name, "passcode": dict(pair.split(":") for pair in USERS)[self.name]}
        return {"login": self.name}

    def create_room(self, name: str = "room") -> str:
        response = self.http.post("/chat/room", data={"name": name})
        assert response.status_code == 200, response.text
        return str(response.json()["roomId"])


def plain_client(server: LiveServer) -> httpx.Client:
    """An HTTP client without credentials (blocking: the server runs in its own thread)."""
    return httpx.Client(base_url=server.url, timeout=10)


class Recorder(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connected: list[dict[str, str]] = []
        self.receipts: list[str] = []
        self.errors: list[dict[str, str]] = []
        self.messages: list[dict[str, Any]] = []
        self.disconnected = 0

    def on_connected(self, frame: Any) -> None:
        with self.lock:
            self.connected.append(dict(frame.headers))

    def on_receipt(self, frame: Any) -> None:
        with self.lock:
            self.receipts.append(frame.headers["receipt-id"])

    def on_error(self, frame: Any) -> None:
        with self.lock:
            self.errors.append(dict(frame.headers))

    def on_message(self, frame: Any) -> None:
        with self.lock:
            self.messages.append(json.loads(frame.body))

    def on_disconnected(self) -> None:
        with self.lock:
            self.disconnected += 1


def stomp_py(server: LiveServer, headers: dict[str, str]) -> tuple[stomp.WSConnection, Recorder]:
    conn = stomp.WSConnection([("127.0.0.1", server.port)], ws_path="/ws-stomp/websocket",
                              reconnect_attempts_max=1)
    recorder = Recorder()
    conn.set_listener("recorder", recorder)
    extra = dict(headers)
    conn.connect(extra.pop("login", None), extra.pop("passcode", None), wait=False, headers=extra)
    eventually_sync(lambda: bool(recorder.connected or recorder.errors), "CONNECTED or ERROR")
    return conn, recorder


def answer(conn: stomp.WSConnection, recorder: Recorder, rid: str, action: Any, *args: Any, **kwargs: Any) -> str:
    """Run a stomp-py action with a receipt: 'receipt', or the ERROR's message."""
    action(*args, receipt=rid, **kwargs)
    eventually_sync(lambda: rid in recorder.receipts or bool(recorder.errors), f"answer to {rid}")
    return "receipt" if rid in recorder.receipts else recorder.errors[-1]["message"]


def talk(room: str, text: str, sender: str | None = None) -> str:
    body: dict[str, str] = {"type": "TALK", "roomId": room, "message": text}
    if sender is not None:
        body["sender"] = sender
    return json.dumps(body)


def stompjs(server: LiveServer, who: Who | dict[str, str], steps: list[dict[str, Any]]) -> dict[str, Any]:
    headers = who.connect_headers() if isinstance(who, Who) else who
    return run_node("authz.mjs", {"url": server.ws_url, "connectHeaders": headers, "steps": steps}, timeout=40)


# --- the open policy: wildcards ---------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.parametrize("auth", MODES)
async def test_open_policy_refuses_room_wildcards_and_allows_exact_rooms(make_server: Any, auth: str) -> None:
    server = await make_server(**mode_settings(auth))
    alice = Who("alice", auth, server)
    room = alice.create_room()
    conn, seen = stomp_py(server, alice.connect_headers())
    assert answer(conn, seen, "exact", conn.subscribe, f"/sub/chat/room/{room}", id="1") == "receipt"
    assert answer(conn, seen, "other", conn.subscribe, "/sub/other/*", id="2") == "receipt"  # not a room
    refused = answer(conn, seen, "star", conn.subscribe, "/sub/chat/room/*", id="3")
    assert refused.startswith("Access denied: wildcard subscriptions to room destinations are not allowed")
    eventually_sync(lambda: seen.disconnected > 0, "the close after the ERROR")

    for pattern in ("/sub/**", "/sub/chat/room/{id}", "/sub/chat/room/?"):
        result = stompjs(server, alice, [{"op": "subscribe", "destination": pattern}])
        assert result["steps"] == [{"op": "subscribe", "outcome": "error", "message":
                                    f"Access denied: wildcard subscriptions to room destinations are not "
                                    f"allowed ('{pattern}'); subscribe to each room"}]


@pytest.mark.node
async def test_open_policy_with_authz_room_wildcards_allows_them(make_server: Any) -> None:
    server = await make_server(authz_room_wildcards=True)
    room = Who("alice", "anonymous", server).create_room()
    result = stompjs(server, {"login": "carol"}, [
        {"op": "subscribe", "destination": "/sub/chat/room/*"},
        {"op": "send", "room": room, "message": "seen through a pattern"},
        {"op": "wait", "text": "seen through a pattern"}])
    assert [step["outcome"] for step in result["steps"]] == ["receipt", "receipt", "received"]


# --- the members policy -------------------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.parametrize("auth", AUTHENTICATED)
async def test_members_policy_over_stomp(make_server: Any, auth: str) -> None:
    server = await make_server(**mode_settings(auth, authz_policy="members"))
    alice, bob = Who("alice", auth, server), Who("bob", auth, server)
    room = alice.create_room("alice's")

    # Not a member: SUBSCRIBE and SEND are refused with a clear ERROR (stomp-py and stompjs).
    conn, seen = stomp_py(server, bob.connect_headers())
    assert answer(conn, seen, "s", conn.subscribe, f"/sub/chat/room/{room}", id="1") == (
        f"Access denied: 'bob' may not subscribe to room '{room}'")
    result = stompjs(server, bob, [{"op": "send", "room": room, "message": "let me in"}])
    assert result["steps"] == [{"op": "send", "outcome": "error",
                                "message": f"Access denied: 'bob' may not send to room '{room}'"}]
    result = stompjs(server, bob, [{"op": "subscribe", "destination": "/sub/chat/room/*"}])
    assert result["steps"][0]["message"].startswith("Access denied: wildcard subscriptions")

    # The creator is a member; she adds bob over REST; bob then subscribes, sends and reads.
    result = stompjs(server, alice, [{"op": "subscribe", "destination": f"/sub/chat/room/{room}"},
                                     {"op": "send", "room": room, "message": "alice here"}])
    assert [step["outcome"] for step in result["steps"]] == ["receipt", "receipt"]
    added = alice.http.post(f"/chat/room/{room}/members", data={"user": "bob"})
    assert added.status_code == 200 and added.json()["members"] == ["alice", "bob"]
    result = stompjs(server, bob, [{"op": "subscribe", "destination": f"/sub/chat/room/{room}"},
                                   {"op": "send", "room": room, "message": "bob is in"},
                                   {"op": "wait", "text": "bob is in"}])
    assert [step["outcome"] for step in result["steps"]] == ["receipt", "receipt", "received"]
    history = bob.http.get(f"/chat/room/{room}/messages")
    assert history.status_code == 200
    assert [m["message"] for m in history.json() if m["type"] == "TALK"] == ["alice here", "bob is in"]

    # Removed while subscribed (same node): his session gets an ERROR and is closed at once.
    conn, seen = stomp_py(server, bob.connect_headers())
    assert answer(conn, seen, "s2", conn.subscribe, f"/sub/chat/room/{room}", id="1") == "receipt"
    assert alice.http.delete(f"/chat/room/{room}/members/bob").status_code == 204
    eventually_sync(lambda: bool(seen.errors), "the revocation ERROR")
    assert seen.errors[-1]["message"] == f"Access to room '{room}' was revoked"
    eventually_sync(lambda: seen.disconnected > 0, "the close")
    result = stompjs(server, bob, [{"op": "send", "room": room, "message": "still here?"}])
    assert result["steps"][0]["outcome"] == "error"
    assert bob.http.get(f"/chat/room/{room}/messages").status_code == 403


@pytest.mark.parametrize("auth", AUTHENTICATED)
async def test_members_policy_over_rest(make_server: Any, auth: str) -> None:
    server = await make_server(**mode_settings(auth, authz_policy="members"))
    alice, bob, carol = Who("alice", auth, server), Who("bob", auth, server), Who("carol", auth, server)
    mine = alice.create_room("alice's")
    theirs = bob.create_room("bob's")
    assert [r["roomId"] for r in alice.http.get("/chat/rooms").json()] == [mine]   # only her rooms
    assert [r["roomId"] for r in bob.http.get("/chat/rooms").json()] == [theirs]
    for path in (f"/chat/room/{mine}", f"/chat/room/{mine}/messages", f"/chat/room/{mine}/members"):
        refused = bob.http.get(path)
        assert refused.status_code == 403, path
        assert refused.json() == {"error": f"Access denied: 'bob' may not read room '{mine}'"}
        assert alice.http.get(path).status_code == 200, path
    assert bob.http.get("/chat/room/no-such-room/messages").status_code == 403   # no probing
    assert bob.http.post(f"/chat/room/{mine}/members", data={"user": "bob"}).status_code == 403
    assert carol.http.delete(f"/chat/room/{mine}/members/alice").status_code == 403
    assert alice.http.post(f"/chat/room/{mine}/members", data={"user": "carol"}).status_code == 200
    assert alice.http.get(f"/chat/room/{mine}/members").json() == {"roomId": mine, "members": ["alice", "carol"]}
    assert [r["roomId"] for r in carol.http.get("/chat/rooms").json()] == [mine]
    # A member may add others (carol adds bob) and leave (bob removes himself).
    assert carol.http.post(f"/chat/room/{mine}/members?user=bob").status_code == 200
    assert bob.http.delete(f"/chat/room/{mine}/members/bob").status_code == 204
    assert bob.http.delete(f"/chat/room/{mine}/members/bob").status_code == 403  # no longer a member
    assert alice.http.delete(f"/chat/room/{mine}/members/bob").status_code == 404  # not a member


async def test_a_removed_member_loses_the_room_on_another_node_within_the_cache_ttl(
        make_server: Any, tmp_path: Path) -> None:
    """Two nodes on one database and one Redis (nodes sharing a database must share a Redis, see
    gateway.chat.fleet): alice removes bob on node A; bob's session on node B gets its ERROR within
    authz_cache_ttl_s (1 s here) plus a check; no message on the bus tells node B."""
    with redis_server() as redis:
        await _removed_member_on_another_node(make_server, redis.url)


async def _removed_member_on_another_node(make_server: Any, redis_url: str) -> None:
    node_a = await make_server(**mode_settings("users", authz_policy="members", authz_cache_ttl_s=1.0),
                               redis_url=redis_url)
    settings = load_settings(environ={}, database_url=node_a.gateway.settings.database_url, heartbeat_receive_ms=0,
                             node_id="node-b", db_busy_timeout_s=120, redis_url=redis_url,
                             **mode_settings("users", authz_policy="members", authz_cache_ttl_s=1.0))
    node_b = LiveServer(create_app(settings)).start()
    try:
        alice = Who("alice", "users", node_a)
        room = alice.create_room()
        assert alice.http.post(f"/chat/room/{room}/members", data={"user": "bob"}).status_code == 200
        conn, seen = stomp_py(node_b, Who("bob", "users", node_b).connect_headers())
        assert answer(conn, seen, "s", conn.subscribe, f"/sub/chat/room/{room}", id="1") == "receipt"
        assert alice.http.delete(f"/chat/room/{room}/members/bob").status_code == 204
        eventually_sync(lambda: bool(seen.errors), "the revocation on the other node", timeout_s=15)
        assert seen.errors[-1]["message"] == f"Access to room '{room}' was revoked"
    finally:
        node_b.stop()


# --- a hook policy ----------------------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.parametrize("auth", MODES)
async def test_hook_policy_decides(make_server: Any, auth: str) -> None:
    from tests.chat import authz_hook
    server = await make_server(**mode_settings(auth, authz_policy="tests.chat.authz_hook:decide"))
    alice = Who("alice", auth, server)
    room = alice.create_room()
    if auth == "anonymous":
        mute: Who | dict[str, str] = {"login": "muted-guest"}
        admin: Who | dict[str, str] = {"login": "administrator"}
        # Anonymous names are claims: the hook sees the login (here neither 'mute' nor 'admin').
        result = stompjs(server, mute, [{"op": "send", "room": room, "message": "ok"}])
        assert result["steps"][0]["outcome"] == "receipt"
        return
    mute, admin = Who("mute", auth, server), Who("admin", auth, server)
    result = stompjs(server, mute, [{"op": "subscribe", "destination": f"/sub/chat/room/{room}"},
                                    {"op": "send", "room": room, "message": "shh"}])
    assert result["steps"] == [{"op": "subscribe", "outcome": "receipt"},
                               {"op": "send", "outcome": "error",
                                "message": f"Access denied: 'mute' may not send to room '{room}'"}]
    result = stompjs(server, admin, [{"op": "subscribe", "destination": "/sub/**"},
                                     {"op": "send", "room": room, "message": "admin sees all"},
                                     {"op": "wait", "text": "admin sees all"}])
    assert [step["outcome"] for step in result["steps"]] == ["receipt", "receipt", "received"]
    result = stompjs(server, alice, [{"op": "subscribe", "destination": "/sub/**"}])
    assert result["steps"][0]["outcome"] == "error"
    assert any(r.wildcard and r.user == "admin" for r in authz_hook.ASKED)


# --- the cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["open", "members"])
async def test_sends_hit_the_session_cache_not_the_policy(make_server: Any, policy: str) -> None:
    server = await make_server(**mode_settings("users", authz_policy=policy))
    alice = Who("alice", "users", server)
    room = alice.create_room()
    assert server.gateway.chat is not None
    service = server.gateway.chat.service
    conn, seen = stomp_py(server, alice.connect_headers())
    before = service.authz.queries
    for i in range(50):
        conn.send("/pub/chat/message", talk(room, f"m{i}"), content_type="application/json",
                  headers={"receipt": f"m{i}"})
    eventually_sync(lambda: len(seen.receipts) == 50, "50 receipts", timeout_s=30)
    assert not seen.errors
    assert service.authz.queries - before == 1   # one decision, cached for the session
    conn.disconnect()


# --- REST authentication and Origin ---------------------------------------------------------------------------


@pytest.mark.parametrize("auth", MODES)
async def test_rest_authentication_and_origin(make_server: Any, auth: str) -> None:
    server = await make_server(**mode_settings(auth))
    anonymous = plain_client(server)
    alice = Who("alice", auth, server)
    room = alice.create_room()
    paths = ["/chat/rooms", f"/chat/room/{room}", f"/chat/room/{room}/messages", f"/chat/room/{room}/members"]
    for path in paths:
        assert alice.http.get(path).status_code == 200, path
        status = anonymous.get(path).status_code
        assert status == (200 if auth == "anonymous" else 401), path
    if auth != "anonymous":
        assert anonymous.post("/chat/room", data={"name": "x"}).status_code == 401
        assert anonymous.get("/chat/rooms").json() == {"error": "login required"}
        bad = anonymous.get("/chat/rooms", headers={"Authorization": "Bearer not-a-token"})
        assert bad.status_code == 401 and bad.json() == {"error": "invalid token"}
        expired = mint_token("alice", key_from_secret(SECRET), ttl_s=-10)
        late = anonymous.get("/chat/rooms", headers={"Authorization": f"Bearer {expired}"})
        assert late.status_code == 401
        if auth == "jwt":
            assert late.json() == {"error": "token expired"}
        else:  # users: Basic works for non-browser clients; a token from another mode's key does not
            basic = base64.b64encode(b"alice:wonderland").decode()
            assert anonymous.get("/chat/rooms", headers={"Authorization": f"Basic {basic}"}).status_code == 200
            wrong = base64.b64encode(b"alice:nope").decode()
            assert anonymous.get("/chat/rooms", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    # Every state-changing call refuses a foreign Origin (even with valid credentials), allows its own.
    foreign = {"Origin": "https://evil.example"}
    own = {"Origin": server.url}
    assert alice.http.post("/chat/room", data={"name": "x"}, headers=foreign).status_code == 403
    assert alice.http.post(f"/chat/room/{room}/members", data={"user": "bob"}, headers=foreign).status_code == 403
    assert alice.http.delete(f"/chat/room/{room}/members/alice", headers=foreign).status_code == 403
    assert alice.http.post("/chat/room", data={"name": "x"}, headers=own).status_code == 200
    assert alice.http.post(f"/chat/room/{room}/members", data={"user": "bob"}, headers=own).status_code == 200


# --- client message ids per sender ------------------------------------------------------------------------------


@pytest.mark.node
@pytest.mark.parametrize("auth", MODES)
async def test_client_msg_ids_are_scoped_to_the_sender(make_server: Any, auth: str) -> None:
    server = await make_server(**mode_settings(auth))
    alice, bob = Who("alice", auth, server), Who("bob", auth, server)
    room = alice.create_room()
    cid = str(uuid.uuid4())
    reader, seen = stomp_py(server, Who("carol", auth, server).connect_headers())
    assert answer(reader, seen, "s", reader.subscribe, f"/sub/chat/room/{room}", id="1") == "receipt"
    result = stompjs(server, alice, [{"op": "send", "room": room, "message": "alice's", "clientMsgId": cid}])
    assert result["steps"][0]["outcome"] == "receipt"
    # Bob reuses Alice's id (stomp-py): stored and delivered, not swallowed.
    conn, answers = stomp_py(server, bob.connect_headers())
    assert answer(conn, answers, "b1", conn.send, "/pub/chat/message", talk(room, "bob's"),
                  content_type="application/json", headers={"client-msg-id": cid}) == "receipt"
    # Alice repeats her id: a RECEIPT, nothing stored again.
    result = stompjs(server, alice, [{"op": "send", "room": room, "message": "alice again", "clientMsgId": cid}])
    assert result["steps"][0]["outcome"] == "receipt"
    eventually_sync(lambda: {m["message"] for m in seen.messages if m["type"] == "TALK"} >= {"alice's", "bob's"},
                    "both TALKs delivered")
    history = [m for m in alice.http.get(f"/chat/room/{room}/messages").json() if m["type"] == "TALK"]
    assert [(m["sender"], m["message"]) for m in history] == [("alice", "alice's"), ("bob", "bob's")]
    assert all(m["message"] != "alice again" for m in seen.messages)


# --- identity in the anonymous mode ---------------------------------------------------------------------------


@pytest.mark.node
async def test_reserved_names_cannot_be_claimed_in_the_anonymous_mode(make_server: Any) -> None:
    server = await make_server(users=("alice:wonderland",))
    room = Who("guest", "anonymous", server).create_room()
    for login in (SYSTEM_SENDER, " [알림] ", "alice", "ALICE"):
        _conn, seen = stomp_py(server, {"login": login})
        assert not seen.connected
        assert seen.errors[-1]["message"] == f"Authentication failed: the name {login!r} is reserved"
    result = stompjs(server, {"login": SYSTEM_SENDER}, [])
    assert result["connected"] is None
    # stompjs 7 does not unescape the headers of an ERROR that comes before CONNECTED (it learns the
    # version from CONNECTED), so the ':' arrives as the STOMP 1.2 escape '\c'.
    assert result["connectError"].replace("\\c", ":") == (
        f"Authentication failed: the name {SYSTEM_SENDER!r} is reserved")
    # Without a login the ChatMessage's sender is used: a reserved one is refused at SEND.
    result = stompjs(server, {}, [{"op": "send", "room": room, "message": "fake notice", "sender": SYSTEM_SENDER}])
    assert result["steps"] == [{"op": "send", "outcome": "error",
                                "message": f"The sender name {SYSTEM_SENDER!r} is reserved: choose another name"}]
    result = stompjs(server, {"login": "guest-1234abcd"}, [{"op": "send", "room": room, "message": "fine"}])
    assert result["steps"][0]["outcome"] == "receipt"
    history = plain_client(server).get(f"/chat/room/{room}/messages").json()
    assert [m["message"] for m in history if m["sender"] == SYSTEM_SENDER and m["type"] == "TALK"] == []


# --- rules without a server -----------------------------------------------------------------------------------


def test_reserved_name_rule() -> None:
    assert SYSTEM_SENDER_NAME == SYSTEM_SENDER
    assert is_reserved_name("[알림]") and is_reserved_name("  [알림]  ") and is_reserved_name("［알림］")  # NFKC
    assert is_reserved_name("Alice", ["alice"]) and not is_reserved_name("alice2", ["alice"])
    assert not is_reserved_name("guest-0123abcd", ["alice"])


def test_which_patterns_may_match_rooms() -> None:
    prefix = "/sub/chat/room/"
    for pattern in ("/sub/**", "/sub/chat/room/*", "/sub/chat/**", "/sub/*/room/x", "/**", "/sub/chat/room/a?",
                    "/sub/chat/room/{id}"):
        assert wildcard_may_match(pattern, prefix), pattern
    for pattern in ("/sub/other/*", "/sub/chat/roomx/*", "/sub/chat/room/42", "/queue/**"):
        assert not wildcard_may_match(pattern, prefix), pattern


@pytest.mark.parametrize(("values", "message"), [
    ({"authz_policy": "members"}, "authz_policy=members needs authenticated users"),
    ({"authz_policy": "nonsense"}, "authz_policy must be open, members or package.module:function"),
    ({"authz_policy": "tests.chat.authz_hook:decide", "allow_client_broker_send": True},
     "allow_client_broker_send would let clients publish to rooms"),
    ({"authz_cache_ttl_s": 0}, "authz_cache_ttl_s must be positive"),
])
def test_settings_refuse_unsafe_combinations(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ={}, **values)


async def test_a_hook_that_is_not_async_is_refused_at_start(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    await asyncio.to_thread(upgrade, url)
    settings = load_settings(environ={}, database_url=url, authz_policy="json:dumps")
    with pytest.raises(ValueError, match="must be an async function"):
        create_app(settings)


class _DownStore:
    """A membership store whose database is unreachable."""

    async def is_member(self, room_id: str, user: str) -> bool:
        raise ConnectionRefusedError("database down")

    async def memberships(self, pairs: Any) -> set[tuple[str, str]]:
        raise ConnectionRefusedError("database down")


async def test_members_checks_while_the_database_is_down_say_so() -> None:
    """SUBSCRIBE: an ERROR saying to subscribe again; SEND: 'not stored, retry' (the session stays
    open, as for a SEND the database could not store); the periodic re-check closes nobody."""
    from types import SimpleNamespace

    from gateway.authz import Authorizer, MembersPolicy
    from gateway.hub import InboundMessage, MessageNotStored, SessionInfo, SubscriptionDenied

    settings = load_settings(environ={}, **mode_settings("users", authz_policy="members"))
    writer = SimpleNamespace(on_commit=None)
    hub = SimpleNamespace(sessions={}, node_id="n", subscriptions_of=lambda subscriber: {"1": "/sub/chat/room/r1"})
    repository = SimpleNamespace(get_room=None)
    service = ChatService(settings, repository, writer, SimpleNamespace(), hub,  # type: ignore[arg-type]
                          authz=Authorizer(MembersPolicy(_DownStore()), ttl_s=5.0))
    service._known_rooms.add("r1")
    session = SessionInfo("s1", "websocket", "127.0.0.1", user="bob")
    with pytest.raises(SubscriptionDenied, match="database is unavailable: subscribe again"):
        await service.authorize_subscribe(session, "1", "/sub/chat/room/r1")
    inbound = InboundMessage(session, "/pub/chat/message", (), talk("r1", "hello").encode())
    with pytest.raises(MessageNotStored):
        await service.handle_send(inbound)
    hub.sessions["s1"] = SimpleNamespace(info=session)
    with pytest.raises(ConnectionRefusedError):
        await service.recheck_subscriptions()   # the background loop logs nothing for this and retries


SOCKJS_SCRIPT = Path(__file__).resolve().parents[1] / "transport" / "sockjs" / "sockjs_client_stomp.mjs"


def run_sockjs_client(args: list[str]) -> subprocess.CompletedProcess[str]:
    """tests/transport/sockjs/sockjs_client_stomp.mjs (sockjs-client + a STOMP client), blocking."""
    return subprocess.run([require_node(), str(SOCKJS_SCRIPT), *args], capture_output=True, text=True,
                          timeout=40, check=False)


@pytest.mark.node
@pytest.mark.parametrize("transport", ["websocket", "xhr-streaming", "xhr-polling"])
async def test_refusals_reach_sockjs_clients(make_server: Any, transport: str) -> None:
    """The reference frontend's stack (sockjs-client + stompjs 2.3.3) with jwt and members: a SUBSCRIBE
    to someone else's room is refused with the same ERROR over every SockJS transport."""
    server = await make_server(**mode_settings("jwt", authz_policy="members"))
    room = Who("alice", "jwt", server).create_room()
    result = run_sockjs_client(
        ["--url", server.url + "/ws-stomp", "--transport", transport, "--client", "stompjs",
         "--subscribe", f"/sub/chat/room/{room}", "--count", "0", "--expect", "1",
         "--header", "token:" + Who("bob", "jwt", server).token(), "--timeout-ms", "20000"])
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 1, result.stdout
    assert any(e["event"] == "connected" for e in events)
    errors = [e for e in events if e["event"] == "error"]
    # stompjs 2.3.3 never unescapes headers: the ':' of the 1.1 session's ERROR arrives as '\c'.
    message = errors[0]["frame"]["headers"]["message"].replace("\\c", ":")
    assert message == f"Access denied: 'bob' may not subscribe to room '{room}'"
