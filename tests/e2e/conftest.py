"""Fixtures for the browser tests: the local cluster behind real nginx, and Debian's Chromium.

- ``cluster``: :class:`deploy.local_cluster.LocalCluster` with 2 gateway nodes, one redis-server and
  one SQLite database, started once for the module (restarted nodes are the tests' business).
- ``browser``: Playwright (from PyPI) driving ``/usr/bin/chromium`` headless. Never a downloaded
  browser: ``playwright install`` is not used anywhere.
- :class:`ChatPage` wraps one tab on the chat page with the few actions and reads the tests need.

Missing Playwright/chromium/nginx/redis-server skip these tests on a developer machine and fail them
in CI (``make test`` installs all four; :func:`tests.support.ci.skip_or_fail`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from deploy.local_cluster import ClusterError, LocalCluster, find_executable
from tests.support.ci import skip_or_fail
from tests.support.polling import eventually_sync

# A missing Playwright must not silently skip the whole browser suite (as a module-level
# importorskip would): the ``playwright`` fixture, which every browser test uses, skips or fails.
PLAYWRIGHT_MISSING: str | None = None
try:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright
    from playwright.sync_api import Error as PlaywrightError
except ImportError as exc:
    PLAYWRIGHT_MISSING = f"Playwright is not installed ({exc}); pip install -e '.[test]'"

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_S = 20.0


def _missing(what: str) -> None:
    skip_or_fail(what, tests="the browser tests")


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S, interval_s: float = 0.1) -> Any:
    """:func:`~tests.support.polling.eventually_sync` with the browser tests' defaults: a longer
    deadline, and a 0.1 s interval since every poll is a round trip to Chromium."""
    return eventually_sync(predicate, what, timeout_s=timeout_s, interval_s=interval_s)


# Module scope, not session: sync Playwright runs an asyncio loop in this thread while it is alive,
# which would break later tests that need no running loop (or start their own).
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if PLAYWRIGHT_MISSING is not None:
        _missing(PLAYWRIGHT_MISSING)
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    for tool in ("nginx", "redis-server"):
        try:
            find_executable(tool)
        except ClusterError as exc:
            _missing(str(exc))
    # presence_ttl_s short so that counts heal quickly after a node is killed.
    cluster = LocalCluster(nodes_count=2, gateway_args=["--presence-ttl-s", "6", "--log-level", "info"],
                           inherit_gateway_env=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def cluster_with(gateway_args: list[str]) -> Iterator[LocalCluster]:
    """Like the ``cluster`` fixture, with extra ``chat-gateway serve`` flags for both nodes (for a
    module that needs other settings, e.g. a small ``--resume-max-messages``)."""
    for tool in ("nginx", "redis-server"):
        try:
            find_executable(tool)
        except ClusterError as exc:
            _missing(str(exc))
    cluster = LocalCluster(nodes_count=2, gateway_args=["--presence-ttl-s", "6", "--log-level", "info",
                                                        *gateway_args], inherit_gateway_env=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def contexts(browser: Browser) -> Iterator[Callable[..., BrowserContext]]:
    """Make isolated browser contexts (separate cookies: separate guests); closed after the test."""
    made: list[BrowserContext] = []

    def make(**kwargs: Any) -> BrowserContext:
        kwargs.setdefault("viewport", {"width": 1000, "height": 720})
        context = browser.new_context(**kwargs)
        context.set_default_timeout(TIMEOUT_S * 1000)
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()


# --- cluster state ---------------------------------------------------------------------------------

def presence(cluster: LocalCluster, room_id: str) -> dict[str, int]:
    """Each node's own session count in the room, as the nodes store it in Redis."""
    assert cluster.redis_url is not None
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        counts = {}
        for node in cluster.nodes:
            value = client.hget(f"{{gateway:presence}}:{node.node_id}", room_id)
            counts[node.node_id] = int(value) if value is not None else 0
        return counts
    finally:
        client.close()


def db_messages(cluster: LocalCluster, room_id: str) -> list[tuple[int, str, str, str]]:
    """(seq, type, sender, message) rows of a room, straight from the SQLite file."""
    assert cluster.database_url is not None
    path = cluster.database_url.split(":///", 1)[1]
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, type, sender, message FROM messages WHERE room_id = ? ORDER BY seq",
                          (room_id,)).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


# --- the page ------------------------------------------------------------------------------------

