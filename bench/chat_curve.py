"""The chat path at stepped, open-loop offered rates, against RabbitMQ Web-STOMP in the same run.

``python -m bench.run --curve [--quick]`` (``make bench BENCH_ARGS="--curve"``). For each shape
(500 rooms x 2 subscribers, 10 rooms x 100 subscribers; 50 publishers spread over the rooms) and
each system (RabbitMQ Web-STOMP pub/sub; the gateway on one node with SQLite; the gateway on 2 nodes
with a private redis-server and a throw-away PostgreSQL database), the offered message rate is
stepped up a ladder. Each step:

1. **paced sends** for ``step_s`` seconds: message *i* of the step is due at ``t0 + i / rate``, from
   publisher ``i % P``, to the next of that publisher's rooms. Open loop: a publisher never waits
   for deliveries. It only waits when its socket stops taking bytes (the transport's write buffer
   is above its high-water mark because the server stopped reading: TCP backpressure); it then
   falls behind its schedule and catches up as soon as it can write again. Each body carries
   ``~b~<step>:<i>:<write time ns>:`` stamped immediately before the bytes are written;
2. **drain**: up to ``drain_s`` more seconds for late writes and deliveries; then a short settle,
   and, on the gateway, a count of the TALK rows (which must equal the messages sent).

Per step: offered and achieved deliveries/s (each subscriber's copy counts) and messages/s,
undelivered % at the end of the drain, latency p50/p99 from the actual write, the publishers' **lag**
behind their schedule (write time - due time: the backpressure the server applied), latency measured
from the schedule (lag + latency: the coordinated-omission-free figure), server / generator / other
CPU. The **knee** is the highest offered step with 0 undelivered and p99 (from the write) <= 100 ms;
``knee_co`` uses the p99 from the schedule instead. After the ladder (which stops two failing steps
past the knee) steps at 1.5 x and 2 x the knee are run for the issue's "past the knee" checks.

Also measured in the same invocation: the storage ceiling (``bench.storage_ceiling``: the same
``save_batch`` statements driven directly), one session with a window of 64 SENDs awaiting receipts,
and a py-spy profile of the gateway during a 500 x 2 SQLite step. Writes
``bench/results/curve-<mode>-<time>.json``, a PNG plot, and (full mode) the generated block of
docs/benchmarks.md.

Talks to the gateway only through its public HTTP (POST /chat/room) and STOMP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from bench.fastwire import WsStomp
from bench.procs import (
    REPO,
    GatewayNode,
    PeerUnavailable,
    PostgresDatabase,
    RabbitPeer,
    RedisServer,
    RedisServerMissing,
    SqliteDatabase,
    machine_info,
)
from bench.scenarios import CpuMeter, gather_limited
from tests.support import postgres

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS = REPO / "docs"
DOCS_PAGE = DOCS / "benchmarks.md"
BLOCK_BEGIN = "<!-- chat-curve:generated:begin -->"
BLOCK_END = "<!-- chat-curve:generated:end -->"
MARK = b"~b~"
P99_LIMIT_MS = 100.0
TEXT_CHARS = 64            # length of the chat text each message carries (marker + padding)
WINDOW = 64                # the single-session pipelining test's outstanding receipts
PUBLISHER_SNDBUF = 16384   # a publisher socket's kernel send buffer (Linux doubles it: 32 KiB)
PUBLISHER_WRITE_HIGH = 0   # the publisher transport pauses as soon as the kernel does not take a whole frame


# --- plan ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    name: str
    rooms: int
    subs_per_room: int
    publishers: int
    rates: tuple[float, ...]          # offered messages/s, ascending

    @property
    def subscribers(self) -> int:
        return self.rooms * self.subs_per_room


@dataclass(frozen=True)
class CurvePlan:
    shapes: tuple[Shape, ...]
    step_s: float
    drain_s: float
    fails_past_knee: int              # the ladder stops after this many failing steps in a row
    window_s: float                   # the window-64 test's duration
    ceiling_s: float                  # per batch size
    ceiling_batches: tuple[int, ...]
    profile_rate: float               # offered messages/s of the profiled 500 x 2 SQLite step
    profile_s: float
    retry_failed: bool = True         # repeat a failing ladder step once (shared machine)


LADDER_500 = (50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0, 650.0, 800.0, 1000.0, 1250.0, 1600.0, 2000.0,
              2500.0, 3200.0, 4000.0, 5000.0, 6400.0, 8000.0)
LADDER_10 = (5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 65.0, 80.0, 100.0, 125.0, 160.0, 200.0, 250.0, 320.0,
             400.0, 500.0, 640.0)

FULL = CurvePlan(
    shapes=(Shape("500x2", 500, 2, 50, LADDER_500), Shape("10x100", 10, 100, 50, LADDER_10)),
    step_s=4.0, drain_s=4.0, fails_past_knee=2, window_s=5.0, ceiling_s=2.0,
    ceiling_batches=(1, 8, 32, 128), profile_rate=800.0, profile_s=8.0)
QUICK = CurvePlan(
    shapes=(Shape("500x2", 500, 2, 50, LADDER_500[::2]), Shape("10x100", 10, 100, 50, LADDER_10[::2])),
    step_s=2.0, drain_s=3.0, fails_past_knee=1, window_s=2.0, ceiling_s=1.0,
    ceiling_batches=(1, 32), profile_rate=800.0, profile_s=4.0, retry_failed=False)


# --- one system under test ------------------------------------------------------------------------

@dataclass
class Target:
    """Where one system is reached for one shape: URLs per node, credentials, how rooms are named."""

    system: str                                   # "rabbitmq", "gateway-sqlite", "gateway-2nodes-pg"
    urls: list[str]
    login: str | None                             # None: every client logs in with its own name
    passcode: str
    pids: list[int | None]
    sub_destination: Callable[[str], str]
    send_destination: Callable[[str], str]
    create_rooms: Callable[[int], list[str]]
    count_rows: Callable[[], Any] | None = None   # async () -> int: TALK rows (gateway only)

    def url(self, index: int) -> str:
        return self.urls[index % len(self.urls)]

    def login_for(self, name: str) -> str:
        return self.login if self.login is not None else name


@dataclass
class StepState:
    """The counters of the step in progress; filled by :meth:`Rig.on_message` (the hot path)."""

    number: int
    rate: float
    n: int
    subs_per_room: int
    t0: int
    interval_ns: float
    window_end: int
    counts: array = field(init=False)         # deliveries per message index
    latency: array = field(default_factory=lambda: array("q"))
    sched_latency: array = field(default_factory=lambda: array("q"))
    lag: array = field(default_factory=lambda: array("q"))
    delivered: int = 0
    in_window: int = 0
    stale: int = 0
    sent: int = 0
    last_ns: int = 0

    def __post_init__(self) -> None:
        self.counts = array("H", bytes(2 * self.n))


class Rig:
    """The connected clients of one system for one shape: subscribers, publishers, their rooms."""

    def __init__(self, target: Target, shape: Shape, log: Callable[[str], None]) -> None:
        self.target = target
        self.shape = shape
        self.log = log
        self.rooms: list[str] = []
        self.subs: list[WsStomp] = []
        self.pubs: list[WsStomp] = []
        self.pub_rooms: list[list[int]] = []
        self.step: StepState | None = None
        self.failure: str | None = None
        self._closing = False
        self._prefix: list[bytes] = []
        self._json_head: list[list[bytes]] = []
        self._keepalive_task: asyncio.Task[None] | None = None

    # connections ---------------------------------------------------------------------------

    def _on_close(self, client: WsStomp, reason: str) -> None:
        if not self._closing and self.failure is None:
            self.failure = f"client {client.name} lost its session: {reason}"

    async def _keepalive(self) -> None:
        """An EOL (a STOMP heart-beat) from every client every 15 s: RabbitMQ Web-STOMP (cowboy's
        idle_timeout) closes a WebSocket that has sent nothing for 60 s, which every subscriber is."""
        while not self._closing:
            await asyncio.sleep(15.0)
            for client in [*self.subs, *self.pubs]:
                if client.is_open:
                    client.send_raw(b"\n")

    async def _open(self, index: int, name: str) -> WsStomp:
        client = WsStomp(self.target.url(index), on_message=self.on_message)
        client.name = name
        client.on_close = self._on_close
        publisher = name.startswith("pub")
        return await client.open(self.target.login_for(name), self.target.passcode,
                                 sndbuf=PUBLISHER_SNDBUF if publisher else None,
                                 write_high=PUBLISHER_WRITE_HIGH if publisher else None)

    async def _open_sub(self, room: int, j: int) -> WsStomp:
        client = await self._open(room + j, f"sub{room}-{j}")
        await client.subscribe(self.target.sub_destination(self.rooms[room]), f"{room}-{j}")
        return client

    async def setup(self) -> None:
        shape = self.shape
        started = time.monotonic()
        self.rooms = await asyncio.to_thread(self.target.create_rooms, shape.rooms)
        self.subs = await gather_limited([partial(self._open_sub, r, j) for r in range(shape.rooms)
                                          for j in range(shape.subs_per_room)], limit=16)
        self.pubs = await gather_limited([partial(self._open, p, f"pub{p}") for p in range(shape.publishers)],
                                         limit=16)
        if shape.rooms >= shape.publishers:
            self.pub_rooms = [list(range(p, shape.rooms, shape.publishers)) for p in range(shape.publishers)]
        else:
            self.pub_rooms = [[p % shape.rooms] for p in range(shape.publishers)]
        self._prefix = [(f"SEND\ndestination:{self.target.send_destination(room)}\n"
                         "content-type:application/json\n").encode() for room in self.rooms]
        self._json_head = [[(f'{{"type":"TALK","roomId":"{room}","sender":"pub{p}","message":"').encode()
                            for room in self.rooms] for p in range(shape.publishers)]
        self._keepalive_task = asyncio.create_task(self._keepalive())
        await asyncio.sleep(1.0)  # let the gateway's ENTER notices go out before the first step
        self.log(f"    connected {len(self.subs)} subscribers and {len(self.pubs)} publishers "
                 f"in {time.monotonic() - started:.1f} s")

    async def close(self) -> None:
        self._closing = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        for client in [*self.subs, *self.pubs]:
            await client.close()
        await asyncio.sleep(0.2)

    # receiving (hot path) -------------------------------------------------------------------

    def on_message(self, data: bytes, now: int) -> None:
        st = self.step
        if st is None:
            return
        find = data.find
        pos = find(MARK)
        while pos >= 0:
            a = pos + 3
            b = find(b":", a)
            c = find(b":", b + 1)
            d = find(b":", c + 1)
            i = int(data[b + 1:c])
            if int(data[a:b]) == st.number and i < st.n:
                sent = int(data[c + 1:d])
                st.counts[i] += 1
                st.latency.append(now - sent)
                st.sched_latency.append(now - st.t0 - int(i * st.interval_ns))
                st.delivered += 1
                st.last_ns = now
                if now <= st.window_end:
                    st.in_window += 1
            else:
                st.stale += 1
            pos = find(MARK, d)

    # one step -------------------------------------------------------------------------------

    def _frame(self, p: int, room: int, st: StepState, i: int, now: int) -> bytes:
        text = b"~b~%d:%d:%d:" % (st.number, i, now)
        body = self._json_head[p][room] + text + b"x" * (TEXT_CHARS - len(text)) + b'"}'
        return self._prefix[room] + b"content-length:%d\n\n%s\x00" % (len(body), body)

    async def _pace(self, st: StepState, send_deadline: int) -> None:
        """Open-loop sends: message i is due at t0 + i * interval, from publisher i % P."""
        pubs = self.pubs
        count = len(pubs)
        next_i = list(range(count))
        pub_rooms = self.pub_rooms
        perf = time.perf_counter_ns
        frame = self._frame
        lag = st.lag
        while True:
            now = perf()
            if now >= send_deadline or self.failure is not None:
                return
            due = min(st.n, int((now - st.t0) / st.interval_ns) + 1) if now >= st.t0 else 0
            pending = False
            for p in range(count):
                i = next_i[p]
                if i >= st.n:
                    continue
                pending = True
                if i >= due:
                    continue
                client = pubs[p]
                rooms = pub_rooms[p]
                while i < due and client.writable.is_set():
                    now = perf()
                    room = rooms[(i // count) % len(rooms)]
                    client.send_raw(frame(p, room, st, i, now))
                    lag.append(now - st.t0 - int(i * st.interval_ns))
                    st.sent += 1
                    i += count
                next_i[p] = i
            if not pending:
                return
            next_due = st.t0 + int(due * st.interval_ns)
            await asyncio.sleep(max(0.0005, min(0.005, (next_due - perf()) / 1e9)))

    async def run_step(self, number: int, rate: float, step_s: float, drain_s: float,
                       count_rows_before: int | None) -> dict[str, Any]:
        shape = self.shape
        n = max(1, round(rate * step_s))
        perf = time.perf_counter_ns
        t0 = perf() + 20_000_000
        st = StepState(number=number, rate=rate, n=n, subs_per_room=shape.subs_per_room, t0=t0,
                       interval_ns=1e9 / rate, window_end=t0 + int(step_s * 1e9))
        expected = n * shape.subs_per_room
        meter = CpuMeter(self.target.pids)
        meter.start()
        pauses0 = sum(p.pauses for p in self.pubs)
        paused0 = sum(p.paused_ns for p in self.pubs)
        self.step = st
        send_end = t0 + int(step_s * 1e9)
        drain_end = send_end + int(drain_s * 1e9)
        await self._pace(st, drain_end)
        # drain: until everything arrived, the drain window closed, or nothing arrived for 2 s
        last_seen = (st.delivered, time.monotonic())
        while st.delivered < expected and perf() < drain_end and self.failure is None:
            await asyncio.sleep(0.02)
            if st.delivered != last_seen[0]:
                last_seen = (st.delivered, time.monotonic())
            elif time.monotonic() - last_seen[1] > 2.0 and st.sent == n:
                break
        delivered_at_drain = st.delivered
        last_at_drain = st.last_ns
        pauses = sum(p.pauses for p in self.pubs) - pauses0
        paused_s = (sum(p.paused_ns for p in self.pubs) - paused0) / 1e9
        cpu = meter.stop(st.delivered)
        # settle: let late deliveries in (so the next step starts clean), then count the rows
        settle_until = time.monotonic() + 20.0
        previous = -1
        while previous != st.delivered and time.monotonic() < settle_until:
            previous = st.delivered
            await asyncio.sleep(1.0)
        self.step = None
        rows = None
        if self.target.count_rows is not None and count_rows_before is not None:
            rows = await self.target.count_rows() - count_rows_before
        undelivered = expected - min(delivered_at_drain, expected)
        duplicates = sum(max(0, c - shape.subs_per_room) for c in st.counts)
        missing_after_settle = sum(max(0, shape.subs_per_room - c) for c in st.counts)
        # Achieved rate: deliveries up to the end of the drain over the time from the first due send to
        # the last delivery, but never less than the step itself (a system that keeps up delivers
        # the last message just after it is due, at (n - 1) / rate, not at step_s).
        span_s = max(last_at_drain - t0, int(step_s * 1e9)) / 1e9
        achieved = delivered_at_drain / span_s if delivered_at_drain else 0.0
        lat = _percentiles(st.latency)
        sched = _percentiles(st.sched_latency)
        lag = _percentiles(st.lag)
        result: dict[str, Any] = {
            "step": number,
            "offered_msgs_per_s": rate,
            "offered_deliveries_per_s": rate * shape.subs_per_room,
            "step_s": step_s,
            "scheduled": n,
            "sent": st.sent,
            "unsent": n - st.sent,
            "expected_deliveries": expected,
            "delivered": delivered_at_drain,
            "undelivered": undelivered,
            "undelivered_pct": round(100.0 * undelivered / expected, 3),
            "missing_after_settle": missing_after_settle,
            "duplicates": duplicates,
            "stale": st.stale,
            "achieved_deliveries_per_s": round(achieved, 1),
            "achieved_msgs_per_s": round(achieved / shape.subs_per_room, 1),
            "in_window_deliveries_per_s": round(st.in_window / step_s, 1),
            "p50_ms": lat[0], "p99_ms": lat[1], "max_ms": lat[2],
            "sched_p50_ms": sched[0], "sched_p99_ms": sched[1], "sched_max_ms": sched[2],
            "lag_p50_ms": lag[0], "lag_p99_ms": lag[1], "lag_max_ms": lag[2],
            # TCP backpressure seen by the publishers: write pauses, and publisher-seconds spent paused
            "publisher_pauses": pauses, "publisher_paused_s": round(paused_s, 3),
            **cpu,
            "db_rows": rows,
            "rows_ok": None if rows is None else rows == st.sent,
            "failure": self.failure,
        }
        result["passed"] = bool(undelivered == 0 and lat[1] is not None and lat[1] <= P99_LIMIT_MS
                                and self.failure is None)
        result["passed_co"] = bool(result["passed"] and sched[1] is not None and sched[1] <= P99_LIMIT_MS)
        return result

    # single session, window of 64 receipts --------------------------------------------------

    async def window_test(self, seconds: float) -> dict[str, Any]:
        client = await self._open(0, "window64")
        room = 0
        outstanding: dict[str, int] = {}
        latencies = array("q")
        done = 0
        wake = asyncio.Event()
        perf = time.perf_counter_ns

        def on_receipt(receipt_id: str) -> None:
            nonlocal done
            sent_at = outstanding.pop(receipt_id, None)
            if sent_at is not None:
                latencies.append(perf() - sent_at)
                done += 1
                wake.set()

        client.on_receipt = on_receipt
        meter = CpuMeter(self.target.pids)
        meter.start()
        started = perf()
        stop_at = started + int(seconds * 1e9)
        k = 0
        failure = None
        try:
            while perf() < stop_at:
                while len(outstanding) >= WINDOW:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), 10)
                    except TimeoutError:
                        failure = f"no receipt for 10 s with {len(outstanding)} outstanding"
                        break
                if failure or client.closed_reason:
                    failure = failure or client.closed_reason
                    break
                now = perf()
                text = b"~w~%d:%d:" % (k, now)
                body = (self._json_head[0][room] + text + b"x" * (TEXT_CHARS - len(text)) + b'"}')
                receipt = f"w{k}"
                outstanding[receipt] = now
                client.send_raw(self._prefix[room] + b"receipt:%s\ncontent-length:%d\n\n%s\x00"
                                % (receipt.encode(), len(body), body))
                k += 1
                if not client.writable.is_set():
                    await client.writable.wait()
                await asyncio.sleep(0)
            deadline = time.monotonic() + 10
            while outstanding and time.monotonic() < deadline and not client.closed_reason:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 1)
        finally:
            elapsed = (perf() - started) / 1e9
            cpu = meter.stop(done)
            await client.close()
        lat = _percentiles(latencies)
        return {"window": WINDOW, "seconds": round(elapsed, 2), "sends": k, "receipts": done,
                "sends_per_s_with_receipts": round(done / elapsed, 1), "receipt_p50_ms": lat[0],
                "receipt_p99_ms": lat[1], "server_cpu_util": cpu.get("server_cpu_util"),
                "client_cpu_util": cpu.get("client_cpu_util"), "failure": failure}


def _percentiles(values: array) -> tuple[float | None, float | None, float | None]:
    """(p50, p99, max) in milliseconds of nanosecond samples (nearest rank)."""
    if not values:
        return None, None, None
    try:
        import numpy as np
        data = np.frombuffer(values, dtype=np.int64)
        p50, p99 = np.percentile(data, [50, 99], method="inverted_cdf")
        top = data.max()
        return round(float(p50) / 1e6, 2), round(float(p99) / 1e6, 2), round(float(top) / 1e6, 2)
    except ImportError:
        ordered = sorted(values)
        pick = lambda q: ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]  # noqa: E731
        return round(pick(0.5) / 1e6, 2), round(pick(0.99) / 1e6, 2), round(ordered[-1] / 1e6, 2)


# --- the curve of one (system, shape) -----------------------------------------------------------

def knee_of(steps: Sequence[dict[str, Any]], key: str = "passed") -> float | None:
    passing = [s["offered_msgs_per_s"] for s in steps if s.get(key) and not s.get("extra")]
    return max(passing) if passing else None


async def run_curve(rig: Rig, plan: CurvePlan, log: Callable[[str], None], first_step: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    rows_before = await rig.target.count_rows() if rig.target.count_rows else None
    number = first_step
    fails = 0
    ever_passed = False

    async def step(rate: float, extra: str | None = None, retry: bool = False) -> dict[str, Any]:
        nonlocal number, rows_before
        number += 1
        result = await rig.run_step(number, rate, plan.step_s, plan.drain_s, rows_before)
        if rows_before is not None and result["db_rows"] is not None:
            rows_before += result["db_rows"]
        if extra:
            result["extra"] = extra
        if retry:
            result["retry"] = True
        steps.append(result)
        log(_step_line(rig.target.system, rig.shape.name, result))
        await asyncio.sleep(0.5)
        return result

    # Warm-up (not reported): the first seconds after 1000 subscriptions carry their ENTER notices,
    # connection set-up garbage and cold caches; the first measured step should not pay for them.
    warm = await rig.run_step(number + 1, rig.shape.rates[0], min(2.0, plan.step_s), plan.drain_s, rows_before)
    number += 1
    if rows_before is not None and warm["db_rows"] is not None:
        rows_before += warm["db_rows"]
    log(f"  (warm-up) {_step_line(rig.target.system, rig.shape.name, warm)}")
    for rate in rig.shape.rates:
        if rig.failure:
            break
        result = await step(rate)
        if not result["passed"] and plan.retry_failed and not rig.failure:
            # The machine is shared: one attempt can land on another engineer's test burst. A
            # failing step is repeated once (for every system alike); it passes if either attempt does.
            result["retried"] = True
            result = await step(rate, extra=None, retry=True)
        if result["passed"]:
            ever_passed = True
            fails = 0
        else:
            fails += 1
            if fails >= plan.fails_past_knee and (ever_passed or fails >= plan.fails_past_knee + 1):
                break
    knee = knee_of(steps)
    if knee is not None and not rig.failure:
        for factor in (1.5, 2.0):
            rate = knee * factor
            if not any(abs(s["offered_msgs_per_s"] - rate) / rate < 0.03 for s in steps):
                await step(rate, extra=f"{factor:g}x knee")
    return {"steps": steps, "failure": rig.failure, **curve_summary(steps)}


def curve_summary(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    knee = knee_of(steps)
    out: dict[str, Any] = {"knee_msgs_per_s": knee, "knee_co_msgs_per_s": knee_of(steps, "passed_co"),
                           "rows_ok": all(s.get("rows_ok") is not False for s in steps)}
    if knee is None:
        return out
    by_rate = {s["offered_msgs_per_s"]: s for s in steps if not s.get("retried")}

    def near(rate: float) -> dict[str, Any] | None:
        best = min(by_rate, key=lambda r: abs(r - rate))
        return by_rate[best] if abs(best - rate) / rate < 0.03 else None

    at_knee, at_15, at_2 = near(knee), near(1.5 * knee), near(2 * knee)
    out["knee_p99_ms"] = at_knee["p99_ms"] if at_knee else None
    if at_2 is not None:
        out["at_2x_achieved_msgs_per_s"] = at_2["achieved_msgs_per_s"]
        out["at_2x_p99_ms"] = at_2["p99_ms"]
        out["at_2x_sched_p99_ms"] = at_2["sched_p99_ms"]
        out["check_2x_achieved_ge_0.9_knee"] = at_2["achieved_msgs_per_s"] >= 0.9 * knee
    if at_15 is not None:
        out["at_1.5x_achieved_msgs_per_s"] = at_15["achieved_msgs_per_s"]
        out["at_1.5x_p99_ms"] = at_15["p99_ms"]
        out["at_1.5x_sched_p99_ms"] = at_15["sched_p99_ms"]
    if at_2 is not None and at_15 is not None and at_2["p99_ms"] is not None and at_15["p99_ms"] is not None:
        out["check_2x_p99_le_1.5x_p99"] = at_2["p99_ms"] <= at_15["p99_ms"]
    return out


def _step_line(system: str, shape: str, r: dict[str, Any]) -> str:
    extra = f" [{r['extra']}]" if r.get("extra") else ""
    rows = "" if r.get("rows_ok") is None else (" rows ok" if r["rows_ok"] else f" ROWS {r['db_rows']}!={r['sent']}")
    fail = f" FAILURE={r['failure']}" if r.get("failure") else ""
    return (f"  {system:18} {shape:6} offered {r['offered_msgs_per_s']:7.0f} msg/s -> achieved "
            f"{r['achieved_msgs_per_s']:8.1f} msg/s ({r['achieved_deliveries_per_s']:8.0f} deliv/s), "
            f"undelivered {r['undelivered_pct']:.2f}%, p50/p99 {r['p50_ms']}/{r['p99_ms']} ms, "
            f"lag p99 {r['lag_p99_ms']} ms, pauses {r.get('publisher_pauses')}, sched p99 {r['sched_p99_ms']} ms, "
            f"server cpu {r['server_cpu_util']}, "
            f"gen cpu {r['client_cpu_util']}, other {r['other_cpu_util']}"
            f"{rows}{' PASS' if r['passed'] else ''}{extra}{fail}")


# --- systems ---------------------------------------------------------------------------------------

def rabbit_target(peer: RabbitPeer) -> Target:
    return Target(system="rabbitmq", urls=[peer.ws_url], login=peer.login, passcode=peer.passcode,
                  pids=[peer.pid], sub_destination=lambda room: f"/topic/chat.{room}",
                  send_destination=lambda room: f"/topic/chat.{room}",
                  create_rooms=lambda count: [str(uuid.uuid4()) for _ in range(count)])


def _create_gateway_rooms(node: GatewayNode, count: int) -> list[str]:
    return [node.create_room(f"curve-{i}") for i in range(count)]


def gateway_target(system: str, nodes: list[GatewayNode], rows: Callable[[], Any]) -> Target:
    return Target(system=system, urls=[n.ws_url for n in nodes], login=None, passcode="",
                  pids=[n.pid for n in nodes], sub_destination=lambda room: f"/sub/chat/room/{room}",
                  send_destination=lambda room: "/pub/chat/message",
                  create_rooms=partial(_create_gateway_rooms, nodes[0]), count_rows=rows)


def sqlite_rows(path: Path) -> Callable[[], Any]:
    async def count() -> int:
        def query() -> int:
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
                return int(db.execute("SELECT count(*) FROM messages WHERE type = 'TALK'").fetchone()[0])
        return await asyncio.to_thread(query)
    return count


def postgres_rows(name: str) -> Callable[[], Any]:
    async def count() -> int:
        conn = await asyncpg.connect(postgres.plain_url(name), timeout=10)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM messages WHERE type = 'TALK'"))
        finally:
            await conn.close()
    return count


# --- storage ceiling, profile ------------------------------------------------------------------------

def storage_ceiling(url: str, rooms: list[str], workdir: Path, plan: CurvePlan, writers: int,
                    tree: Path) -> dict[str, Any]:
    rooms_file = workdir / f"rooms-{uuid.uuid4().hex[:8]}.json"
    rooms_file.write_text(json.dumps(rooms))
    command = [sys.executable, "-m", "bench.storage_ceiling", "--database-url", url, "--rooms-file",
               str(rooms_file), "--batch-sizes", ",".join(str(b) for b in plan.ceiling_batches),
               "--seconds", str(plan.ceiling_s), "--writers", str(writers), "--text-chars", str(TEXT_CHARS)]
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{REPO}"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tree, env=env, check=False)
    if done.returncode != 0:
        return {"failure": done.stderr.strip()[-1500:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class Profiler:
    """``py-spy record --format raw`` attached to a running gateway for a fixed time."""

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        self.pid = pid
        self.seconds = seconds
        self.out = out
        self.process: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.error = "py-spy is not installed"
            return
        self.process = subprocess.Popen(
            [pyspy, "record", "--pid", str(self.pid), "--duration", str(int(self.seconds)), "--rate", "250",
             "--format", "raw", "--threads", "--gil", "--output", str(self.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> dict[str, Any]:
        if self.process is None:
            return {"error": self.error}
        try:
            _, err = self.process.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGINT)
            _, err = self.process.communicate(timeout=10)
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-800:]}
        return summarize_profile(self.out.read_text())


_OUTER = ("<frozen runpy>", "gateway/cli.py", "uvicorn/server.py:Server.run", "uvicorn/_compat.py",
          "asyncio/runners.py", "threading.py:Thread._bootstrap", "threading.py:Thread.run",
          # pass-through ASGI wrappers around every WebSocket session's coroutine
          "starlette/middleware/", "uvicorn/middleware/", "starlette/routing.py", "starlette/_exception_handler.py",
          "starlette/applications.py", "uvicorn/protocols/websockets/websockets_sansio_impl.py:WebSocketsSansIOProtocol.run_asgi",
          "gateway/app.py:create_app.<locals>.websocket_endpoint")
NATIVE_LOOP = "asyncio/runners.py:Runner.run"
"""A sample whose innermost Python frame is Runner.run is in uvloop's C code (socket reads and writes,
callback dispatch) or waiting for the GIL."""

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``pkg/file.py:func`` (line numbers dropped for totals)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{match.group('func')}"


def summarize_profile(raw: str, top: int = 30) -> dict[str, Any]:
    """Self and total sample shares per function, per thread group, from py-spy's raw output."""
    threads: dict[str, int] = {}
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    main_self: dict[str, int] = {}
    main_total: dict[str, int] = {}
    samples = 0
    main_samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        short = [_short(f) for f in frames]
        samples += count
        threads[thread] = threads.get(thread, 0) + count
        is_main = "MainThread" in thread
        for table_self, table_total in ((self_counts, total_counts),) + (((main_self, main_total),) if is_main else ()):
            table_self[short[-1]] = table_self.get(short[-1], 0) + count
            for name in set(short):
                table_total[name] = table_total.get(name, 0) + count
        if is_main:
            main_samples += count

    def ranked(table: dict[str, int], base: int) -> list[list[Any]]:
        # Frames on every stack of a thread (runpy, cli, uvicorn's Server.run, Runner.run) say nothing.
        is_total = table is total_counts or table is main_total
        rows = [(name, c) for name, c in table.items() if not (is_total and name.startswith(_OUTER))]
        return [[name, round(100.0 * c / base, 1)] for name, c in
                sorted(rows, key=lambda kv: -kv[1])[:top]] if base else []

    return {"samples": samples, "event_loop_samples": main_samples,
            "threads": {k: round(100.0 * v / samples, 1) for k, v in
                        sorted(threads.items(), key=lambda kv: -kv[1])} if samples else {},
            "self_all": ranked(self_counts, samples), "total_all": ranked(total_counts, samples),
            "self_event_loop": ranked(main_self, main_samples),
            "total_event_loop": ranked(main_total, main_samples)}


