"""``chat-gateway serve --workers 2`` drains like one worker: a real supervisor, real workers, a real Redis.

Clients land on both workers (each STOMP session id starts with its worker's pid in hex, and the
workers' pids are the supervisor's children). After SIGTERM to the supervisor every client gets the
"Server shutting down, reconnect" ERROR and a close 1012, every SEND that got its RECEIPT is stored
exactly once (and nothing is stored twice), the supervisor exits 0, and the workers' Prometheus
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR`` in their environment) is removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.gateway_process import GatewayProcess
from tests.support.polling import eventually_sync
from tests.support.redis_server import RedisServer
from tests.support.stomp_wire import WsStompClient

pytestmark = [pytest.mark.redis, pytest.mark.cluster, pytest.mark.timeout(300)]

ROOM_PREFIX = "/sub/chat/room/"
SHUTDOWN_ERROR = "Server shutting down, reconnect"
MAX_CLIENTS = 48          # opened until each worker holds MIN_PER_WORKER sessions
MIN_PER_WORKER = 2
RECEIPTED_SENDS = 4       # per client, each awaited
PIPELINED_SENDS = 6       # per client, in flight when SIGTERM arrives


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def worker_pids(supervisor: int) -> set[int] | None:
    """The supervisor's worker processes (multiprocessing's resource tracker is a child too), once
    there are two."""
    found = set()
    for part in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        try:
            command = Path(f"/proc/{part}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            found.add(int(part))
    return found if len(found) == 2 else None


def is_dir(path: Path) -> bool:
    return path.is_dir()


def log_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    out = []
    for line in gateway.log_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def worker_of(session_id: str, workers: set[int]) -> int:
    owners = [pid for pid in workers if session_id.startswith(f"{pid:x}")]
    assert len(owners) == 1, (session_id, workers)
    return owners[0]


def chat(room: str, text: str) -> str:
    return json.dumps({"type": "TALK", "roomId": room, "message": text})


async def read_until_closed(client: WsStompClient) -> tuple[list[Any], int | None]:
    """Every frame the server sends until it closes, and the close code."""
    frames = []
    while True:
        try:
            frames.append(await client.next_frame(timeout=60))
        except ConnectionClosed as exc:
            received = exc.rcvd
            return frames, received.code if received is not None else None


async def await_receipt(client: WsStompClient, receipt: str) -> None:
    """Read (and keep) frames until the RECEIPT ``receipt``."""
    while True:
        got = await client.next_frame(timeout=60)
        assert got.command != "ERROR", got
        if got.command == "RECEIPT" and got.get("receipt-id") == receipt:
            return


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


async def test_sigterm_to_the_supervisor_drains_every_worker(redis: RedisServer, tmp_path: Path) -> None:
    gateway = GatewayProcess({"redis_url": redis.url, "workers": 2, "log_format": "json",
                              "heartbeat_receive_ms": 0, "drain_timeout_s": 10, "send_rate_per_s": 0},
                             workdir=tmp_path)
    clients: list[WsStompClient] = []
    try:
        gateway.start(60)
        supervisor = gateway.pid or 0
        workers = eventually_sync(lambda: worker_pids(supervisor), "the supervisor's two workers", timeout_s=60)
        # Both workers serve (each logs uvicorn's startup line with its pid).
        eventually_sync(lambda: workers <= {line["pid"] for line in log_lines(gateway)
                                            if line.get("event") == "Application startup complete."},
                        "both workers started", timeout_s=60)
        # Prometheus multiprocess mode: one private directory, set before the workers started.
        metrics_dirs = {environ_of(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in workers}
        assert len(metrics_dirs) == 1 and None not in metrics_dirs, metrics_dirs
        metrics_dir = Path(str(metrics_dirs.pop()))
        assert is_dir(metrics_dir)

        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            response = await http.post("/chat/room", data={"name": "drain"})
            response.raise_for_status()
            room = str(response.json()["roomId"])

        per_worker: Counter[int] = Counter()

        async def open_client(index: int) -> WsStompClient:
            client = await WsStompClient.open(gateway.ws_url)
            connected = await client.connect({"accept-version": "1.2", "host": "x", "login": f"user{index}"})
            per_worker[worker_of(connected.get("session") or "", workers)] += 1
            await client.subscribe(ROOM_PREFIX + room, "s0")
            return client

        # Concurrent opens, so that a busy worker leaves some accepts to the other one.
        while min(per_worker[pid] for pid in workers) < MIN_PER_WORKER:
            assert len(clients) < MAX_CLIENTS, f"the sessions all landed on one worker: {per_worker}"
            clients += await asyncio.gather(*(open_client(len(clients) + i) for i in range(4)))

        def send(index: int, n: int) -> Any:
            return clients[index].send_frame(
                "SEND", {"destination": "/pub/chat/message", "receipt": f"r-{index}-{n}"},
                chat(room, f"c{index}-m{n}"))

        # SENDs whose RECEIPTs are awaited, then more SENDs still in flight when SIGTERM arrives.
        for index, client in enumerate(clients):
            for n in range(RECEIPTED_SENDS):
                await send(index, n)
                await await_receipt(client, f"r-{index}-{n}")
        for index in range(len(clients)):
            for n in range(RECEIPTED_SENDS, RECEIPTED_SENDS + PIPELINED_SENDS):
                await send(index, n)

        gateway.signal(signal.SIGTERM)
        closes = await asyncio.gather(*(read_until_closed(client) for client in clients))
        assert gateway.process is not None
        code = await asyncio.to_thread(gateway.process.wait, 120)
        assert code == 0, gateway.log_text()[-5000:]
    finally:
        for client in clients:
            await client.close()
        gateway.stop()

    receipted: set[str] = set()
    for index, (client, (_, close_code)) in enumerate(zip(clients, closes, strict=True)):
        frames = client.frames
        errors = [f for f in frames if f.command == "ERROR"]
        assert [f.get("message") for f in errors] == [SHUTDOWN_ERROR], (index, errors)
        assert frames[-1].command == "ERROR", f"client {index}: frames after the shutdown ERROR: {frames[-3:]}"
        assert close_code == 1012, (index, close_code)
        for frame in frames:
            receipt = frame.get("receipt-id")
            if frame.command == "RECEIPT" and receipt is not None and receipt.startswith("r-"):
                _, client_index, n = receipt.split("-")
                receipted.add(f"c{client_index}-m{n}")
    assert len(receipted) >= len(clients) * RECEIPTED_SENDS

    with sqlite3.connect(tmp_path / "gateway.db") as db:
        stored = Counter(text for (text,) in db.execute("SELECT message FROM messages WHERE type = 'TALK'"))
    assert not [text for text, count in stored.items() if count > 1], "a message stored twice"
    missing = receipted - set(stored)
    assert not missing, f"RECEIPTed SENDs not stored: {sorted(missing)}"

    # Both workers drained their sessions: their close lines carry the shutdown reason and their pid.
    closed = [line for line in log_lines(gateway) if line.get("event") == "session closed"]
    assert {line["pid"] for line in closed if line["close_reason"] == "Server shutting down"} == workers
    assert not is_dir(metrics_dir), "the private metrics directory outlived the supervisor"


def test_an_operators_metrics_dir_is_wiped_of_old_files_and_kept(tmp_path: Path) -> None:
    from gateway.settings import load_settings
    from gateway.workers import metrics_directory

    (tmp_path / "counter_123.db").write_bytes(b"old run")
    (tmp_path / "notes.txt").write_text("not ours")
    settings = load_settings(environ={}, metrics_dir=str(tmp_path))
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    with metrics_directory(settings) as path:
        assert path == tmp_path
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert tmp_path.is_dir()
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == before


def test_a_worker_that_dies_is_replaced_and_the_supervisor_still_exits_0(redis: RedisServer, tmp_path: Path) -> None:
    gateway = GatewayProcess({"redis_url": redis.url, "workers": 2, "log_format": "json"}, workdir=tmp_path)
    try:
        gateway.start(60)
        supervisor = gateway.pid or 0
        first = eventually_sync(lambda: worker_pids(supervisor), "the supervisor's two workers", timeout_s=60)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        replaced = eventually_sync(lambda: (pids := worker_pids(supervisor)) and victim not in pids and pids,
                                   "a new worker in the killed one's place", timeout_s=60)
        assert len(replaced) == 2 and max(first) in replaced
        eventually_sync(lambda: any(line.get("event") == "Application startup complete." and line["pid"] in
                                    replaced - first for line in log_lines(gateway)),
                        "the new worker serving", timeout_s=60)
        assert gateway.stop(120) == 0, gateway.log_text()[-5000:]
    finally:
        gateway.cleanup()
    died = [line for line in log_lines(gateway) if line.get("worker_pid") == victim and "exit_code" in line]
    assert [line["exit_code"] for line in died] == [-signal.SIGKILL]


def test_a_worker_that_cannot_start_stops_the_supervisor_with_status_1(redis: RedisServer, tmp_path: Path) -> None:
    # An empty database (no `chat-gateway migrate`): every worker's startup fails the schema check.
    gateway = GatewayProcess({"redis_url": redis.url, "workers": 2, "log_format": "json",
                              "database_url": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"}, workdir=tmp_path)
    try:
        gateway.start(wait=False)
        assert gateway.process is not None
        assert gateway.process.wait(120) == 1, gateway.log_text()[-5000:]
    finally:
        gateway.cleanup()
    assert any(line.get("event", "").endswith("failed to start: stopping") for line in log_lines(gateway))