@dataclass
class ChatPage:
    page: Page
    dialogs: list[str]

    @classmethod
    def open(cls, context: BrowserContext, url: str) -> ChatPage:
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(url)
        return cls(page, dialogs)

    @property
    def state(self) -> str:
        """The page's ``data-state``; "navigating" while a reload replaces the document."""
        try:
            return str(self.page.evaluate("document.body ? document.body.dataset.state : 'navigating'"))
        except PlaywrightError as exc:
            if "context was destroyed" in str(exc) or "navigat" in str(exc):
                return "navigating"
            raise

    def wait_state(self, state: str, timeout_s: float = TIMEOUT_S) -> None:
        wait_for(lambda: self.state == state, f"page state {state!r}", timeout_s)

    @property
    def me(self) -> str:
        return str(self.page.locator("#whoami").text_content() or "")

    def user_count(self) -> str:
        return str(self.page.locator("#user-count").text_content())

    def send(self, text: str) -> None:
        self.page.locator("#text").fill(text)
        self.page.locator("#composer button[type=submit]").click()

    def messages(self) -> list[dict[str, Any]]:
        """What the page shows, in DOM order: seq, kind, sender and text of every message."""
        result: list[dict[str, Any]] = self.page.evaluate(
            """() => Array.from(document.querySelectorAll('#messages > li')).map((li) => ({
                 seq: li.dataset.seq === undefined ? null : Number(li.dataset.seq),
                 kind: li.classList.contains('notice') ? 'notice' : 'talk',
                 sender: li.querySelector('.sender') ? li.querySelector('.sender').textContent : null,
                 text: li.querySelector('.text').textContent,
               }))""")
        return result

    def texts(self) -> list[str]:
        return [m["text"] for m in self.messages() if m["kind"] == "talk"]

    def pending(self) -> int:
        return int(self.page.locator("#outbox > li").count())

    def wait_texts(self, expected: list[str], timeout_s: float = TIMEOUT_S) -> None:
        """Wait until every text in ``expected`` is shown (then the caller checks exactly-once)."""
        wait_for(lambda: all(t in self.texts() for t in expected), f"messages {expected!r}", timeout_s)



# --- the page's STOMP traffic ----------------------------------------------------------------------

@dataclass
class StompFrame:
    direction: str              # "sent" (page -> server) or "received"
    command: str
    headers: dict[str, str]


def _unescape(value: str) -> str:
    """STOMP 1.1/1.2 header unescaping (\\c, \\n, \\r, \\\\)."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append({"c": ":", "n": "\n", "r": "\r", "\\": "\\"}.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _stomp_frames(payload: str | bytes) -> list[tuple[str, dict[str, str]]]:
    """STOMP frames in one WebSocket message: raw (``/ws-stomp/websocket``) or SockJS-framed
    (``["..."]`` sent, ``a["..."]`` received; ``o``/``h``/``c[...]`` carry no STOMP)."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    if text.startswith("a["):
        chunks = json.loads(text[1:])
    elif text.startswith("["):
        chunks = json.loads(text)
    elif text[:1] in ("o", "h", "c"):
        return []
    else:
        chunks = [text]
    frames = []
    for chunk in chunks:
        for raw in str(chunk).split("\x00"):
            raw = raw.lstrip("\r\n")
            if not raw:
                continue
            head = raw.split("\n\n", 1)[0].split("\n")
            headers: dict[str, str] = {}
            for line in head[1:]:
                key, _, value = line.rstrip("\r").partition(":")
                headers.setdefault(_unescape(key), _unescape(value))   # STOMP: the first occurrence wins
            frames.append((head[0].rstrip("\r"), headers))
    return frames


class StompRecorder:
    """Every STOMP frame a page sends and receives over WebSockets opened after :meth:`attach`
    (through Playwright's ``websocket`` framesent/framereceived events)."""

    def __init__(self) -> None:
        self.frames: list[StompFrame] = []

    def attach(self, page: Page) -> StompRecorder:
        page.on("websocket", self._socket)
        return self

    def _socket(self, socket: Any) -> None:
        socket.on("framesent", lambda payload: self._record("sent", payload))
        socket.on("framereceived", lambda payload: self._record("received", payload))

    def _record(self, direction: str, payload: str | bytes) -> None:
        self.frames.extend(StompFrame(direction, command, headers) for command, headers in _stomp_frames(payload))

    def sent(self, command: str) -> list[StompFrame]:
        return [f for f in self.frames if f.direction == "sent" and f.command == command]

    def received(self, command: str) -> list[StompFrame]:
        return [f for f in self.frames if f.direction == "received" and f.command == command]
