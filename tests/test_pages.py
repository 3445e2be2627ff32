"""The chat pages' routes without a browser: pages, vendored libraries, /chat/user and /chat/login.

Driven through Starlette's TestClient against the real app (create_app with a migrated SQLite file and
the memory broker). The login tests cover every auth mode, and the token /chat/login mints is used
for a real STOMP CONNECT over the app's WebSocket endpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.chat.migrations import upgrade
from gateway.jwt_auth import key_from_secret, mint_token, user_from_token
from gateway.pages import (
    CONTENT_SECURITY_POLICY,
    GUEST_COOKIE,
    MAX_LOGIN_CHARS,
    SESSION_COOKIE,
    VENDOR_FILES,
    check_vendor,
    pinned_versions,
)
from gateway.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "static"
SECRET = "c2VjcmV0LWtleS1mb3ItdGhlLWNoYXQtZ2F0ZXdheS10ZXN0cw=="  # Base64, as jjwt 0.9 reads it
ORIGIN_HOST = "testserver"


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('pages') / 'chat.db'}"
    upgrade(url)
    return url


def _client(database: str, **values: Any) -> TestClient:
    settings = load_settings(environ={}, database_url=database, node_id="pages-test", **values)
    return TestClient(create_app(settings))


@pytest.fixture
def client(database: str) -> Iterator[TestClient]:
    with _client(database) as test_client:
        yield test_client


# --- pages and static files -------------------------------------------------------------------------

def test_root_redirects_to_the_room_list(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == "/chat/room"


@pytest.mark.parametrize(("path", "page"), [("/chat/room", "rooms.html"),
                                             ("/chat/room/enter/4f0e1c9a-0000-4000-8000-000000000000", "room.html")])
def test_pages_are_served_with_a_strict_content_security_policy(client: TestClient, path: str, page: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == (STATIC / page).read_bytes()
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"


def test_chat_domain_routes_still_answer_next_to_the_pages(client: TestClient) -> None:
    created = client.post("/chat/room", data={"name": "pages"})
    assert created.status_code == 200
    room = created.json()
    assert client.get(f"/chat/room/{room['roomId']}").json()["name"] == "pages"
    assert client.get(f"/chat/room/{room['roomId']}/messages").json() == []
    assert client.get("/chat/room").headers["content-type"].startswith("text/html")


def test_every_script_and_stylesheet_a_page_references_is_served_from_this_server(client: TestClient) -> None:
    for page in ("rooms.html", "room.html"):
        html = (STATIC / page).read_text()
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs
        for ref in refs:
            if ref == "data:,":
                continue  # the empty favicon
            assert ref.startswith("/"), f"{page} references {ref} (no CDN, no other host)"
            assert not ref.startswith("//")
            response = client.get(ref)
            assert response.status_code == 200, ref


def test_no_inline_script_in_the_pages() -> None:
    for page in ("rooms.html", "room.html"):
        html = (STATIC / page).read_text()
        for match in re.finditer(r"<script([^>]*)>(.*?)</script>", html, re.S):
            assert "src=" in match.group(1) and not match.group(2).strip(), page
        assert not re.search(r"\son[a-z]+=", html), f"inline event handler in {page}"


def test_page_scripts_never_build_html_from_strings() -> None:
    scripts = sorted((STATIC / "js").glob("*.js"))
    assert scripts
    for script in scripts:
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, f"{script.name} uses {sink}"


def test_vendor_files_are_the_pinned_npm_packages(client: TestClient) -> None:
    assert check_vendor(load_settings(environ={})) == []
    pins = pinned_versions()
    assert pins["@stomp/stompjs"] == "7.5.0" and pins["sockjs-client"] == "1.6.1"
    for key, vendor in VENDOR_FILES.items():
        response = client.get(f"/static/vendor/{key}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/javascript")
        assert response.content == (REPO / "node_modules" / vendor.package / vendor.path).read_bytes()


def test_unknown_vendor_files_are_not_served(client: TestClient) -> None:
    assert client.get("/static/vendor/../package.json").status_code == 404
    assert client.get("/static/vendor/sockjs-client/package.json").status_code == 404
    assert client.get("/static/vendor/stompjs/stomp.umd.js.map").status_code == 404


def test_missing_or_unpinned_browser_libraries_are_reported(database: str, tmp_path: Path) -> None:
    modules = tmp_path / "node_modules"
    problems = check_vendor(load_settings(environ={}, node_modules_dir=str(modules)))
    assert len(problems) == 2 and all("not installed" in p for p in problems)
    with _client(database, node_modules_dir=str(modules)) as client:
        response = client.get("/static/vendor/sockjs-client/sockjs.min.js")
        assert response.status_code == 404
        assert "make node-deps" in response.text
    package = modules / "sockjs-client"
    (package / "dist").mkdir(parents=True)
    (package / "dist" / "sockjs.min.js").write_text("/* not the pinned build */")
    (package / "package.json").write_text(json.dumps({"name": "sockjs-client", "version": "1.5.0"}))
    problems = check_vendor(load_settings(environ={}, node_modules_dir=str(modules)))
    assert "sockjs-client 1.5.0 is installed but package.json pins 1.6.1" in problems


def test_static_dir_setting_is_honoured(database: str, tmp_path: Path) -> None:
    (tmp_path / "rooms.html").write_text("<!doctype html><title>custom</title>")
    with _client(database, static_dir=str(tmp_path)) as client:
        assert "custom" in client.get("/chat/room").text
        assert client.get("/chat/room/enter/x").status_code == 500  # room.html is missing there


# --- /chat/user and /chat/login -------------------------------------------------------------------

def test_anonymous_user_is_a_guest_kept_stable_by_a_cookie(client: TestClient) -> None:
    first = client.get("/chat/user")
    assert first.status_code == 200
    info = first.json()
    assert info["token"] == "" and info["auth"] == "anonymous"
    assert re.fullmatch(r"guest-[0-9a-f]{8}", info["name"])
    cookie = first.headers["set-cookie"]
    assert f"{GUEST_COOKIE}={info['name']}" in cookie and "HttpOnly" in cookie
    assert first.headers["cache-control"] == "no-store"
    second = client.get("/chat/user")
    assert second.json()["name"] == info["name"]
    assert "set-cookie" not in second.headers


def test_a_forged_guest_cookie_is_replaced(client: TestClient) -> None:
    client.cookies.set(GUEST_COOKIE, "<img src=x onerror=alert(1)>")
    info = client.get("/chat/user").json()
    assert re.fullmatch(r"guest-[0-9a-f]{8}", info["name"])


def test_anonymous_login_is_not_a_thing(client: TestClient) -> None:
    response = client.post("/chat/login", data={"login": "alice", "passcode": "x"})
    assert response.status_code == 400


def test_users_mode_checks_login_and_passcode_and_mints_no_token(database: str) -> None:
    with _client(database, auth="users", users=("alice:wonderland", "bob:builder")) as client:
        response = client.get("/chat/user")
        assert response.status_code == 401
        assert response.json()["auth"] == "users"
        bad = client.post("/chat/login", data={"login": "alice", "passcode": "nope"})
        assert bad.status_code == 401 and "set-cookie" not in bad.headers
        missing = client.post("/chat/login", data={"login": "alice"})
        assert missing.status_code == 400
        good = client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"})
        assert good.status_code == 200
        assert good.json() == {"name": "alice", "token": "", "auth": "users"}
        # No token for CONNECT, but the HttpOnly session cookie the REST routes need (issue 10).
        assert "chat_session=" in good.headers["set-cookie"] and "HttpOnly" in good.headers["set-cookie"]


def test_overlong_login_fields_are_refused_before_checking(database: str) -> None:
    at_limit, over = "a" * MAX_LOGIN_CHARS, "b" * (MAX_LOGIN_CHARS + 1)
    long_pass = "p" * (MAX_LOGIN_CHARS + 1)
    with _client(database, auth="users", users=(f"{at_limit}:pw", f"{over}:pw", f"carol:{long_pass}")) as client:
        assert client.post("/chat/login", data={"login": at_limit, "passcode": "pw"}).status_code == 200
        assert client.post("/chat/login", data={"login": over, "passcode": "pw"}).status_code == 401
        assert client.post("/chat/login", data={"login": "carol", "passcode": long_pass}).status_code == 401


def test_login_from_another_site_is_refused(database: str) -> None:
    with _client(database, auth="users", users=("alice:wonderland",)) as client:
        response = client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"},
                               headers={"Origin": "http://evil.example"})
        assert response.status_code == 403
        same = client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"},
                           headers={"Origin": f"http://{ORIGIN_HOST}"})
        assert same.status_code == 200


def test_jwt_mode_mints_a_token_only_after_a_good_login(database: str) -> None:
    key = key_from_secret(SECRET)
    with _client(database, auth="jwt", jwt_secret=SECRET, users=("alice:wonderland",)) as client:
        anonymous = client.get("/chat/user")
        assert anonymous.status_code == 401 and anonymous.json()["auth"] == "jwt"
        assert "token" not in anonymous.json()
        bad = client.post("/chat/login", data={"login": "alice", "passcode": "wrong"})
        assert bad.status_code == 401 and "set-cookie" not in bad.headers
        assert "token" not in bad.json()
        assert client.post("/chat/login", data={"login": "mallory", "passcode": "wonderland"}).status_code == 401

        good = client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"})
        assert good.status_code == 200
        info = good.json()
        assert info["name"] == "alice" and info["auth"] == "jwt"
        assert user_from_token(info["token"], key) == "alice"
        claims = jwt.decode(info["token"], key, algorithms=["HS256"])
        assert claims["exp"] - claims["iat"] == 3600
        cookie = good.headers["set-cookie"]
        assert f"{SESSION_COOKIE}=" in cookie and "HttpOnly" in cookie and "Path=/chat" in cookie
        assert "samesite=strict" in cookie.lower()

        again = client.get("/chat/user")
        assert again.status_code == 200
        assert again.json()["name"] == "alice"
        assert user_from_token(again.json()["token"], key) == "alice"

        logout = client.post("/chat/logout")
        assert logout.status_code == 204
        assert client.get("/chat/user").status_code == 401


@pytest.mark.parametrize("cookie", [
    "not-a-jwt",
    mint_token("alice", key_from_secret(SECRET), ttl_s=-10),                       # expired
    mint_token("alice", key_from_secret("b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldA==")),   # another key
    jwt.encode({"jti": "alice", "exp": 2**40}, key_from_secret(SECRET), algorithm="HS512"),  # not HS256
    jwt.encode({"jti": "alice"}, key_from_secret(SECRET), algorithm="HS256"),      # no exp
])
def test_jwt_mode_refuses_bad_session_cookies(database: str, cookie: str) -> None:
    with _client(database, auth="jwt", jwt_secret=SECRET, users=("alice:wonderland",)) as client:
        client.cookies.set(SESSION_COOKIE, cookie, path="/chat")
        response = client.get("/chat/user")
        assert response.status_code == 401
        assert "token" not in response.json()


def test_jwt_mode_without_users_has_no_login(database: str) -> None:
    with _client(database, auth="jwt", jwt_secret=SECRET) as client:
        response = client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"})
        assert response.status_code == 403
        assert "users" in response.json()["error"]


def _stomp_connect(client: TestClient, headers: dict[str, str]) -> str:
    lines = ["CONNECT", "accept-version:1.2", "host:testserver"]
    lines += [f"{k}:{v}" for k, v in headers.items()]
    with client.websocket_connect("/ws-stomp/websocket") as ws:
        ws.send_text("\n".join(lines) + "\n\n\x00")
        reply: str = ws.receive_text()
    return reply


def test_the_token_from_login_connects_over_stomp(database: str) -> None:
    with _client(database, auth="jwt", jwt_secret=SECRET, users=("alice:wonderland",)) as client:
        token = client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"}).json()["token"]
        reply = _stomp_connect(client, {"token": token})
        assert reply.startswith("CONNECTED\n")
        assert "\nuser-name:alice\n" in reply
        refused = _stomp_connect(client, {"token": token[:-4] + "AAAA"})
        assert refused.startswith("ERROR\n")


def test_users_mode_credentials_from_the_login_form_connect_over_stomp(database: str) -> None:
    with _client(database, auth="users", users=("alice:wonderland",)) as client:
        assert client.post("/chat/login", data={"login": "alice", "passcode": "wonderland"}).status_code == 200
        reply = _stomp_connect(client, {"login": "alice", "passcode": "wonderland"})
        assert reply.startswith("CONNECTED\n") and "\nuser-name:alice\n" in reply


def test_anonymous_guest_name_becomes_the_stomp_user(client: TestClient) -> None:
    name = client.get("/chat/user").json()["name"]
    reply = _stomp_connect(client, {"login": name})
    assert f"\nuser-name:{name}\n" in reply



def test_readme_shows_the_committed_room_screenshot() -> None:
    readme = (REPO / "README.md").read_text()
    assert "](docs/screenshot-room.png)" in readme
    assert "deploy/local-cluster start" in readme
    png = (REPO / "docs" / "screenshot-room.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