# --- orchestration -----------------------------------------------------------------------------

def raise_fd_limit(wanted: int = 16384) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _with_rig(target: Target, shape: Shape, plan: CurvePlan, log: Callable[[str], None],
                    first_step: int, extra: Callable[[Rig], Any] | None = None) -> dict[str, Any]:
    rig = Rig(target, shape, log)
    out: dict[str, Any] = {"system": target.system, "shape": shape.name}
    try:
        await rig.setup()
        out.update(await run_curve(rig, plan, log, first_step))
        if extra is not None and not rig.failure:
            out.update(await extra(rig))
    except Exception as exc:  # a setup failure is reported, the other systems still run
        out["failure"] = f"{type(exc).__name__}: {exc}"
        log(f"    FAILURE {target.system} {shape.name}: {out['failure']}")
    finally:
        out["rooms"] = rig.rooms
        await rig.close()
    return out


async def run_all(plan: CurvePlan, args: Any, log: Callable[[str], None], workdir: Path,
                  tree: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"curves": {}, "ceilings": {}, "window64": {}, "profile": None, "notes": []}
    fd_limit = raise_fd_limit()
    report["notes"].append(f"load generator open-files limit {fd_limit}")
    peer: RabbitPeer | None = None
    if not args.no_peer:
        try:
            peer = RabbitPeer().ensure(min_open_files=4096)
            report["notes"] += peer.notes
            report["rabbitmq"] = peer.version
        except PeerUnavailable as exc:
            log(f"peer skipped: {exc}")
            report["notes"].append(f"peer skipped: {exc}")
    wanted_systems = set(args.curve_systems.split(",")) if args.curve_systems else None
    wanted_shapes = set(args.curve_shapes.split(",")) if args.curve_shapes else None
    step_base = 0

    def wanted(system: str) -> bool:
        return wanted_systems is None or system in wanted_systems

    redis: RedisServer | None = None
    try:
        for index, shape in enumerate(plan.shapes):
            if wanted_shapes is not None and shape.name not in wanted_shapes:
                continue
            order = ["rabbitmq", "gateway-sqlite", "gateway-2nodes-pg"]
            if index % 2 == 1:
                order.reverse()  # ABBA over the shapes: drift of the shared machine hits both alike
            for system in order:
                if not wanted(system):
                    continue
                step_base += 1000
                key = f"{system}/{shape.name}"
                log(f"{key}: {shape.rooms} rooms x {shape.subs_per_room} subscribers, {shape.publishers} "
                    f"publishers, steps of {plan.step_s:g} s + drain up to {plan.drain_s:g} s")
                if system == "rabbitmq":
                    if peer is None:
                        continue

                    async def rabbit_extra(rig: Rig) -> dict[str, Any]:
                        return {"window64": await rig.window_test(plan.window_s)}

                    result = await _with_rig(rabbit_target(peer), shape, plan, log, step_base,
                                             rabbit_extra if shape.name == "500x2" else None)
                elif system == "gateway-sqlite":
                    result = await _gateway_sqlite(shape, plan, log, workdir, tree, step_base, args)
                else:
                    if redis is None:
                        try:
                            redis = RedisServer()
                            redis.start()
                        except RedisServerMissing as exc:
                            report["notes"].append(f"2-node scenarios skipped: {exc}")
                            redis = None
                            continue
                    result = await _gateway_pg(shape, plan, log, workdir, tree, step_base, redis.url)
                report["curves"][key] = result
                if "window64" in result:
                    report["window64"][key] = result.pop("window64")
                    log(f"  window 64: {report['window64'][key]}")
                if "ceiling" in result:
                    report["ceilings"][key] = result.pop("ceiling")
                    log(f"  storage ceiling: {_ceiling_line(report['ceilings'][key])}")
                if "profile" in result:
                    report["profile"] = result.pop("profile")
    finally:
        if redis is not None:
            redis.close()
    return report


