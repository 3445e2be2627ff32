"""The SockJS URLs that are not session traffic: greeting, /info, iframe page, script, 404s and 405s.

Driven through Starlette's TestClient against the inline app of conftest (echo, close and
disabled-websocket services).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from gateway.transport.sockjs import create_sockjs_routes
from gateway.transport.sockjs.assets import sockjs_script_file
from tests.transport.sockjs.conftest import FakeFactory, build_services, make_settings

NOT_CACHED = "no-store, no-cache, must-revalidate, max-age=0"
IFRAME_BODY = re.compile(r"""^<!DOCTYPE html>
<html>
<head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
  <script src="(?P<url>[^"]*)"></script>
  <script>
    document.domain = document.domain;
    SockJS.bootstrap_iframe\(\);
  </script>
</head>
<body>
  <h2>Don't panic!</h2>
  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>
</body>
</html>$""")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(build_services().app) as test_client:
        yield test_client


def _client_for(**settings: Any) -> TestClient:
    factory = FakeFactory()
    app = Starlette(routes=[Mount("/ws-stomp", routes=create_sockjs_routes(make_settings(**settings), factory))])
    return TestClient(app)


# --- greeting -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/echo", "/echo/"])
def test_greeting(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain;charset=UTF-8"
    assert response.content == b"Welcome to SockJS!\n"
    assert "set-cookie" not in response.headers


def test_greeting_only_answers_get(client: TestClient) -> None:
    response = client.post("/echo/")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"


@pytest.mark.parametrize("suffix", ["/a", "/a.html", "//", "///", "/a/a", "/a/a/", "/a/", "/a/b/c/d",
                                    "/websocket", "/info/x", "/sockjs.min.js/x"])
def test_other_urls_are_404(client: TestClient, suffix: str) -> None:
    assert client.get("/echo" + suffix).status_code == 404


# --- /info --------------------------------------------------------------------------------------------


def test_info(client: TestClient) -> None:
    response = client.get("/echo/info", headers={"Origin": "http://test.example"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json;charset=UTF-8"
    assert response.headers["cache-control"] == NOT_CACHED
    assert "expires" not in response.headers and "last-modified" not in response.headers
    assert "set-cookie" not in response.headers
    assert response.headers["access-control-allow-origin"] == "http://test.example"
    assert response.headers["access-control-allow-credentials"] == "true"
    data = response.json()
    assert list(data) == ["entropy", "origins", "cookie_needed", "websocket"]
    assert data["origins"] == ["*:*"]
    assert data["cookie_needed"] is True
    assert data["websocket"] is True
    assert isinstance(data["entropy"], int) and 0 <= data["entropy"] < 2**32


def test_info_without_origin_allows_any_origin_without_credentials(client: TestClient) -> None:
    response = client.get("/echo/info")
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


def test_info_entropy_changes(client: TestClient) -> None:
    values = {client.get("/echo/info").json()["entropy"] for _ in range(5)}
    assert len(values) > 1


def test_info_reports_disabled_websocket(client: TestClient) -> None:
    assert client.get("/disabled_websocket_echo/info").json()["websocket"] is False


@pytest.mark.parametrize("origin", ["http://test.example", "null"])
def test_info_preflight(client: TestClient, origin: str) -> None:
    response = client.options("/echo/info", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    assert response.status_code == 204
    assert response.content == b""
    assert "public" in response.headers["cache-control"]
    assert re.search(r"max-age=[1-9][0-9]{6}", response.headers["cache-control"])
    assert response.headers["expires"]
    assert int(response.headers["access-control-max-age"]) > 1000000
    methods = response.headers["access-control-allow-methods"]
    assert "OPTIONS" in methods and "GET" in methods
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["access-control-allow-credentials"] == "true"


def test_info_wrong_method(client: TestClient) -> None:
    response = client.post("/echo/info")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, OPTIONS"


# --- iframe page and script ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["/iframe.html", "/iframe-a.html", "/iframe-.html", "/iframe-0.1.2.html",
                                    "/iframe-0.1.2abc-dirty.2144.html", "/iframe-a.html?t=1234",
                                    "/iframe-1.6.1.html?t=qweqweq123"])
def test_iframe_page(client: TestClient, suffix: str) -> None:
    response = client.get("/echo" + suffix)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html;charset=UTF-8"
    assert "public" in response.headers["cache-control"]
    assert re.search(r"max-age=[1-9][0-9]{6}", response.headers["cache-control"])
    assert response.headers["expires"]
    assert response.headers["etag"]
    assert "last-modified" not in response.headers
    assert "set-cookie" not in response.headers
    match = IFRAME_BODY.match(response.text.strip())
    assert match, response.text
    assert match.group("url") == "/echo/sockjs.min.js"


def test_iframe_script_is_our_copy_of_sockjs_client(client: TestClient) -> None:
    page = client.get("/echo/iframe.html").text
    url = IFRAME_BODY.match(page.strip()).group("url")  # type: ignore[union-attr]
    assert not url.startswith("http")
    script = client.get(url)
    assert script.status_code == 200
    assert script.headers["content-type"] == "application/javascript;charset=UTF-8"
    assert script.content == sockjs_script_file(make_settings()).read_bytes()
    assert b"bootstrap_iframe" in script.content
    assert "public" in script.headers["cache-control"]
    again = client.get(url, headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""


@pytest.mark.parametrize("suffix", ["/iframe.htm", "/iframe", "/IFRAME.HTML", "/IFRAME", "/iframe.HTML",
                                    "/iframe.xml", "/iframe-/.html", "/iframe-a.html/", "/xiframe.html"])
def test_iframe_malformed_urls_are_404(client: TestClient, suffix: str) -> None:
    assert client.get("/echo" + suffix).status_code == 404


def test_iframe_is_cacheable_by_etag(client: TestClient) -> None:
    first = client.get("/echo/iframe.html")
    second = client.get("/echo/iframe.html")
    assert first.headers["etag"] and first.headers["etag"] == second.headers["etag"]
    cached = client.get("/echo/iframe.html", headers={"If-None-Match": first.headers["etag"]})
    assert cached.status_code == 304
    assert "content-type" not in cached.headers
    assert cached.content == b""
    stale = client.get("/echo/iframe.html", headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200


def test_iframe_follows_the_mount_prefix() -> None:
    with _client_for() as client:
        page = client.get("/ws-stomp/iframe-1.6.1.html")
        assert IFRAME_BODY.match(page.text.strip()).group("url") == "/ws-stomp/sockjs.min.js"  # type: ignore[union-attr]
        assert client.get("/ws-stomp/sockjs.min.js").status_code == 200


def test_iframe_frame_options_follow_origin_policy() -> None:
    with _client_for(allowed_origins=()) as client:
        assert client.get("/ws-stomp/iframe.html").headers["x-frame-options"] == "SAMEORIGIN"
    with _client_for(allowed_origins=("*",)) as client:
        response = client.get("/ws-stomp/iframe.html")
        assert response.status_code == 200 and "x-frame-options" not in response.headers
    # With an explicit origin list a framed page would bypass the origin check: not served (as Spring).
    with _client_for(allowed_origins=("http://chat.example",)) as client:
        assert client.get("/ws-stomp/iframe.html").status_code == 404


def test_script_missing_from_node_modules_is_404(tmp_path: Path) -> None:
    with _client_for(node_modules_dir=str(tmp_path)) as client:
        assert client.get("/ws-stomp/sockjs.min.js").status_code == 404


def test_static_pages_only_answer_get(client: TestClient) -> None:
    for path in ("/echo/iframe.html", "/echo/sockjs.min.js"):
        response = client.post(path)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"


# --- session URLs: 404s and 405s ------------------------------------------------------------------------


@pytest.mark.parametrize("session_part", ["//", "/a./a", "/a/a.", "/./.", "/", "///", "/a", "/a/b/c"])
def test_invalid_session_paths_are_404(client: TestClient, session_part: str) -> None:
    for transport in ("xhr", "xhr_send", "xhr_streaming", "eventsource", "htmlfile?c=x", "websocket"):
        url = "/echo" + session_part + "/" + transport
        assert client.get(url).status_code == 404, url
        assert client.post(url).status_code == 404, url


@pytest.mark.parametrize("transport", ["jsonp?c=x", "jsonp_send", "unknown", "XHR", "xhr_poll", ""])
def test_unknown_and_removed_transports_are_404(client: TestClient, transport: str) -> None:
    assert client.get("/echo/000/abc/" + transport).status_code == 404
    assert client.post("/echo/000/abc/" + transport, content=b'd=["x"]').status_code == 404


@pytest.mark.parametrize(("method", "transport", "allow"), [
    ("GET", "xhr", "POST, OPTIONS"), ("GET", "xhr_send", "POST, OPTIONS"),
    ("GET", "xhr_streaming", "POST, OPTIONS"), ("PUT", "xhr", "POST, OPTIONS"),
    ("POST", "eventsource", "GET"), ("POST", "htmlfile", "GET"), ("OPTIONS", "eventsource", "GET"),
    ("POST", "websocket", "GET"), ("DELETE", "websocket", "GET")])
def test_wrong_method_is_405(client: TestClient, method: str, transport: str, allow: str) -> None:
    response = client.request(method, f"/echo/000/abc/{transport}")
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert "content-type" not in response.headers
    assert response.content == b""


@pytest.mark.parametrize("transport", ["xhr", "xhr_send", "xhr_streaming"])
@pytest.mark.parametrize("origin", ["http://test.example", "null"])
def test_xhr_transports_answer_preflight(client: TestClient, transport: str, origin: str) -> None:
    response = client.options(f"/echo/abc/abc/{transport}",
                              headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert response.status_code == 204
    assert response.content == b""
    assert "public" in response.headers["cache-control"]
    assert int(response.headers["access-control-max-age"]) > 1000000
    assert response.headers["expires"]
    methods = response.headers["access-control-allow-methods"]
    assert "OPTIONS" in methods and "POST" in methods
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["access-control-allow-credentials"] == "true"


def test_preflight_echoes_requested_headers(client: TestClient) -> None:
    base = {"Origin": "http://test.example", "Access-Control-Request-Method": "POST"}
    response = client.options("/echo/000/abc/xhr", headers={**base, "Access-Control-Request-Headers": "a, b, c"})
    assert response.headers["access-control-allow-headers"] == "a, b, c"
    response = client.options("/echo/000/abc/xhr", headers={**base, "Access-Control-Request-Headers": ""})
    assert "access-control-allow-headers" not in response.headers
    response = client.options("/echo/000/abc/xhr", headers=base)
    assert "access-control-allow-headers" not in response.headers


def test_websocket_url_without_upgrade_is_400(client: TestClient) -> None:
    response = client.get("/echo/0/0/websocket")
    assert response.status_code == 400
    assert b'Can "Upgrade" only to "WebSocket".' in response.content
    response = client.get("/echo/0/0/websocket", headers={"Upgrade": "WebSocket", "Connection": "close"})
    assert response.status_code == 400


def test_disabled_websocket_transport_is_404(client: TestClient) -> None:
    assert client.get("/disabled_websocket_echo/0/0/websocket").status_code == 404
    assert client.post("/disabled_websocket_echo/0/0/websocket").status_code == 404


# --- htmlfile callback ----------------------------------------------------------------------------------


def test_htmlfile_requires_callback(client: TestClient) -> None:
    for url in ("/echo/a/a/htmlfile", "/echo/a/a/htmlfile?c=", "/echo/a/a/htmlfile?x=y"):
        response = client.get(url)
        assert response.status_code == 500
        assert b'"callback" parameter required' in response.content


@pytest.mark.parametrize("callback", ["%20", "*", "abc(", "abc%28", "a%3Bb", "x%0Ay", "%22"])
def test_htmlfile_rejects_bad_callback(client: TestClient, callback: str) -> None:
    response = client.get("/echo/a/a/htmlfile?c=" + callback)
    assert response.status_code == 500
    assert b'invalid "callback" parameter' in response.content


def test_bad_callback_creates_no_session(client: TestClient) -> None:
    client.get("/echo/a/fresh/htmlfile?c=abc(")
    response = client.post("/echo/a/fresh/xhr_send", content=b'["x"]')
    assert response.status_code == 404


# --- origin policy on HTTP ------------------------------------------------------------------------------


def test_foreign_origin_is_403_on_info_and_transports() -> None:
    with _client_for(allowed_origins=()) as client:
        evil = {"Origin": "http://evil.example"}
        assert client.get("/ws-stomp/info", headers=evil).status_code == 403
        assert client.options("/ws-stomp/info", headers=evil).status_code == 403
        assert client.post("/ws-stomp/0/s1/xhr", headers=evil).status_code == 403
        assert client.options("/ws-stomp/0/s1/xhr", headers=evil).status_code == 403
        assert client.get("/ws-stomp/0/s1/eventsource", headers=evil).status_code == 403
        same = {"Origin": "http://testserver"}
        assert client.get("/ws-stomp/info", headers=same).status_code == 200
        assert client.post("/ws-stomp/0/s1/xhr", headers=same).content == b"o\n"
        assert client.post("/ws-stomp/0/s1/xhr_send", headers=evil, content=b'["x"]').status_code == 403
        assert client.post("/ws-stomp/0/s1/xhr_send", content=b'["x"]').status_code == 204
        assert client.post("/ws-stomp/0/s1/xhr").content == b'a["x"]\n'


def test_listed_origin_is_allowed() -> None:
    with _client_for(allowed_origins=("http://chat.example",)) as client:
        ok = client.get("/ws-stomp/info", headers={"Origin": "http://chat.example"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://chat.example"
        assert client.get("/ws-stomp/info", headers={"Origin": "http://other.example"}).status_code == 403


def test_info_json_is_compact_and_valid(client: TestClient) -> None:
    body = client.get("/echo/info").content
    assert b" " not in body
    assert json.loads(body)["websocket"] is True


def test_connection_start_failure_leaves_no_session() -> None:
    factory = FakeFactory("fail")
    routes = create_sockjs_routes(make_settings(), factory)
    app = Starlette(routes=[Mount("/ws-stomp", routes=routes)])
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/ws-stomp/0/s1/xhr").status_code == 500
        assert len(routes.registry) == 0
        assert client.post("/ws-stomp/0/s1/xhr_send", content=b'["x"]').status_code == 404
    assert [c.started for c in factory.connections] == [1]
