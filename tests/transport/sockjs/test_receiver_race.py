"""A receiver arriving right after its client aborted the previous one (sockjs-protocol 0.3.3,
``test_abort_xhr_streaming``/``test_abort_xhr_polling``): it must learn that the abort closed the
session (``c[1002,"Connection interrupted"]``), never ``c[2010,"Another connection still open"]``,
which is only for a receiver that is genuinely still open.

The race: the client closes the old request's connection and at once sends the new request; the new
request can reach the application before the server's event loop has processed the old connection's
close, while the old receiver still looks attached. Here real raw-socket clients in several threads
run the abort-then-reconnect sequence many times against uvicorn serving in its own thread, with CPU
burners in the background, so the two events keep arriving together. No timing assertions: the
deadlines below are only there so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from gateway.transport.sockjs.registry import SessionRegistry
from gateway.transport.sockjs.session import Receiver, SockJSSession
from tests.support.polling import eventually_sync
from tests.transport.sockjs.conftest import (
    FakeFactory,
    ThreadedServer,
    make_settings,
    threaded_services,
)

SEQUENCES = 50      # abort-then-reconnect sequences per transport
WORKERS = 6         # client threads running them concurrently
IO_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Transport:
    path: str            # after /<server>/<session>/
    method: str
    open_frame: bytes    # how "o" looks in this transport's format


TRANSPORTS = {
    "xhr_streaming": Transport("xhr_streaming", "POST", b"o\n"),
    "xhr": Transport("xhr", "POST", b"o\n"),
    "eventsource": Transport("eventsource", "GET", b"data: o\r\n"),
    "htmlfile": Transport("htmlfile?c=cb", "GET", b'p("o");'),
}


@contextlib.contextmanager
def cpu_burners() -> Iterator[None]:
    """One busy-looping process per CPU (at most 4) for the duration, killed by their handles afterwards."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(min(os.cpu_count() or 2, 4))]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def _request(port: int, method: str, path: str, *, close: bool = False) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
    connection = "Connection: close\r\n" if close else ""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n{connection}\r\n"
                 .encode())
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection ended before {marker!r}; got {data[-200:]!r}")
        data += chunk
    return data


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _wait(predicate: Callable[[], bool], what: str) -> None:
    # A short interval: the race this file provokes needs the next step right after the condition.
    eventually_sync(predicate, what, timeout_s=IO_TIMEOUT_S, interval_s=0.001)


def abort_then_reconnect(server: ThreadedServer, registry: SessionRegistry, transport: Transport) -> bytes:
    """Open a session, abort its attached receiver, send the next receiver at once; its response."""
    session_id = str(uuid.uuid4())
    url = f"/echo/000/{session_id}/"
    if transport.path == "xhr":
        with _request(server.port, "POST", url + "xhr", close=True) as first:
            assert transport.open_frame in _read_to_eof(first)
        old = _request(server.port, "POST", url + "xhr")
        # Read from the test thread: only to know the poll is attached before aborting it.
        _wait(lambda: (session := registry.get(session_id)) is not None and session.has_receiver,
              "the poll to attach")
    else:
        old = _request(server.port, transport.method, url + transport.path)
        _read_until(old, transport.open_frame)
    old.close()  # the client aborts the receiver...
    with _request(server.port, transport.method, url + transport.path, close=True) as new:  # ...and goes on
        return _read_to_eof(new)


def outcome(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return f"HTTP {head[:40]!r}"
    if b"2010" in body and b"Another connection still open" in body:
        return "2010"
    if b"1002" in body and b"Connection interrupted" in body:
        return "1002"
    return f"other {body[-120:]!r}"


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_receiver_right_after_an_aborted_one_gets_1002_never_2010(name: str) -> None:
    transport = TRANSPORTS[name]
    with threaded_services() as (server, services), cpu_burners():
        registry = services.echo.registry
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            responses = list(pool.map(lambda _: abort_then_reconnect(server, registry, transport),
                                      range(SEQUENCES)))
        outcomes = collections.Counter(outcome(response) for response in responses)
        assert outcomes == {"1002": SEQUENCES}, outcomes
        connections = services.echo.factory.connections
        assert len(connections) == SEQUENCES  # the reconnects found their session, none started a new one
        _wait(lambda: all(c.lost_calls == 1 for c in connections), "connection_lost of every session")


# --- the same rule at session level ---------------------------------------------------------------------


async def _session_with_attached_receiver() -> tuple[SessionRegistry, SockJSSession, Receiver]:
    registry = SessionRegistry(make_settings(), FakeFactory())
    session = await registry.get_or_create("s1", transport="xhr_streaming", remote="test")
    old = session.attach()
    assert isinstance(old, Receiver)
    assert await session.next_frame(old, 1.0) == "o"
    return registry, session, old


async def test_newcomer_waits_and_learns_the_attached_receiver_was_aborted() -> None:
    registry, session, old = await _session_with_attached_receiver()
    newcomer = asyncio.ensure_future(session.attach_when_free(30.0))
    await asyncio.sleep(0)
    assert not newcomer.done()
    await session.receiver_lost(old)  # the old request's disconnect is processed only now
    new = await newcomer
    assert isinstance(new, Receiver)
    assert await session.next_frame(new, 1.0) == 'c[1002,"Connection interrupted"]'
    session.detach(new)
    await registry.close_all()


async def test_newcomer_takes_over_from_a_receiver_that_ends_normally() -> None:
    registry, session, old = await _session_with_attached_receiver()
    newcomer = asyncio.ensure_future(session.attach_when_free(30.0))
    await asyncio.sleep(0)
    session.detach(old)  # e.g. a poll that just delivered its frame
    new = await newcomer
    assert isinstance(new, Receiver) and session.has_receiver and not session.closed
    await session.send(b"x")
    assert await session.next_frame(new, 1.0) == 'a["x"]'
    session.detach(new)
    await registry.close_all()


async def test_newcomer_gets_2010_while_the_attached_receiver_stays_open() -> None:
    registry, session, old = await _session_with_attached_receiver()
    assert await session.attach_when_free(0.05) == 'c[2010,"Another connection still open"]'
    assert not session.closed
    await session.send(b"x")
    assert await session.next_frame(old, 1.0) == 'a["x"]'  # the first receiver keeps the session
    session.detach(old)
    await registry.close_all()
