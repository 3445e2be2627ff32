"""The processes a benchmark drives: gateway nodes, a private redis-server, the RabbitMQ peer, databases.

Owns: starting ``chat-gateway`` (``migrate`` then ``serve``) as a child process on a free loopback
port and stopping it; bringing RabbitMQ up with the Web-STOMP plugin (``rabbitmq-server -detached``
after raising the open-files limit, ``rabbitmq-plugins enable rabbitmq_web_stomp``; both idempotent,
root needed) or explaining why the peer is unavailable; reading a process's CPU time from /proc;
describing the machine; the chat scenarios' databases (a SQLite file, or a throw-away database on
the local PostgreSQL server, created and dropped here).

Only 127.0.0.1 is ever bound or contacted. Imports nothing from the gateway (it runs as a child
process); processes and databases come from the test suite's helpers in ``tests.support``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from tests.support import postgres
from tests.support.gateway_process import GatewayProcess
from tests.support.net import free_port
from tests.support.redis_server import RedisServer, RedisServerMissing

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
RABBIT_WEB_STOMP_PORT = 15674
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

__all__ = ["HOST", "GatewayNode", "PeerUnavailable", "PostgresDatabase", "RabbitPeer", "RedisServer",
           "RedisServerMissing", "SqliteDatabase",
           "cpu_seconds", "free_port", "machine_busy_seconds",
           "machine_info"]


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds the process has used so far (None if it is gone or unknown)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (all cores, from /proc/stat)."""
    try:
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return 0.0
    ticks = [int(x) for x in line.split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / _CLOCK_TICKS


def _wait_port(port: int, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


@dataclass
class GatewayNode:
    """One ``chat-gateway serve`` child process: the test suite's GatewayProcess, run with this
    interpreter from ``tree`` (so ``--gateway-tree`` can benchmark another checkout's package)."""

    database_url: str
    redis_url: str | None = None
    allow_client_broker_send: bool = True
    extra_args: tuple[str, ...] = ()
    tree: Path = REPO              # the checkout whose ``gateway`` package runs (``-m`` puts cwd first)
    env: dict[str, str] = field(default_factory=dict)  # GATEWAY_* settings (a gateway ignores unknown ones)
    process: GatewayProcess | None = None

    @property
    def ws_url(self) -> str:
        return self._running().ws_url

    @property
    def http_url(self) -> str:
        return self._running().url

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _running(self) -> GatewayProcess:
        if self.process is None:
            raise RuntimeError("gateway node not started")
        return self.process

    @staticmethod
    def migrate(database_url: str, tree: Path = REPO) -> None:
        """``chat-gateway migrate`` with the migrations of ``tree``'s gateway package."""
        subprocess.run([sys.executable, "-m", "gateway.cli", "migrate", "--database-url", database_url],
                       check=True, cwd=tree, stdout=subprocess.DEVNULL, timeout=120)

    def start(self, log_dir: Path) -> GatewayNode:
        settings: dict[str, object] = {
            "host": HOST, "database_url": self.database_url, "log_level": "warning",
            "allow_client_broker_send": self.allow_client_broker_send, "drain_timeout_s": 2}
        if self.redis_url is not None:
            settings["redis_url"] = self.redis_url
        port = free_port()
        workdir = log_dir / f"gateway-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = GatewayProcess(settings, env=self.env, port=port, workdir=workdir, migrate=False,
                                      args=self.extra_args, launcher=[sys.executable, "-m", "gateway.cli"],
                                      cwd=self.tree)
        try:
            self.process.start(timeout=30)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"gateway did not start: {exc}") from None
        return self

    def create_room(self, name: str) -> str:
        data = f"name={name}".encode()
        request = urllib.request.Request(f"{self.http_url}/chat/room", data=data, method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["roomId"])

    def log_tail(self, chars: int = 2000) -> str:
        return self.process.log_text()[-chars:] if self.process is not None else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None