def _ceiling_line(ceiling: dict[str, Any]) -> str:
    if "sizes" not in ceiling:
        return f"FAILED {ceiling.get('failure')}"
    return ", ".join(f"batch {s['batch_size']}: {s['messages_per_s']:.0f} msg/s (commit p50 {s['commit_p50_ms']} ms)"
                     for s in ceiling["sizes"]) + f"; writers {ceiling['writers']}"


# Abuse limits (issue 10) that a load test from one address would trip and RabbitMQ does not have: the
# SEND rate bucket (with auth=anonymous it is the client address's, i.e. all 50 publishers share 50/s)
# and sessions per client address (1000 per node; a curve opens 1050 from 127.0.0.1). Passed as
# environment variables, which a gateway without these settings ignores (--gateway-tree of older code).
GATEWAY_ENV = {"GATEWAY_SEND_RATE_PER_S": "0", "GATEWAY_MAX_CONNECTIONS_PER_IP": "0"}


def _node(url: str, tree: Path, redis_url: str | None = None) -> GatewayNode:
    return GatewayNode(url, redis_url=redis_url, allow_client_broker_send=False, tree=tree,
                       env=dict(GATEWAY_ENV))


async def _gateway_sqlite(shape: Shape, plan: CurvePlan, log: Callable[[str], None], workdir: Path, tree: Path,
                          step_base: int, args: Any) -> dict[str, Any]:
    path = workdir / f"curve-{shape.name}-{uuid.uuid4().hex[:6]}.db"
    database = await SqliteDatabase(path).setup(tree)
    node = _node(database.url, tree).start(workdir)
    try:
        target = gateway_target("gateway-sqlite", [node], sqlite_rows(path))

        async def extra(rig: Rig) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if shape.name == "500x2":
                out["window64"] = await rig.window_test(plan.window_s)
                if not args.no_profile and node.pid is not None:
                    out["profile"] = await _profile_step(rig, node.pid, plan, log, workdir, step_base + 900)
            return out

        result = await _with_rig(target, shape, plan, log, step_base, extra)
    finally:
        node.stop()
    result["ceiling"] = await asyncio.to_thread(storage_ceiling, database.url, result.get("rooms") or [],
                                                workdir, plan, 1, tree)
    return result


