"""``python -m bench.metrics_dashboard``: the Grafana dashboard rendered from a real run, without Grafana.

Owns: a short scripted run of a real two-node fleet (two ``chat-gateway serve`` processes sharing a
private redis-server and one SQLite file), a chat load on it (subscribers and paced senders in several
rooms on both nodes, plus a burst of refused frames, a SEND burst over the rate limit and a Redis
outage with its restart), a scrape of both nodes' ``/metrics`` every second, and the rendering of
``deploy/grafana-dashboard.json``'s panels with matplotlib to ``docs/grafana-dashboard.png``.

The panels' PromQL is evaluated here by :func:`evaluate`, a small evaluator of the subset the
dashboard uses (``sum``/``sum by``, ``rate``/``increase`` over a range, ``histogram_quantile``, one
``/`` between two sums, label matchers with ``$instance``), so the picture shows the dashboard's own
queries over the scraped samples; ``$__rate_interval`` is :data:`RATE_WINDOW_S`. Grafana itself is not
available here (docs/operations.md#metrics).

Usage: ``make dashboard`` (or ``.venv/bin/python -m bench.metrics_dashboard [--duration 60] [--out PATH]``).
Needs redis-server and the ``bench`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_process import REPO, GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.stomp_wire import WsStompClient, frame

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
PNG = REPO / "docs" / "grafana-dashboard.png"
RATE_WINDOW_S = 5.0
SCRAPE_INTERVAL_S = 1.0

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]


# --- samples --------------------------------------------------------------------------------------


@dataclass
class Scrape:
    """Every sample of every node at one moment (an ``instance`` label tells the nodes apart)."""

    t: float
    samples: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)

    def add(self, text: str, instance: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = frozenset({**sample.labels, "instance": instance}.items())
                self.samples.setdefault(sample.name, []).append((labels, sample.value))


# --- the PromQL subset ------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<name>[A-Za-z_$][A-Za-z0-9_:$]*)|(?P<str>"[^"]*")'
                    r'|(?P<op>=~|!=|[(){}\[\],/=]))')


def _tokens(expr: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        found = _TOKEN.match(expr, pos)
        if found is None:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        out.append(found.group(0).strip())
        pos = found.end()
    return out


Node = tuple[Any, ...]


class _Parser:
    """expr := term ['/' term]; term := sum [by (labels)] (expr) | rate|increase (selector[range])
    | histogram_quantile(number, expr) | selector."""

    def __init__(self, expr: str) -> None:
        self.tokens = _tokens(expr)
        self.pos = 0
        self.expr = expr

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more'} at token {self.pos} of {self.expr!r}")
        self.pos += 1
        return token

    def parse(self) -> Node:
        node = self.expression()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r} in {self.expr!r}")
        return node

    def expression(self) -> Node:
        left = self.term()
        if self.peek() == "/":
            self.take("/")
            return ("div", left, self.term())
        return left

    def term(self) -> Node:
        name = self.take()
        if name == "sum":
            by: tuple[str, ...] | None = None
            if self.peek() == "by":
                self.take("by")
                by = self.label_list()
            self.take("(")
            inner = self.expression()
            self.take(")")
            return ("sum", by, inner)
        if name in ("rate", "increase"):
            self.take("(")
            selector = self.selector(self.take())
            self.take("[")
            while self.peek() != "]":
                self.take()
            self.take("]")
            self.take(")")
            return (name, selector)
        if name == "histogram_quantile":
            self.take("(")
            q = float(self.take())
            self.take(",")
            inner = self.expression()
            self.take(")")
            return ("quantile", q, inner)
        return self.selector(name)

    def label_list(self) -> tuple[str, ...]:
        self.take("(")
        names = [self.take()]
        while self.peek() == ",":
            self.take(",")
            names.append(self.take())
        self.take(")")
        return tuple(names)

    def selector(self, metric: str) -> Node:
        matchers: list[tuple[str, str, str]] = []
        if self.peek() == "{":
            self.take("{")
            while self.peek() != "}":
                label, op, text = self.take(), self.take(), self.take()
                matchers.append((label, op, text.strip('"')))
                if self.peek() == ",":
                    self.take(",")
            self.take("}")
        return ("select", metric, tuple(matchers))


def parse_promql(expr: str) -> Node:
    return _Parser(expr).parse()


def metric_names(node: Node) -> set[str]:
    """The sample names an expression reads (``_bucket``/``_sum``/``_count`` included)."""
    kind = node[0]
    if kind == "select":
        return {node[1]}
    if kind in ("rate", "increase"):
        return metric_names(node[1])
    if kind in ("sum", "quantile"):
        return metric_names(node[2])
    return metric_names(node[1]) | metric_names(node[2])


def _matches(labels: Labels, matchers: tuple[tuple[str, str, str], ...], variables: dict[str, str]) -> bool:
    values = dict(labels)
    for label, op, text in matchers:
        for name, replacement in variables.items():
            text = text.replace("$" + name, replacement)
        have = values.get(label, "")
        if op == "=" and have != text:
            return False
        if op == "!=" and have == text:
            return False
        if op == "=~" and re.fullmatch(text, have) is None:
            return False
    return True


def _select(scrape: Scrape, node: Node, variables: dict[str, str]) -> Vector:
    _, metric, matchers = node
    return {labels: v for labels, v in scrape.samples.get(metric, []) if _matches(labels, matchers, variables)}


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over one series' (upper bound, cumulative count) buckets."""
    buckets.sort()
    if not buckets or buckets[-1][0] != math.inf:
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == math.inf:
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def evaluate(node: Node, timeline: list[Scrape], i: int, variables: dict[str, str] | None = None,
             window_s: float = RATE_WINDOW_S) -> Vector:
    """The instant vector of ``node`` at ``timeline[i]``."""
    variables = variables if variables is not None else {"instance": ".*"}
    kind = node[0]
    if kind == "select":
        return _select(timeline[i], node, variables)
    if kind in ("rate", "increase"):
        now = timeline[i]
        j = i
        while j > 0 and now.t - timeline[j - 1].t <= window_s + 1e-6:
            j -= 1
        if j == i:
            return {}
        then = timeline[j]
        elapsed = now.t - then.t
        before = _select(then, node[1], variables)
        out: Vector = {}
        for labels, v in _select(now, node[1], variables).items():
            old = before.get(labels)
            if old is None:
                continue
            grown = v - old if v >= old else v   # a counter reset (process restart)
            out[labels] = grown / elapsed if kind == "rate" else grown
        return out
    if kind == "sum":
        _, by, inner = node
        out = {}
        for labels, v in evaluate(inner, timeline, i, variables, window_s).items():
            group = frozenset((k, val) for k, val in labels if by is not None and k in by)
            out[group] = out.get(group, 0.0) + v
        return out
    if kind == "quantile":
        _, q, inner = node
        series: dict[Labels, list[tuple[float, float]]] = {}
        for labels, v in evaluate(inner, timeline, i, variables, window_s).items():
            le = dict(labels).get("le")
            if le is None:
                continue
            rest = frozenset((k, val) for k, val in labels if k != "le")
            series.setdefault(rest, []).append((float(le), v))
        return {labels: _quantile(q, buckets) for labels, buckets in series.items()}
    if kind == "div":
        left = evaluate(node[1], timeline, i, variables, window_s)
        right = evaluate(node[2], timeline, i, variables, window_s)
        return {labels: v / right[labels] for labels, v in left.items() if right.get(labels)}
    raise ValueError(f"unknown node {kind}")