class PeerUnavailable(RuntimeError):
    """RabbitMQ (or its Web-STOMP plugin) cannot be used; the message says why."""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class RabbitPeer:
    """The RabbitMQ broker with its Web-STOMP plugin, used as the reference in the same run."""

    port: int = RABBIT_WEB_STOMP_PORT
    login: str = "guest"
    passcode: str = "guest"
    version: str = ""
    pid: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def ensure(self, min_open_files: int = 0) -> RabbitPeer:
        """Start RabbitMQ if needed, enable Web-STOMP, wait for its port; raise PeerUnavailable.

        With ``min_open_files``, a running broker whose open-files limit (soft) is lower is restarted
        with a raised limit (root needed): Debian's wrapper starts it through ``su``, which resets the
        limit to 1024, so the restart drops privileges with ``setpriv`` instead (no PAM session).
        """
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            raise PeerUnavailable("RabbitMQ is not installed (no rabbitmq-server/rabbitmqctl on PATH)")
        running = _run(["rabbitmqctl", "status"], 60).returncode == 0
        if running and min_open_files and (self._open_files_limit() or 0) < min_open_files:
            if os.geteuid() != 0:
                raise PeerUnavailable(f"RabbitMQ's open-files limit is below {min_open_files} and "
                                      "restarting it with a higher one needs root")
            self.notes.append(f"RabbitMQ was running with an open-files limit below {min_open_files}; "
                              "restarted with a raised limit")
            _run(["rabbitmqctl", "stop"], 120)
            running = False
        if not running:
            if os.geteuid() != 0:
                raise PeerUnavailable("RabbitMQ is not running and starting it needs root")
            self._start_detached(max(min_open_files, 20000))
            waited = _run(["rabbitmqctl", "await_startup", "--timeout", "90"], 120)
            if waited.returncode != 0:
                raise PeerUnavailable(f"RabbitMQ did not start: {waited.stderr.strip()[-500:]}")
        enabled = _run(["rabbitmq-plugins", "enable", "rabbitmq_web_stomp"], 120)
        if enabled.returncode != 0:
            raise PeerUnavailable(f"could not enable rabbitmq_web_stomp: {enabled.stderr.strip()[-500:]}")
        if not _wait_port(self.port, 30):
            raise PeerUnavailable(f"RabbitMQ Web-STOMP is not listening on {HOST}:{self.port}")
        version = _run(["rabbitmqctl", "version"], 60)
        self.version = version.stdout.strip() if version.returncode == 0 else "unknown"
        pid = _run(["rabbitmqctl", "eval", "os:getpid()."], 60)
        match = re.search(r"\d+", pid.stdout)
        self.pid = int(match.group()) if match else None
        limits = Path(f"/proc/{self.pid}/limits") if self.pid else None
        if limits is not None and limits.exists():
            for line in limits.read_text().splitlines():
                if line.startswith("Max open files"):
                    self.notes.append(f"RabbitMQ process limit: {' '.join(line.split()[3:5])} open files "
                                      "(soft, hard); the benchmarks keep well under it")
        return self

    def _open_files_limit(self) -> int | None:
        pid = _run(["rabbitmqctl", "eval", "os:getpid()."], 60)
        match = re.search(r"\d+", pid.stdout)
        if not match:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{match.group()}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return None

    def _start_detached(self, open_files: int) -> None:
        hard = open_files
        with contextlib.suppress(ValueError, OSError):
            import resource
            hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            if hard_limit != resource.RLIM_INFINITY:
                hard = min(open_files, hard_limit)
        inner = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        if shutil.which("setpriv") and Path(inner).exists() and _run(["id", "rabbitmq"], 10).returncode == 0:
            command = (f"ulimit -n {hard} && cd /var/lib/rabbitmq && exec setpriv --reuid=rabbitmq "
                       f"--regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq {inner} -detached")
            how = f"`setpriv` as user rabbitmq after `ulimit -n {hard}`"
        else:
            command = f"ulimit -n {hard} && rabbitmq-server -detached"
            how = f"`rabbitmq-server -detached` after `ulimit -n {hard}`"
        self.notes.append(f"RabbitMQ started with {how}")
        subprocess.run(["bash", "-c", command], check=False, timeout=60, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def machine_info() -> dict[str, object]:
    """nproc, CPU model, memory, Python and kernel versions, load average at the start."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem_gib = round(mem_kib / 1024 / 1024, 1)
    packages: dict[str, str] = {}
    from importlib.metadata import PackageNotFoundError, version
    for name in ("websockets", "uvicorn", "starlette", "uvloop", "httptools", "redis", "sqlalchemy",
                 "aiosqlite"):
        with contextlib.suppress(PackageNotFoundError):
            packages[name] = version(name)
    redis_version = ""
    redis_bin = shutil.which("redis-server")
    if redis_bin:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            redis_version = _run([redis_bin, "--version"], 10).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "packages": packages,
        "redis_server": redis_version,
    }


# --- databases of the chat scenarios ---------------------------------------------------------------



@dataclass
class SqliteDatabase:
    """A SQLite file in the benchmark's temporary directory."""

    path: Path
    kind: str = "sqlite"

    @property
    def url(self) -> str:
        return f"sqlite+aiosqlite:///{self.path}"

    async def setup(self, tree: Path = REPO) -> SqliteDatabase:
        GatewayNode.migrate(self.url, tree)
        return self

    async def talk_rows(self, room_id: str) -> int:
        import sqlite3
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db:
            row = db.execute("SELECT count(*) FROM messages WHERE room_id = ? AND type = 'TALK'",
                             (room_id,)).fetchone()
        return int(row[0])

    async def drop(self) -> None:
        return None


@dataclass
class PostgresDatabase:
    """A throw-away database on the local PostgreSQL server (tests.support.postgres), dropped afterwards."""

    name: str = ""
    kind: str = "postgresql"

    @property
    def url(self) -> str:
        return postgres.async_url(self.name)

    async def setup(self, tree: Path = REPO) -> PostgresDatabase:
        """CREATE DATABASE and migrate; raises RuntimeError if the server is not on loopback."""
        host = postgres.ADMIN_URL.split("@")[-1].split("/")[0].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise RuntimeError(f"PostgreSQL at {host} is not on the loopback interface")
        self.name = await postgres.create_database()
        GatewayNode.migrate(self.url, tree)
        return self

    async def talk_rows(self, room_id: str) -> int:
        conn = await asyncpg.connect(postgres.plain_url(self.name), timeout=10)
        try:
            value = await conn.fetchval("SELECT count(*) FROM messages WHERE room_id = $1 AND type = 'TALK'",
                                        room_id)
        finally:
            await conn.close()
        return int(value)

    async def drop(self) -> None:
        if self.name:
            with contextlib.suppress(Exception):
                await postgres.drop_database(self.name)