async def _gateway_pg(shape: Shape, plan: CurvePlan, log: Callable[[str], None], workdir: Path, tree: Path,
                      step_base: int, redis_url: str) -> dict[str, Any]:
    database = PostgresDatabase()
    try:
        await database.setup(tree)
    except Exception as exc:
        return {"system": "gateway-2nodes-pg", "shape": shape.name,
                "failure": f"PostgreSQL unavailable: {type(exc).__name__}: {exc}"}
    nodes: list[GatewayNode] = []
    try:
        for _ in range(2):
            nodes.append(_node(database.url, tree, redis_url).start(workdir))
        target = gateway_target("gateway-2nodes-pg", nodes, postgres_rows(database.name))

        async def extra(rig: Rig) -> dict[str, Any]:
            if shape.name != "500x2":
                return {}
            return {"window64": await rig.window_test(plan.window_s)}

        result = await _with_rig(target, shape, plan, log, step_base, extra)
        for node in nodes:
            node.stop()
        nodes = []
        result["ceiling"] = await asyncio.to_thread(storage_ceiling, database.url, result.get("rooms") or [],
                                                    workdir, plan, 2, tree)
    finally:
        for node in nodes:
            node.stop()
        await database.drop()
    return result


async def _profile_step(rig: Rig, pid: int, plan: CurvePlan, log: Callable[[str], None], workdir: Path,
                        number: int) -> dict[str, Any]:
    """One extra step at ``profile_rate`` with py-spy attached to the gateway for ``profile_s``."""
    out = workdir / f"profile-{pid}.txt"
    profiler = Profiler(pid, plan.profile_s, out)
    profiler.start()
    await asyncio.sleep(0.5)  # py-spy attaches
    step = await rig.run_step(number, plan.profile_rate, plan.profile_s, plan.drain_s, None)
    summary = await asyncio.to_thread(profiler.finish)
    log(f"  profile step: {_step_line('gateway-sqlite', rig.shape.name, step)}")
    raw = out.read_text() if out.exists() else ""
    saved = RESULTS_DIR / f"profile-500x2-sqlite-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.txt"
    if raw:
        RESULTS_DIR.mkdir(exist_ok=True)
        saved.write_text(raw)
    return {"rate": plan.profile_rate, "seconds": plan.profile_s, "step": step, "raw_file":
            str(saved.relative_to(REPO)) if raw else None, **summary}