def legend(template: str, labels: Labels) -> str:
    values = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), template)


# --- rendering -------------------------------------------------------------------------------------

_PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#FADE2A",
            "#96D98D", "#FFB357", "#CA95E5", "#C0D8FF"]


@dataclass
class Event:
    start: float
    end: float
    label: str


def _format_value(unit: str) -> Callable[[float, Any], str]:
    def fmt(value: float, _pos: Any) -> str:
        if unit == "s":
            if value == 0:
                return "0"
            return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"
        suffix = "/s" if unit == "ops" else ""
        if abs(value) >= 1000:
            return f"{value / 1000:.3g}k{suffix}"
        return f"{value:.3g}{suffix}"
    return fmt


def render(dashboard: dict[str, Any], timeline: list[Scrape], events: list[Event], out: Path,
           subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_w, unit_h = 0.85, 0.36
    head = 1.0
    width, height = 24 * unit_w, rows * unit_h + head
    fig = plt.figure(figsize=(width, height), facecolor="#111217")
    fig.text(0.01, 1 - 0.35 / height, dashboard["title"], color="#ccccdc", fontsize=16, weight="bold", va="top")
    fig.text(0.01, 1 - 0.75 / height, subtitle, color="#8e8e9e", fontsize=9, va="top")
    t0 = timeline[0].t
    xs = [s.t - t0 for s in timeline]
    for panel in panels:
        pos = panel["gridPos"]
        pad_x, pad_y = 0.55 / width, 0.55 / height
        left = pos["x"] * unit_w / width + pad_x
        bottom = 1 - (head + (pos["y"] + pos["h"]) * unit_h) / height + pad_y * 1.3
        ax = fig.add_axes((left, bottom, pos["w"] * unit_w / width - 1.6 * pad_x,
                           pos["h"] * unit_h / height - 2.4 * pad_y))
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#8e8e9e", labelsize=7)
        ax.grid(color="#2c3235", linewidth=0.5)
        ax.set_title(panel["title"], color="#ccccdc", fontsize=10, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(_format_value(unit)))
        for event in events:
            ax.axvspan(event.start, max(event.end, event.start + 0.5), color="#F2495C", alpha=0.12, linewidth=0)
        color = 0
        top = 0.0
        for target in panel["targets"]:
            node = parse_promql(target["expr"])
            lines: dict[Labels, list[float]] = {}
            for i in range(len(timeline)):
                for labels, v in evaluate(node, timeline, i).items():
                    lines.setdefault(labels, [math.nan] * len(timeline))[i] = v
            for labels in sorted(lines, key=lambda ls: sorted(ls)):
                ys = lines[labels]
                if all(math.isnan(y) or y == 0 for y in ys):
                    continue   # Grafana draws it flat at zero; here it only crowds the legend
                top = max([top, *(y for y in ys if not math.isnan(y))])
                ax.plot(xs, ys, color=_PALETTE[color % len(_PALETTE)], linewidth=1.2,
                        label=legend(target.get("legendFormat", ""), labels) or target["refId"])
                color += 1
        if color == 0:
            ax.text(0.5, 0.5, "no data (all zero)", color="#8e8e9e", fontsize=8, ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylim(0, top * 1.35 if top > 0 else 1)   # headroom for the legend
        ax.set_xlim(0, xs[-1])
        ax.set_xlabel("s", color="#8e8e9e", fontsize=7, labelpad=1)
        if color:
            leg = ax.legend(fontsize=6.5, loc="upper left", frameon=False, ncol=min(color, 4))
            for text in leg.get_texts():
                text.set_color("#ccccdc")
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)


# --- the run ---------------------------------------------------------------------------------------

SEND_HEADERS = {"destination": "/pub/chat/message", "content-type": "application/json"}


def chat_send(room: str, text: str, receipt: str | None = None) -> bytes:
    headers = dict(SEND_HEADERS)
    if receipt is not None:
        headers["receipt"] = receipt
    return frame("SEND", headers, json.dumps({"type": "TALK", "roomId": room, "message": text}))


async def _connect(url: str, headers: dict[str, str] | None = None) -> WsStompClient:
    ws = await WsStompClient.open(url, max_queue=None)
    await ws.send_frame("CONNECT", {"accept-version": "1.2", "host": "x", "heart-beat": "0,0", **(headers or {})})
    return ws


async def _drain(ws: WsStompClient) -> None:
    """Read and drop everything (the raw socket: no parsing cost in the load generator)."""
    with contextlib.suppress(Exception):
        while True:
            await ws.ws.recv()


@dataclass
class Load:
    nodes: list[GatewayProcess]
    rooms: list[str]
    subscribers_per_room_node: int
    rate_per_sender: float
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    clients: list[WsStompClient] = field(default_factory=list)
    stopping: bool = False

    async def start(self) -> None:
        for node in self.nodes:
            for room in self.rooms:
                for k in range(self.subscribers_per_room_node):
                    ws = await _connect(node.ws_url)
                    await ws.send_frame("SUBSCRIBE", {"id": f"s{k}", "destination": f"/sub/chat/room/{room}"})
                    self.clients.append(ws)
                    self.tasks.append(asyncio.create_task(_drain(ws)))
        for node in self.nodes:
            for room in self.rooms:
                ws = await _connect(node.ws_url)
                self.clients.append(ws)
                self.tasks.append(asyncio.create_task(_drain(ws)))
                self.tasks.append(asyncio.create_task(self._send(ws, room)))

    async def _send(self, ws: WsStompClient, room: str) -> None:
        n = 0
        interval = 1 / self.rate_per_sender
        next_at = time.monotonic()
        with contextlib.suppress(Exception):
            while not self.stopping:
                n += 1
                await ws.send(chat_send(room, f"hello {n}", f"r{n}"))
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        self.stopping = True
        for ws in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def refused_frames(node: GatewayProcess) -> None:
    """ERRORs of several reasons: an unknown room, protocol violations, a reserved login."""
    for k in range(3):
        ws = await _connect(node.ws_url)
        await ws.send(chat_send("00000000-0000-0000-0000-000000000000", "x", f"bad{k}"))
        await ws.closed(10)
        ws = await _connect(node.ws_url)
        await ws.send(b"SEND\ncontent-length:nope\n\n\x00")
        await ws.closed(10)
        ws = await _connect(node.ws_url, {"login": "[알림]"})
        await ws.closed(10)


async def over_the_rate_limit(node: GatewayProcess, room: str, count: int) -> None:
    """One session sends ``count`` SENDs at once: the bucket's burst passes, the rest are refused."""
    ws = await _connect(node.ws_url)
    await ws.send(b"".join(chat_send(room, f"burst {k}", f"b{k}") for k in range(count)))
    answered = 0
    with contextlib.suppress(Exception):   # closed after repeated refusals, or all answered
        while answered < count:
            answered += (await ws.next_frame(30)).command in ("RECEIPT", "ERROR")
    with contextlib.suppress(Exception):
        await ws.close()


def scrape_all(nodes: list[GatewayProcess], names: list[str]) -> Scrape:
    scrape = Scrape(time.monotonic())
    for node, name in zip(nodes, names, strict=True):
        with contextlib.suppress(httpx.HTTPError):
            scrape.add(httpx.get(node.url + "/metrics", timeout=5).text, name)
    return scrape


async def run(duration_s: float, workdir: Path, log: Callable[[str], None]) -> tuple[list[Scrape], list[Event]]:
    timeline: list[Scrape] = []
    events: list[Event] = []
    with RedisServer() as redis:
        db = workdir / "chat.db"
        url = f"sqlite+aiosqlite:///{db}"
        names = ["node1", "node2"]
        # Every client comes from 127.0.0.1 and the anonymous mode's SEND bucket is the address's: a
        # rate over what the paced senders use, and a burst the one burst below goes over.
        nodes = [GatewayProcess({"database_url": url, "redis_url": redis.url, "node_id": name,
                                 "log_level": "warning", "db_busy_timeout_s": 60, "drain_timeout_s": 2,
                                 "send_rate_per_s": 400, "send_burst": 300},
                                workdir=workdir / name, migrate=(k == 0))
                 for k, name in enumerate(names)]
        for node in nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for node in nodes:
                node.start(timeout=60)
                node.wait_ready(60)
            async with httpx.AsyncClient(base_url=nodes[0].url) as http:
                rooms = [str((await http.post("/chat/room", data={"name": f"room {k}"})).json()["roomId"])
                         for k in range(4)]
            load = Load(nodes, rooms, subscribers_per_room_node=3, rate_per_sender=10)
            log(f"fleet up ({len(nodes)} nodes, Redis {redis.url}); load: {len(rooms)} rooms, "
                f"{load.subscribers_per_room_node * len(nodes) * len(rooms)} subscribers, "
                f"{len(nodes) * len(rooms)} senders at {load.rate_per_sender:g}/s")
            start = time.monotonic()

            async def scraper() -> None:
                while True:
                    timeline.append(await asyncio.to_thread(scrape_all, nodes, names))
                    await asyncio.sleep(max(0.0, SCRAPE_INTERVAL_S - (time.monotonic() - timeline[-1].t)))

            scraping = asyncio.create_task(scraper())
            await asyncio.sleep(3)
            await load.start()

            async def at(fraction: float) -> float:
                await asyncio.sleep(max(0.0, start + duration_s * fraction - time.monotonic()))
                return time.monotonic() - start

            t = await at(0.2)
            log(f"{t:5.1f}s refused frames")
            await refused_frames(nodes[1])
            events.append(Event(t, time.monotonic() - start, "refused frames"))
            t = await at(0.35)
            log(f"{t:5.1f}s a SEND burst over the rate limit")
            await over_the_rate_limit(nodes[0], rooms[0], 700)
            events.append(Event(t, time.monotonic() - start, "rate-limit burst"))
            t = await at(0.55)
            log(f"{t:5.1f}s Redis killed")
            redis.kill()
            await asyncio.sleep(duration_s * 0.1)
            redis.restart()
            events.append(Event(t, time.monotonic() - start, "Redis down"))
            log(f"{time.monotonic() - start:5.1f}s Redis restarted")
            await at(0.95)
            await load.stop()
            await at(1.0)
            scraping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraping
        finally:
            for node in nodes:
                node.cleanup()
    shift = start - timeline[0].t   # events were timed from the load's start, the x axis from the first scrape
    for event in events:
        event.start += shift
        event.end += shift
    return timeline, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--out", type=Path, default=PNG, help=f"the PNG to write (default {PNG})")
    args = parser.parse_args(argv)
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in dashboard_exprs(dashboard):
        parse_promql(expr)   # fail before the run, not after it

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="metrics-dashboard-") as tmp:
        timeline, events = asyncio.run(run(args.duration, Path(tmp), log))
    render(dashboard, timeline, events, args.out,
           f"rendered with matplotlib from {len(timeline)} scrapes of /metrics (every {SCRAPE_INTERVAL_S:g} s) "
           f"of a real 2-node fleet (chat-gateway serve x2, redis-server, SQLite) by bench/metrics_dashboard.py; "
           f"$__rate_interval = {RATE_WINDOW_S:g} s; shaded: "
           + ", ".join(e.label for e in events))
    log(f"wrote {args.out}")
    return 0


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every query of the dashboard's panels."""
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield target["expr"]


if __name__ == "__main__":
    sys.exit(main())
