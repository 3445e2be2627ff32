"""The chat page when the server refuses its resume: it falls back to the history (REST) and
subscribes again without ``x-resume-after``, and still shows every message exactly once.

The nodes here keep only 3 messages for a resume (``--resume-max-messages 3``), so a page that was
away while 5 messages were sent is "too far behind". Same deployment as test_chat_page.py (nginx, two
nodes, Redis, SQLite), Debian's Chromium through Playwright; the page's STOMP frames are read from
its WebSocket, what was stored from the database file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import BrowserContext

from deploy.local_cluster import LocalCluster
from tests.e2e.conftest import cluster_with, db_messages, presence, wait_for
from tests.e2e.test_chat_page import EXTRA_QUERY, crash_alices_node

pytestmark = [pytest.mark.browser, pytest.mark.cluster, pytest.mark.redis]

RESUME_MAX = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with cluster_with(["--resume-max-messages", str(RESUME_MAX)]) as made:
        yield made


def test_page_falls_back_to_history_when_its_resume_is_too_old(contexts: Callable[..., BrowserContext],
                                                                cluster: LocalCluster) -> None:
    if EXTRA_QUERY:
        pytest.skip("the outage is staged by blocking SockJS's /info request")
    crash = crash_alices_node(contexts, cluster, "too far behind")
    alice, bob, room_id, bob_node = crash.alice, crash.bob, crash.room_id, crash.bob_node
    stomp, history_requests, shown_before, killed = (crash.stomp, crash.history_requests, crash.shown_before,
                                                     crash.killed)
    try:
        alice.wait_state("reconnecting")
        during = [f"missed {i}" for i in range(RESUME_MAX + 2)]
        for text in during:
            bob.send(text)
        bob.wait_texts(during)
        alice.send("typed while offline")

        alice.page.unroute("**/ws-stomp/info**")
        texts = ["before the crash", *during, "typed while offline"]
        alice.wait_texts(texts, timeout_s=40)
        alice.wait_state("connected", timeout_s=30)
        wait_for(lambda: presence(cluster, room_id)[bob_node] == 2, "alice's new session on bob's node")
        for page in (alice, bob):
            page.wait_texts(texts)
            wait_for(lambda page=page: page.pending() == 0, "the outbox to empty")
        rows = db_messages(cluster, room_id)
        assert Counter(text for _, kind, _, text in rows if kind == "TALK") == Counter(texts)
        wait_for(lambda: len(alice.messages()) == len(rows) and len(bob.messages()) == len(rows),
                 "both pages to show every stored message")
        for page in (alice, bob):
            assert [(m["seq"], m["text"]) for m in page.messages()] == [(seq, text) for seq, _, _, text in rows]

        # First the page tried to resume; the server refused (too far behind) and closed the
        # session; the page loaded the history and its next SUBSCRIBE had no x-resume-after.
        subscribes = stomp.sent("SUBSCRIBE")
        assert len(subscribes) >= 2, subscribes
        assert subscribes[0].headers.get("x-resume-after") == str(shown_before), subscribes[0]
        assert all("x-resume-after" not in s.headers for s in subscribes[1:]), subscribes
        (error,) = stomp.received("ERROR")
        assert f"more than {RESUME_MAX} messages behind" in error.headers.get("message", ""), error
        assert error.headers.get("receipt-id") == subscribes[0].headers["receipt"]
        assert any(f"after={shown_before}&" in url for url in history_requests), history_requests
    finally:
        cluster.start_node(killed)