# --- report ------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


SYSTEM_NAMES = {"rabbitmq": "RabbitMQ Web-STOMP", "gateway-sqlite": "gateway, 1 node, SQLite",
                "gateway-2nodes-pg": "gateway, 2 nodes + Redis + PostgreSQL"}


def markdown(report: dict[str, Any]) -> str:
    curves = report["curves"]
    lines = [f"Run `{report['file']}` ({report['mode']}, {report['started_utc']}, {report['duration_s']:.0f} s; "
             f"load average at start {report['machine'].get('loadavg_at_start')}).", ""]
    lines += ["| shape | system | knee msg/s (deliveries/s) | knee / RabbitMQ | target | knee from schedule "
              "| p99 at knee ms | 2× knee: achieved msg/s (≥ 0.9 × knee?) | p99 at 1.5× / 2× ms (2× ≤ 1.5×?) "
              "| rows = sent |", "|---|---|---|---|---|---|---|---|---|---|"]
    targets = {("500x2", "gateway-sqlite"): 1.0, ("500x2", "gateway-2nodes-pg"): 0.75,
               ("10x100", "gateway-sqlite"): 1.5, ("10x100", "gateway-2nodes-pg"): 1.5}
    for shape in ("500x2", "10x100"):
        peer = curves.get(f"rabbitmq/{shape}", {}).get("knee_msgs_per_s")
        for system in ("rabbitmq", "gateway-sqlite", "gateway-2nodes-pg"):
            c = curves.get(f"{system}/{shape}")
            if c is None:
                continue
            subs = 2 if shape == "500x2" else 100
            knee = c.get("knee_msgs_per_s")
            ratio = knee / peer if knee is not None and peer else None
            target = targets.get((shape, system))
            target_text = "–" if target is None else (
                f"≥ {target:g}: " + ("met" if ratio is not None and ratio >= target else "**not met**"))
            knee_text = "none" if knee is None else f"{knee:,.0f} ({knee * subs:,.0f})"
            lines.append(
                f"| {shape} | {SYSTEM_NAMES[system]} | {knee_text} | {_fmt(ratio, 2)} | {target_text} | "
                f"{_fmt(c.get('knee_co_msgs_per_s'))} | {_fmt(c.get('knee_p99_ms'), 1)} | "
                f"{_fmt(c.get('at_2x_achieved_msgs_per_s'))} ({_fmt(c.get('check_2x_achieved_ge_0.9_knee'))}) | "
                f"{_fmt(c.get('at_1.5x_p99_ms'), 1)} / {_fmt(c.get('at_2x_p99_ms'), 1)} "
                f"({_fmt(c.get('check_2x_p99_le_1.5x_p99'))}) | "
                f"{'–' if system == 'rabbitmq' else _fmt(c.get('rows_ok'))} |"
                + (f" FAILURE: {c['failure']}" if c.get("failure") else ""))
    lines += ["", "Storage ceiling (`save_batch` driven directly, same database set-up, no gateway; stored "
              "messages/s and, in brackets, the median time of one batch's transaction):", "",
              "| database | writers | " + " | ".join(f"batch {b}" for b in report["plan"]["ceiling_batches"])
              + " |", "|---|---|" + "---|" * len(report["plan"]["ceiling_batches"])]
    for key, ceiling in report["ceilings"].items():
        if "sizes" not in ceiling:
            lines.append(f"| {key} | – | failed: {ceiling.get('failure', '')[:200]} |")
            continue
        cells = " | ".join(f"{s['messages_per_s']:,.0f} msg/s ({s['commit_p50_ms']} ms)" for s in ceiling["sizes"])
        lines.append(f"| {key} | {ceiling['writers']} | {cells} |")
    lines += ["", "One session, window of 64 SENDs awaiting receipts:", "",
              "| system | SENDs/s with receipts | receipt p50 / p99 ms |", "|---|---|---|"]
    for key, w in report["window64"].items():
        lines.append(f"| {key} | {_fmt(w.get('sends_per_s_with_receipts'))} | {_fmt(w.get('receipt_p50_ms'), 1)} / "
                     f"{_fmt(w.get('receipt_p99_ms'), 1)} |" + (f" FAILURE: {w['failure']}" if w.get("failure") else ""))
    lines += ["", "<details><summary>The curves: every step (offered and achieved in messages/s; deliveries = "
              "messages × subscribers per room; p99 from the write / from the schedule; lag = how far the "
              "publishers fell behind; CPU in cores; a failing step is followed by its retry)</summary>", ""]
    lines += ["| curve | offered | achieved | undelivered % | p50 ms | p99 ms | p99 from schedule ms | lag p99 ms "
              "| write pauses (s) | server CPU | generator CPU | other CPU | rows = sent | pass |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in curves.items():
        for s in sorted(c.get("steps", []), key=lambda s: s["offered_msgs_per_s"]):
            lines.append(
                f"| {key}{' (' + s['extra'] + ')' if s.get('extra') else ''}{' (retry)' if s.get('retry') else ''}"
                f" | {_fmt(s['offered_msgs_per_s'])} | "
                f"{_fmt(s['achieved_msgs_per_s'])} | {s['undelivered_pct']:.2f} | {_fmt(s['p50_ms'], 1)} | "
                f"{_fmt(s['p99_ms'], 1)} | {_fmt(s['sched_p99_ms'], 1)} | {_fmt(s['lag_p99_ms'], 1)} | "
                f"{s.get('publisher_pauses', '–')} ({_fmt(s.get('publisher_paused_s'), 1)}) | "
                f"{_fmt(s['server_cpu_util'], 2)} | {_fmt(s['client_cpu_util'], 2)} | {_fmt(s['other_cpu_util'], 2)} | "
                f"{'–' if s.get('rows_ok') is None else _fmt(s['rows_ok'])} | {'yes' if s['passed'] else 'no'} |")
    lines += ["", "</details>"]
    profile = report.get("profile")
    if profile and profile.get("samples"):
        step = profile["step"]
        lines += ["", f"Profile: py-spy --gil, 250 Hz, {profile['seconds']:g} s of the gateway (1 node, SQLite) during a "
                  f"500 × 2 step offered {profile['rate']:,.0f} msg/s (achieved {step['achieved_msgs_per_s']:,.0f}, "
                  f"p99 {step['p99_ms']} ms, server CPU {step['server_cpu_util']} cores, "
                  f"{_fmt(step.get('server_cpu_us_per_delivery'))} µs per delivery). {profile['samples']} samples "
                  f"holding the GIL, {profile['event_loop_samples']} on the event-loop thread; raw stacks: "
                  f"`{profile['raw_file']}`.", "",
                  "| event loop: self % | function | | event loop: total % | function |", "|---|---|---|---|---|"]
        for (s_name, s_pct), (t_name, t_pct) in zip(profile["self_event_loop"][:15], profile["total_event_loop"][:15],
                                                    strict=False):
            lines.append(f"| {s_pct} | `{s_name}` | | {t_pct} | `{t_name}` |")
        lines += ["", "Threads (share of busy samples): " + ", ".join(
            f"{k} {v}%" for k, v in list(profile["threads"].items())[:4])]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["curves"]
    shapes = [s for s in ("500x2", "10x100") if any(k.endswith("/" + s) for k in curves)]
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4.6 * len(shapes)), squeeze=False)
    styles = {"rabbitmq": ("tab:orange", "s"), "gateway-sqlite": ("tab:blue", "o"),
              "gateway-2nodes-pg": ("tab:green", "^")}
    for row, shape in enumerate(shapes):
        rate_ax, p99_ax = axes[row]
        top = 0.0
        for system, (color, marker) in styles.items():
            c = curves.get(f"{system}/{shape}")
            if not c or not c.get("steps"):
                continue
            steps = sorted((s for s in c["steps"] if not s.get("retried")), key=lambda s: s["offered_msgs_per_s"])
            xs = [s["offered_msgs_per_s"] for s in steps]
            top = max(top, *xs)
            rate_ax.plot(xs, [s["achieved_msgs_per_s"] for s in steps], marker=marker, color=color,
                         label=SYSTEM_NAMES[system])
            p99_ax.plot(xs, [s["p99_ms"] or float("nan") for s in steps], marker=marker, color=color,
                        label=f"{SYSTEM_NAMES[system]} (from write)")
            p99_ax.plot(xs, [s["sched_p99_ms"] or float("nan") for s in steps], linestyle=":", color=color,
                        label=f"{SYSTEM_NAMES[system]} (from schedule)")
            knee = c.get("knee_msgs_per_s")
            if knee:
                for ax in (rate_ax, p99_ax):
                    ax.axvline(knee, color=color, linestyle="--", linewidth=0.8)
        rate_ax.plot([0, top], [0, top], color="grey", linewidth=0.6, label="achieved = offered")
        rate_ax.set_title(f"{shape}: achieved vs offered (dashed: knee)")
        rate_ax.set_xlabel("offered messages/s")
        rate_ax.set_ylabel("achieved messages/s")
        rate_ax.legend(fontsize=7)
        rate_ax.grid(alpha=0.3)
        p99_ax.axhline(P99_LIMIT_MS, color="red", linewidth=0.6)
        p99_ax.set_yscale("log")
        p99_ax.set_title(f"{shape}: p99 latency vs offered (red: 100 ms)")
        p99_ax.set_xlabel("offered messages/s")
        p99_ax.set_ylabel("p99 ms (log)")
        p99_ax.legend(fontsize=6)
        p99_ax.grid(alpha=0.3)
    fig.suptitle(f"chat path, stepped open-loop rates ({report['file']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def write_docs_block(text: str) -> bool:
    page = DOCS_PAGE.read_text()
    if BLOCK_BEGIN not in page or BLOCK_END not in page:
        return False
    head, rest = page.split(BLOCK_BEGIN, 1)
    _, tail = rest.split(BLOCK_END, 1)
    DOCS_PAGE.write_text(f"{head}{BLOCK_BEGIN}\n{text}\n{BLOCK_END}{tail}")
    return True


async def main_async(args: Any, tree: Path) -> int:
    plan = QUICK if args.quick else FULL
    if args.curve_step_s:
        plan = CurvePlan(**{**plan.__dict__, "step_s": args.curve_step_s})
    if args.curve_rates:
        factor = [float(x) for x in args.curve_rates.split(",")]
        plan = CurvePlan(**{**plan.__dict__, "shapes": tuple(
            Shape(s.name, s.rooms, s.subs_per_room, s.publishers,
                  tuple(r for r in factor) if s.name == "500x2" else tuple(r / 10 for r in factor))
            for s in plan.shapes)})
    if args.profile_rate:
        plan = CurvePlan(**{**plan.__dict__, "profile_rate": args.profile_rate})
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    mode = "curve-quick" if args.quick else "curve-full"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else RESULTS_DIR / f"{mode}-{stamp}.json"
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python -m bench.run", *sys.argv[1:]]),
        "mode": mode, "file": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
        "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plan": {**asdict(plan), "shapes": [asdict(s) for s in plan.shapes]},
        "gateway_tree": str(tree), "machine": machine_info(),
    }
    log(f"machine: {report['machine']}")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="chat-gateway-curve-") as tmp:
        report.update(await run_all(plan, args, log, Path(tmp), tree))
    report["duration_s"] = round(time.monotonic() - started, 1)
    for curve in report["curves"].values():
        curve.pop("rooms", None)
    RESULTS_DIR.mkdir(exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    tmp_out.replace(out)
    text = markdown(report)
    print()
    print(text)
    png = Path(args.plot) if args.plot else (DOCS / "bench-chat-curve.png" if not args.quick
                                             else RESULTS_DIR / f"{mode}-{stamp}.png")
    try:
        plot(report, png)
        print(f"\nplot: {png}")
    except ImportError as exc:
        print(f"\nno plot: {exc}")
    if not args.quick and not args.no_docs:
        block = text
        if png.resolve().parent == DOCS.resolve():
            block = f"![Achieved rate and p99 against offered rate, {report['file']}]({png.name})\n\n{text}"
        print("docs/benchmarks.md block updated" if write_docs_block(block)
              else "docs/benchmarks.md has no generated block; not updated")
    print(f"results: {out} ({report['duration_s']} s)")
    failures = [f"{k}: {c['failure']}" for k, c in report["curves"].items() if c.get("failure")]
    for failure in failures:
        print(f"FAILED CURVE {failure}")
    return 1 if failures else 0
