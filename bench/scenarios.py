"""The load scenarios: fan-out, many publishers, paced latency, connection rate and the chat path.

Owns the load-generation logic. Every scenario takes an :class:`Endpoint` (where a system under test
is reached: one or more WebSocket URLs, credentials, a destination, the server PIDs whose CPU time is
measured) and returns one flat dict of figures for one run. All loops are bounded by a message or
connection count *and* a deadline; a run that hits its deadline or loses a subscriber reports it in
``failure`` instead of hanging.

Measuring method (the same for both systems):

- every message body carries ``<publisher> <seq> <send time ns>`` (perf_counter, one process, so one
  clock); each subscriber records ``receive time - send time`` for every delivery;
- publishers are closed-loop with a window: a publisher sends message ``seq`` only once message
  ``seq - window`` reached *every* subscriber. This measures the highest rate a system sustains
  without unbounded queues (neither system is asked to buffer more than ``window`` messages per
  subscriber, so the gateway's slow-consumer limit is never what is measured) and the latency at
  that rate (which therefore includes up to ``window`` messages of queueing);
- the paced scenario offers a fixed rate far below saturation: its latency is the latency of a
  lightly loaded system;
- CPU time of the server process(es) over the run comes from /proc, and of the load generator from
  ``time.process_time``: ``server_cpu_us_per_delivery`` does not depend on whether the load
  generator (which shares the 2 cores) was the bottleneck.

Imports only :mod:`bench.wire`, :mod:`bench.stats` and :mod:`bench.procs` (for CPU time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from bench.procs import cpu_seconds, machine_busy_seconds
from bench.stats import latency_summary
from bench.wire import StompClient, message_bodies, send_prefix, send_with, split_frames

T = TypeVar("T")
Result = dict[str, Any]
Decoder = Callable[[str], "tuple[int, int, int] | None"]
BodyMaker = Callable[[int, int, int], str]

STALL_S = 15.0
"""A run in which no message completes for this long is abandoned as stalled."""


@dataclass
class Endpoint:
    """Where one system under test is reached."""

    system: str                    # "gateway" or "rabbitmq"
    urls: Sequence[str]            # one per node; clients are spread over them round-robin
    login: str
    passcode: str
    host: str
    topic_prefix: str              # "/sub/bench/" on the gateway, "/topic/bench." on RabbitMQ
    pids: Sequence[int | None] = field(default_factory=list)
    named_logins: bool = False     # give every client its own login (the gateway's user names)

    def url(self, index: int) -> str:
        return self.urls[index % len(self.urls)]

    def client(self, index: int, login: str | None = None) -> StompClient:
        name = login if login is not None and self.named_logins else self.login
        return StompClient(self.url(index), login=name, passcode=self.passcode,
                           host=self.host)


class CpuMeter:
    """CPU seconds used by the server processes and by this process between start() and stop()."""

    def __init__(self, pids: Sequence[int | None]) -> None:
        self.pids = list(pids)
        self._server0: list[float | None] = []
        self._client0 = 0.0
        self._wall0 = 0.0
        self._machine0 = 0.0

    def start(self) -> None:
        self._server0 = [cpu_seconds(pid) for pid in self.pids]
        self._client0 = time.process_time()
        self._machine0 = machine_busy_seconds()
        self._wall0 = time.perf_counter()

    def stop(self, deliveries: int) -> Result:
        wall = time.perf_counter() - self._wall0
        server = None
        if self.pids:
            total = 0.0
            for pid, before in zip(self.pids, self._server0, strict=True):
                after = cpu_seconds(pid)
                if before is None or after is None:
                    total = float("nan")
                    break
                total += after - before
            server = None if total != total else total
        client = time.process_time() - self._client0
        others = machine_busy_seconds() - self._machine0 - client - (server or 0.0)
        out: Result = {
            "server_cpu_s": None if server is None else round(server, 3),
            "server_cpu_util": None if server is None or wall <= 0 else round(server / wall, 3),
            "client_cpu_util": round(client / wall, 3) if wall > 0 else None,
            # cores used meanwhile by every other process on the machine (noise from shared use)
            "other_cpu_util": round(max(others, 0.0) / wall, 3) if wall > 0 else None,
        }
        if server is not None and deliveries:
            out["server_cpu_us_per_delivery"] = round(server / deliveries * 1e6, 2)
        return out


class Tracker:
    """Counts deliveries per (publisher, seq), keeps the windows, collects latencies."""

    def __init__(self, publishers: int, per_publisher: int, receivers: int) -> None:
        self.receivers = receivers
        self.per_publisher = per_publisher
        self.counts = [[0] * per_publisher for _ in range(publishers)]
        self.complete = [0] * publishers      # contiguous prefix of messages every receiver has
        self.wanted = [0] * publishers
        self.events = [asyncio.Event() for _ in range(publishers)]
        self.all_done = asyncio.Event()
        self.publishers_done = 0
        self.latencies: list[int] = []
        self.delivered = 0
        self.duplicates = 0
        self.first_send_ns = 0
        self.last_delivery_ns = 0
        self.last_progress = time.monotonic()
        self.failure: str | None = None
        self._unfinished = publishers

    def on_delivery(self, pub: int, seq: int, sent_ns: int, now_ns: int) -> None:
        self.latencies.append(now_ns - sent_ns)
        self.delivered += 1
        self.last_delivery_ns = now_ns
        counts = self.counts[pub]
        counts[seq] += 1
        if counts[seq] > self.receivers:
            self.duplicates += 1
            return
        if counts[seq] == self.receivers and seq == self.complete[pub]:
            done = seq + 1
            while done < self.per_publisher and counts[done] == self.receivers:
                done += 1
            self.complete[pub] = done
            self.last_progress = time.monotonic()
            if done >= self.wanted[pub]:
                self.events[pub].set()
            if done == self.per_publisher:
                self._unfinished -= 1
                if self._unfinished == 0:
                    self.all_done.set()

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        for event in self.events:
            event.set()
        self.all_done.set()

    async def wait_window(self, pub: int, target: int, deadline: float) -> bool:
        """Wait until message ``target - 1`` of ``pub`` reached everyone; False on failure or deadline."""
        while self.complete[pub] < target:
            if self.failure is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail("deadline reached")
                return False
            if time.monotonic() - self.last_progress > STALL_S:
                self.fail(f"no message completed for {STALL_S:.0f} s (stalled)")
                return False
            self.wanted[pub] = target
            self.events[pub].clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events[pub].wait(), min(remaining, 1.0))
        return self.failure is None


# --- bodies ----------------------------------------------------------------------------------------

def plain_body(size: int) -> BodyMaker:
    def make(pub: int, seq: int, now_ns: int) -> str:
        head = f"{pub} {seq} {now_ns} "
        return head + "x" * max(0, size - len(head))
    return make


def plain_decoder(body: str) -> tuple[int, int, int] | None:
    parts = body.split(" ", 3)
    if len(parts) < 3:
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


CHAT_MARK = "~b~"


def chat_body(room_id: str, size: int) -> BodyMaker:
    def make(pub: int, seq: int, now_ns: int) -> str:
        text = f"{CHAT_MARK}{pub}:{seq}:{now_ns}:"
        text += "x" * max(0, size - len(text))
        return json.dumps({"type": "TALK", "roomId": room_id, "message": text}, separators=(",", ":"))
    return make


def chat_decoder(body: str) -> tuple[int, int, int] | None:
    start = body.find(CHAT_MARK)
    if start < 0:
        return None  # ENTER/QUIT notices
    parts = body[start + len(CHAT_MARK):].split(":", 3)
    return int(parts[0]), int(parts[1]), int(parts[2])


# --- helpers ---------------------------------------------------------------------------------------

async def gather_limited(factories: Sequence[Callable[[], Awaitable[T]]], limit: int = 10) -> list[T]:
    semaphore = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await factory()
    return list(await asyncio.gather(*(one(f) for f in factories)))


async def _open_subscriber(endpoint: Endpoint, index: int, destination: str) -> StompClient:
    client = await endpoint.client(index, login=f"sub{index}").open()
    await client.subscribe(destination, sub_id=str(index))
    return client


async def _subscriber_loop(client: StompClient, index: int, tracker: Tracker, decode: Decoder) -> None:
    perf = time.perf_counter_ns
    on_delivery = tracker.on_delivery
    try:
        async for data in client.messages():
            now = perf()
            for body in message_bodies(data):
                parsed = decode(body)
                if parsed is not None:
                    on_delivery(parsed[0], parsed[1], parsed[2], now)
    except Exception as exc:  # a decoding problem must end the run, not hang it
        tracker.fail(f"subscriber {index} failed: {type(exc).__name__}: {exc}")
        return
    if not tracker.all_done.is_set():
        ws = client._ws
        code = getattr(ws, "close_code", None) if ws is not None else None
        reason = getattr(ws, "close_reason", None) if ws is not None else None
        tracker.fail(f"subscriber {index} was disconnected (close {code} {reason!r})")


async def _publisher_watch(client: StompClient, index: int, tracker: Tracker) -> None:
    """Publishers receive nothing in these scenarios: an ERROR frame or a close fails the run."""
    async for data in client.messages():
        for received in split_frames(data):
            if received.command == "ERROR":
                tracker.fail(f"publisher {index} got ERROR {received.header('message')!r}: {received.body[:200]!r}")
    if not tracker.all_done.is_set():
        ws = client._ws
        tracker.fail(f"publisher {index} was disconnected (close {getattr(ws, 'close_code', None)})")


async def _publisher_loop(client: StompClient, pub: int, count: int, window: int, tracker: Tracker,
                          destination: str, make_body: BodyMaker, deadline: float,
                          content_type: str | None = None) -> int:
    prefix = send_prefix(destination, content_type)
    perf = time.perf_counter_ns
    sent = 0
    try:
        for seq in range(count):
            if seq - tracker.complete[pub] >= window and not await tracker.wait_window(
                    pub, seq - window + 1, deadline):
                break
            await client.send(send_with(prefix, make_body(pub, seq, perf())))
            sent += 1
    except Exception as exc:
        tracker.fail(f"publisher {pub} failed: {type(exc).__name__}: {exc}")
    return sent


async def _close_all(clients: Sequence[StompClient]) -> None:
    async def close(client: StompClient) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)
    await gather_limited([partial(close, c) for c in clients], limit=20)


async def pubsub_run(endpoint: Endpoint, *, destination: str, publishers: int, subscribers: int,
                     per_publisher: int, window: int, make_body: BodyMaker, decode: Decoder,
                     time_limit_s: float, content_type: str | None = None,
                     publisher_nodes: Sequence[int] | None = None,
                     rate_per_s: float | None = None, send_destination: str | None = None) -> Result:
    """One run: ``publishers`` x ``per_publisher`` messages, ``subscribers`` readers of ``destination``.

    Publishers SEND to ``send_destination`` (default: ``destination`` itself).
    ``rate_per_s`` (total across publishers) switches from closed-loop windows to a fixed offered
    rate. ``publisher_nodes`` chooses the node index of each publisher (default: round-robin).
    """
    deadline = time.monotonic() + time_limit_s
    tracker = Tracker(publishers, per_publisher, subscribers)
    subs: list[StompClient] = []
    pubs: list[StompClient] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        subs = await gather_limited([partial(_open_subscriber, endpoint, i, destination)
                                     for i in range(subscribers)])
        nodes = publisher_nodes or list(range(publishers))
        pubs = await gather_limited([endpoint.client(nodes[i], login=f"pub{i}").open
                                     for i in range(publishers)])
        tasks = [asyncio.create_task(_subscriber_loop(c, i, tracker, decode)) for i, c in enumerate(subs)]
        tasks += [asyncio.create_task(_publisher_watch(c, i, tracker)) for i, c in enumerate(pubs)]
        target = send_destination or destination
        meter = CpuMeter(endpoint.pids)
        meter.start()
        tracker.first_send_ns = time.perf_counter_ns()
        tracker.last_progress = time.monotonic()
        if rate_per_s is None:
            sent = await asyncio.gather(*(
                _publisher_loop(c, i, per_publisher, window, tracker, target, make_body, deadline,
                                content_type) for i, c in enumerate(pubs)))
        else:
            sent = [await _paced_publisher(pubs, per_publisher, rate_per_s, tracker, target, make_body,
                                           deadline, content_type)]
        while not tracker.all_done.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tracker.fail("deadline reached")
                break
            if time.monotonic() - tracker.last_progress > STALL_S:
                tracker.fail(f"no message completed for {STALL_S:.0f} s (stalled)")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracker.all_done.wait(), min(remaining, 1.0))
        cpu = meter.stop(tracker.delivered)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close_all(subs + pubs)
    duration = max(tracker.last_delivery_ns - tracker.first_send_ns, 1) / 1e9
    expected = publishers * per_publisher * subscribers
    complete_messages = sum(tracker.complete)
    result: Result = {
        "messages_sent": sum(sent),
        "deliveries": tracker.delivered,
        "deliveries_expected": expected,
        "duplicates": tracker.duplicates,
        "duration_s": round(duration, 3),
        "deliveries_per_s": round(tracker.delivered / duration, 1),
        "messages_per_s": round(complete_messages / duration, 1),
        **latency_summary(tracker.latencies),
        **cpu,
        "failure": tracker.failure,
    }
    return result


async def _paced_publisher(pubs: Sequence[StompClient], per_publisher: int, rate_per_s: float,
                           tracker: Tracker, destination: str, make_body: BodyMaker, deadline: float,
                           content_type: str | None) -> int:
    """Send ``per_publisher`` messages from each publisher, round-robin, at ``rate_per_s`` in total."""
    prefix = send_prefix(destination, content_type)
    perf = time.perf_counter_ns
    order = [(pub, seq) for seq in range(per_publisher) for pub in range(len(pubs))]
    start = time.perf_counter()
    sent = 0
    try:
        while sent < len(order) and tracker.failure is None:
            if time.monotonic() > deadline:
                tracker.fail("deadline reached")
                break
            due = min(len(order), int((time.perf_counter() - start) * rate_per_s) + 1)
            while sent < due:
                pub, seq = order[sent]
                await pubs[pub].send(send_with(prefix, make_body(pub, seq, perf())))
                sent += 1
            await asyncio.sleep(0.002)
    except Exception as exc:
        tracker.fail(f"paced publisher failed: {type(exc).__name__}: {exc}")
    return sent


async def connection_rate(endpoint: Endpoint, *, total: int, concurrency: int, time_limit_s: float) -> Result:
    """``total`` sessions, ``concurrency`` at a time: WebSocket handshake, CONNECT, CONNECTED,
    DISCONNECT, close. Reports completed sessions per second and the CONNECT->CONNECTED latency."""
    deadline = time.monotonic() + time_limit_s
    counter = itertools.count()
    handshake_ns: list[int] = []
    session_ns: list[int] = []
    errors: list[str] = []
    perf = time.perf_counter_ns

    async def worker(worker_id: int) -> None:
        while time.monotonic() < deadline and len(errors) < 20:
            index = next(counter)
            if index >= total:
                return
            t0 = perf()
            client = endpoint.client(index, login=f"conn{index}")
            try:
                await client.open()
                t1 = perf()
                await client.disconnect()
            except Exception as exc:  # StompFailure, OSError, timeouts: counted, not fatal
                errors.append(f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(Exception):
                    await client.disconnect()
                continue
            handshake_ns.append(t1 - t0)
            session_ns.append(perf() - t0)

    meter = CpuMeter(endpoint.pids)
    meter.start()
    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = meter.stop(len(session_ns))
    connect_latency = latency_summary(handshake_ns)
    return {
        "sessions": len(session_ns),
        "sessions_expected": total,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": round(wall, 3),
        "sessions_per_s": round(len(session_ns) / wall, 1) if wall > 0 else None,
        "open_p50_ms": connect_latency["p50_ms"],
        "open_p99_ms": connect_latency["p99_ms"],
        "server_cpu_s": cpu["server_cpu_s"],
        "server_cpu_util": cpu["server_cpu_util"],
        "client_cpu_util": cpu["client_cpu_util"],
        "other_cpu_util": cpu["other_cpu_util"],
        "server_cpu_us_per_session": cpu.get("server_cpu_us_per_delivery"),
        "failure": None if not errors or len(session_ns) >= total else f"{len(errors)} errors",
    }
