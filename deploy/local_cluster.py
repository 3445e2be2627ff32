"""The production topology on one machine, without Docker: nginx -> N gateway nodes -> one Redis, one DB.

Owns: starting and stopping a real ``nginx`` (from apt, run as a non-daemon child with its own prefix
directory and config in a temporary directory), a real ``redis-server``, and N ``chat-gateway serve``
processes on free loopback ports against one database (an SQLite file in the work directory unless a
``database_url`` is given), migrated once before the nodes start. nginx runs ``deploy/nginx.conf`` itself,
rewritten only where a laptop differs from the compose network (see :func:`local_nginx_conf`).

As a module (tests)::

    with LocalCluster(nodes=2) as cluster:
        cluster.url                      # http://127.0.0.1:<port> (nginx)
        cluster.nodes[0].node_id         # "node1"
        cluster.kill_node(0)             # SIGKILL, as a crash would
        cluster.start_node(0)            # same port and node id again
        cluster.swap_node(0)             # zero-downtime replacement: nginx `down` + reload, drain, new process
        cluster.rolling_restart()        # swap_node for every node, one after the other

As a command (humans): ``deploy/local-cluster start [--nodes N] [--port P] [--detach]``, then
``deploy/local-cluster stop`` (or Ctrl-C in the foreground). ``status`` prints the running cluster.
``deploy/rolling-restart`` (``rolling-restart`` here) asks the running cluster process, over a Unix
socket in its work directory, to do :meth:`LocalCluster.rolling_restart` and prints its progress.

Imports nothing from the gateway (it drives it as separate processes). Its redis-server and gateway
processes, ports and HTTP checks come from ``tests.support`` (:class:`~tests.support.redis_server.RedisServer`,
:class:`~tests.support.gateway_process.GatewayProcess`, :mod:`tests.support.net`): one launcher for the
tests, the benchmarks and this cluster. It runs from a checkout (``python -m deploy.local_cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.support.gateway_process import GatewayProcess
from tests.support.net import HOST, free_port, http_request
from tests.support.redis_server import RedisServer, RedisServerError

REPO_ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
STATE_FILE = Path(tempfile.gettempdir()) / f"chat-gateway-local-cluster-{os.getuid()}.json"


class ClusterError(RuntimeError):
    """A process of the cluster did not start, or a tool is missing."""


def find_executable(name: str, *, install: bool = False, package: str | None = None) -> str:
    """The path of ``name`` (also looking in /usr/sbin); installed with apt-get when asked and root."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    package = package or name
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"local-cluster: installing {package} with apt-get", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return find_executable(name)
    raise ClusterError(f"{name} is not installed: run `apt-get install {package}` (or `make system-deps`)")


def http_get(url: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET (never through a proxy); (0, b"") when nothing answers."""
    try:
        return http_request(url, timeout=timeout_s)
    except (OSError, ValueError):
        return 0, b""


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


# --- nginx config ----------------------------------------------------------------------------------

_SERVER_LINE = re.compile(r"^(\s*)server\s+(\S+)((?:\s+[^;]+)?);\s*$")


def local_nginx_conf(template: str, *, listen: str, upstreams: Sequence[str], prefix: Path,
                     workers: int = 1, down: Collection[str] = ()) -> str:
    """``deploy/nginx.conf`` for this machine: only the machine-specific directives are rewritten.

    ``listen`` -> ``listen``; the upstream ``chat_gateway``'s ``server`` lines -> one per address in
    ``upstreams`` (keeping their parameters); log files (keeping level and format), pid and temp
    paths -> under ``prefix``;
    ``worker_processes`` -> ``workers``. Raises ValueError when the template lacks one of them, so a
    change to deploy/nginx.conf that the local cluster would silently not follow fails loudly.
    """
    out: list[str] = [f"pid {prefix}/nginx.pid;"]
    seen = {"listen": 0, "upstream": 0, "http": 0}
    in_upstream = False
    for line in template.splitlines():
        stripped = line.strip()
        indent = line[:len(line) - len(line.lstrip())]
        directive = stripped.split(None, 1)[0] if stripped and not stripped.startswith("#") else ""
        if directive == "pid":
            continue
        if directive == "worker_processes":
            out.append(f"{indent}worker_processes {workers};")
            continue
        if directive in ("error_log", "access_log"):
            args = stripped.rstrip(";").split()[2:]  # keep the level / format, move the file
            name = "error.log" if directive == "error_log" else "access.log"
            out.append(f"{indent}{directive} {' '.join([f'{prefix}/logs/{name}', *args])};")
            continue
        if directive == "listen":
            seen["listen"] += 1
            out.append(f"{indent}listen {listen};")
            continue
        if directive == "upstream" and stripped.startswith("upstream chat_gateway"):
            in_upstream = True
        elif in_upstream and stripped == "}":
            in_upstream = False
        elif in_upstream and directive == "server":
            match = _SERVER_LINE.match(line)
            if match is None:
                raise ValueError(f"cannot read upstream line {line!r}")
            if seen["upstream"] == 0:
                for address in upstreams:
                    mark = " down" if address in down else ""
                    out.append(f"{match.group(1)}server {address}{match.group(3)}{mark};")
            seen["upstream"] += 1
            continue
        out.append(line)
        if stripped == "http {":
            seen["http"] += 1
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                out.append(f"{indent}    {kind}_temp_path {prefix}/temp/{kind};")
    missing = [name for name, count in seen.items() if count == 0]
    if missing:
        raise ValueError(f"deploy/nginx.conf has no {', '.join(missing)} directive the local cluster can rewrite")
    return "\n".join(out) + "\n"


# --- processes -------------------------------------------------------------------------------------

@dataclass(eq=False)
class Node:
    """One gateway process (a :class:`GatewayProcess` on a fixed port, so a restart keeps it)."""

    index: int
    node_id: str
    gateway: GatewayProcess
    exit_reported: bool = False

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def log_path(self) -> Path:
        return self.gateway.log_path

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.gateway.process

    @property
    def running(self) -> bool:
        return self.gateway.running

    @property
    def pid(self) -> int | None:
        return self.gateway.pid


def _stop_process(process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout_s: float) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass(eq=False)
class LocalCluster:
    """nginx + redis-server + ``nodes`` gateway processes (see the module docstring)."""

    nodes_count: int = 2
    port: int = 0                          # nginx port; 0 = a free one
    database_url: str | None = None        # default: SQLite file in the work directory
    redis_url: str | None = None           # default: a private redis-server
    gateway_args: Sequence[str] = ()       # extra `chat-gateway serve` flags for every node
    workdir: Path | None = None            # default: a new temporary directory, removed by stop()
    python: str = sys.executable
    install_missing: bool = False          # apt-get install nginx/redis-server when missing (root only)
    inherit_gateway_env: bool = True       # False: the nodes ignore GATEWAY_* variables of this process
    startup_timeout_s: float = 30.0
    nodes: list[Node] = field(default_factory=list)
    _redis: RedisServer | None = None
    down: set[int] = field(default_factory=set)   # node indexes marked `down` in nginx
    _nginx: subprocess.Popen[bytes] | None = None
    _nginx_bin: str = "nginx"
    _own_workdir: bool = False
    _logs: list[IO[bytes]] = field(default_factory=list)

    # --- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def prefix(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "nginx"

    @property
    def access_log(self) -> Path:
        """nginx's access log: one line per request with ``upstream=<node address> sockjs=<session>``."""
        return self.prefix / "logs" / "access.log"

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "pid": os.getpid(), "workdir": str(self.workdir), "redis_url": self.redis_url,
                "database_url": self.database_url,
                "nodes": [{"node_id": n.node_id, "url": n.url, "pid": n.pid, "log": str(n.log_path)}
                          for n in self.nodes],
                "nginx": {"pid": self._nginx.pid if self._nginx else None,
                          "logs": str(self.prefix / "logs")}}

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        nginx = find_executable("nginx", install=self.install_missing)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="chat-gateway-cluster-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        # nginx workers drop root privileges: they must be able to reach the temp paths.
        self.workdir.chmod(0o755)
        (self.workdir / "logs").mkdir(exist_ok=True)
        try:
            if self.redis_url is None:
                self._start_redis(find_executable("redis-server", install=self.install_missing,
                                                  package="redis-server"))
            if self.database_url is None:
                self.database_url = f"sqlite+aiosqlite:///{self.workdir / 'chat.db'}"
            self._migrate()
            self.nodes = [self._node(i) for i in range(self.nodes_count)]
            for node in self.nodes:
                self._spawn_node(node)
            for node in self.nodes:
                self._wait_ready(node)
            self._start_nginx(nginx)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self, executable: str) -> None:
        assert self.workdir is not None
        self._redis = RedisServer(executable=executable, startup_timeout_s=self.startup_timeout_s,
                                  log_path=self.workdir / "logs" / "redis.log")
        try:
            self._redis.start()
        except RedisServerError as exc:
            raise ClusterError(str(exc)) from None
        self.redis_url = self._redis.url

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not self.inherit_gateway_env:
            env = {k: v for k, v in env.items() if not k.startswith("GATEWAY_")}
        return env

    def _node(self, index: int) -> Node:
        """Node ``index`` (not started): ``python -m gateway.cli serve`` from this checkout, on a free
        port, logging to logs/node<N>.log; GATEWAY_* variables of this process only when inherited."""
        assert self.workdir is not None and self.database_url is not None and self.redis_url is not None
        node_id = f"node{index + 1}"
        inherited = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")} if self.inherit_gateway_env else {}
        gateway = GatewayProcess({"host": HOST, "node_id": node_id, "redis_url": self.redis_url,
                                  "database_url": self.database_url},
                                 env=inherited, port=free_port(), workdir=self.workdir, migrate=False,
                                 args=self.gateway_args, launcher=[self.python, "-m", "gateway.cli"],
                                 cwd=REPO_ROOT, log_path=self.workdir / "logs" / f"{node_id}.log")
        return Node(index, node_id, gateway)

    def _migrate(self) -> None:
        assert self.database_url is not None
        result = subprocess.run([self.python, "-m", "gateway.cli", "migrate", "--database-url", self.database_url],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=self._child_env())
        if result.returncode != 0:
            raise ClusterError(f"chat-gateway migrate failed: {result.stderr[-3000:]}")

    def _spawn_node(self, node: Node) -> None:
        node.exit_reported = False
        node.gateway.start(wait=False)

    def _wait_ready(self, node: Node) -> None:
        try:
            node.gateway.wait_ready(self.startup_timeout_s)
        except RuntimeError:
            raise ClusterError(f"gateway {node.node_id} exited: {_tail(node.log_path)}") from None
        except TimeoutError:
            raise ClusterError(f"gateway {node.node_id} not ready in {self.startup_timeout_s} s: "
                               f"{_tail(node.log_path)}") from None

    def _start_nginx(self, executable: str) -> None:
        prefix = self.prefix
        for sub in ("logs", "temp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        prefix.chmod(0o755)
        (prefix / "temp").chmod(0o777)
        if self.port == 0:
            self.port = free_port()
        self._nginx_bin = executable
        base = self._write_nginx_conf()
        log = (prefix / "logs" / "stderr.log").open("ab")
        self._logs.append(log)
        self._nginx = subprocess.Popen([*base, "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._nginx.poll() is not None:
                raise ClusterError(f"nginx exited: {_tail(prefix / 'logs' / 'error.log')}")
            status, _ = http_get(self.url + "/healthz", timeout_s=1.0)
            if status == 200:
                return
            time.sleep(0.05)
        raise ClusterError(f"nginx did not answer in {self.startup_timeout_s} s")

    def _nginx_base(self) -> list[str]:
        prefix = self.prefix
        return [self._nginx_bin, "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"),
                "-c", str(prefix / "nginx.conf")]

    def _write_nginx_conf(self) -> list[str]:
        """Write nginx.conf for the current nodes (those in ``self.down`` marked ``down``), have
        ``nginx -t`` check it, and return the nginx command line that runs it."""
        conf = local_nginx_conf(NGINX_CONF.read_text(), listen=f"{HOST}:{self.port}",
                                upstreams=[f"{HOST}:{node.port}" for node in self.nodes], prefix=self.prefix,
                                down={f"{HOST}:{self.nodes[i].port}" for i in self.down})
        (self.prefix / "nginx.conf").write_text(conf)
        base = self._nginx_base()
        check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise ClusterError(f"nginx rejected the config: {check.stderr.strip()}")
        return base

    def nginx_workers(self) -> dict[int, str]:
        """nginx's worker processes now: pid -> process title (``nginx: worker process``, or
        ``... is shutting down`` for a worker of an older configuration that still proxies open
        connections). Read from /proc (Linux)."""
        if self._nginx is None:
            return {}
        workers: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may contain spaces, so split after its closing parenthesis.
            if int(stat.rsplit(")", 1)[1].split()[1]) == self._nginx.pid:
                workers[int(entry.name)] = title
        return workers

    def reload_nginx(self, timeout_s: float = 30.0) -> None:
        """Apply the current upstream state (``self.down``) to the running nginx and return once only
        workers with the new configuration accept connections.

        SIGHUP makes nginx's master start new workers with the new file and ask the old ones to stop
        accepting; an old worker keeps proxying its open WebSockets ("worker process is shutting
        down") until they close. This waits for that event: a new worker exists, and every old one
        is gone or shutting down.
        """
        if self._nginx is None or self._nginx.poll() is not None:
            raise ClusterError("nginx is not running")
        self._write_nginx_conf()
        before = set(self.nginx_workers())
        self._nginx.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            workers = self.nginx_workers()
            new = [pid for pid in workers if pid not in before]
            old_accepting = [pid for pid in before if pid in workers and "shutting down" not in workers[pid]]
            if new and not old_accepting:
                return
            if self._nginx.poll() is not None:
                raise ClusterError(f"nginx exited on reload: {_tail(self.prefix / 'logs' / 'error.log')}")
            time.sleep(0.02)
        raise ClusterError(f"nginx did not take the new configuration in {timeout_s} s: "
                           f"{_tail(self.prefix / 'logs' / 'error.log')}")

    # --- rolling restart ------------------------------------------------------------------------

    def swap_node(self, index: int, *, drain_timeout_s: float = 30.0,
                  report: Callable[[str], None] = lambda line: None) -> None:
        """Replace node ``index`` by a new process on the same port, without downtime.

        1. Refuse unless another node is ready (taking the last one out would be an outage).
        2. Mark it ``down`` in nginx and reload: new connections and requests go to the others; its
           open WebSockets stay connected through the old nginx worker.
        3. SIGTERM: the node answers /readyz 503, sends every session ERROR "Server shutting down,
           reconnect" and closes it (WebSocket 1012), flushes, commits, and exits. Clients reconnect
           through nginx to the other nodes. SIGKILL only if it has not exited after ``drain_timeout_s``.
        4. Start the new process (the checkout's current code) on the same port and node id; wait for
           /readyz 200 (database, Redis, listener up).
        5. Take the ``down`` mark off and reload nginx.
        """
        node = self.nodes[index]
        others = [n for n in self.nodes if n is not node and n.running
                  and http_get(n.url + "/readyz", timeout_s=5.0)[0] == 200]
        if not others:
            raise ClusterError(f"no other node is ready: taking {node.node_id} out would stop the service")
        started = time.monotonic()
        self.down.add(index)
        self.reload_nginx()
        report(f"{node.node_id}: out of nginx (marked down, reloaded); "
               f"{', '.join(n.node_id for n in others)} take new connections")
        if node.running:
            old_pid = node.pid
            drain_started = time.monotonic()
            node.gateway.signal(signal.SIGTERM)
            code = node.gateway.stop(drain_timeout_s)
            # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is a clean exit.
            how = "drained and exited" if code in (0, -signal.SIGTERM) else f"exited with {code}"
            report(f"{node.node_id}: SIGTERM to pid {old_pid}, {how} in {time.monotonic() - drain_started:.1f} s")
        # If the new process does not get ready, the node stays marked down (nginx keeps routing
        # around it) and the error says why; fix it and run the restart again.
        self._spawn_node(node)
        self._wait_ready(node)
        report(f"{node.node_id}: new process pid {node.pid} ready on port {node.port}")
        self.down.discard(index)
        self.reload_nginx()
        report(f"{node.node_id}: back in nginx; swapped in {time.monotonic() - started:.1f} s")

    def rolling_restart(self, *, drain_timeout_s: float = 30.0,
                        report: Callable[[str], None] = lambda line: None) -> None:
        """:meth:`swap_node` for every node, one after the other (see docs/deployment.md)."""
        if len(self.nodes) < 2:
            raise ClusterError("a rolling restart needs at least 2 nodes (one serves while the other restarts)")
        for index in range(len(self.nodes)):
            self.swap_node(index, drain_timeout_s=drain_timeout_s, report=report)
        report("rolling restart done")

    # --- node control (tests) -------------------------------------------------------------------

    def kill_node(self, index: int) -> None:
        """SIGKILL a node, as a crash would: no QUITs, no drain."""
        self.nodes[index].gateway.kill()

    def stop_node(self, index: int, timeout_s: float = 20.0) -> None:
        """SIGTERM a node: it drains its sessions, then exits."""
        self.nodes[index].gateway.stop(timeout_s)

    def start_node(self, index: int) -> None:
        """Start a stopped node again, on its port and with its node id."""
        node = self.nodes[index]
        if node.running:
            raise ClusterError(f"{node.node_id} is running")
        self._spawn_node(node)
        self._wait_ready(node)

    def node_by_id(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    # --- shutdown -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything (nginx, then the nodes in parallel, then Redis) and remove the work dir."""
        _stop_process(self._nginx, signal.SIGQUIT, 10)
        for node in self.nodes:
            node.gateway.signal(signal.SIGTERM)     # all drain at once
        for node in self.nodes:
            node.gateway.stop(20)
        if self._redis is not None:
            self._redis.stop()
            self._redis.close()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def local_cluster(**kwargs: Any) -> Iterator[LocalCluster]:
    """A started :class:`LocalCluster`, stopped on exit."""
    cluster = LocalCluster(**kwargs)
    with cluster:
        yield cluster


# --- command line ----------------------------------------------------------------------------------

def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _banner(state: dict[str, Any]) -> str:
    lines = [f"chat cluster ready: {state['url']}/chat/room",
             f"  nginx -> {', '.join(n['node_id'] + ' ' + n['url'] for n in state['nodes'])}",
             f"  redis {state['redis_url']}, database {state['database_url']}",
             f"  logs in {state['workdir']}/logs and {state['nginx']['logs']}",
             "  open the URL in two browser tabs (or a normal and a private window) to chat across nodes;",
             "  stop with Ctrl-C, or `deploy/local-cluster stop`"]
    return "\n".join(lines)


def _already_running(state_file: Path) -> bool:
    existing = _read_state(state_file)
    if existing is not None and _alive(int(existing.get("pid", 0))):
        print(f"local-cluster: already running at {existing.get('url')} (pid {existing.get('pid')}); "
              "`deploy/local-cluster stop` first", file=sys.stderr)
        return True
    return False


def _run(args: argparse.Namespace) -> int:
    state_file = Path(args.state_file)
    if _already_running(state_file):
        return 1
    cluster = LocalCluster(nodes_count=args.nodes, port=args.port, database_url=args.database_url,
                           redis_url=args.redis_url, gateway_args=args.gateway_args,
                           workdir=Path(args.workdir) if args.workdir else None, install_missing=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    control: socket.socket | None = None
    try:
        cluster.start()
        assert cluster.workdir is not None
        control = _control_socket(cluster.workdir / "control.sock")
        state = dict(cluster.describe(), control=str(cluster.workdir / "control.sock"))
        state_file.write_text(json.dumps(state))
        print(_banner(state), flush=True)
        while True:
            if select.select([control], [], [], 1.0)[0]:
                connection, _ = control.accept()
                with connection:
                    _serve_control(cluster, connection)
                state = dict(cluster.describe(), control=state["control"])
                state_file.write_text(json.dumps(state))
            for node in cluster.nodes:
                if node.process is not None and not node.running and not node.exit_reported and not stopping:
                    print(f"local-cluster: {node.node_id} exited ({node.gateway.returncode}); "
                          f"log: {node.log_path}", file=sys.stderr, flush=True)
                    node.exit_reported = True
    except KeyboardInterrupt:
        print("local-cluster: stopping", flush=True)
    except ClusterError as exc:
        print(f"local-cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if control is not None:
            control.close()
        cluster.stop()
        current = _read_state(state_file)
        if current is not None and current.get("pid") == os.getpid():
            state_file.unlink(missing_ok=True)
    print("local-cluster: stopped", flush=True)
    return 0


# The running cluster process takes commands on a Unix socket in its work directory (recorded in the
# state file as "control"): one request line, then progress lines, then "ok" or "error: <why>".

def _control_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o600)
    server.listen(1)
    return server


def _serve_control(cluster: LocalCluster, connection: socket.socket) -> None:
    """Run one request of ``deploy/rolling-restart`` (``rolling-restart <drain timeout s>``), streaming
    its progress to the requester and to this process's output."""
    connection.settimeout(30)
    request = connection.makefile("r", encoding="utf-8").readline().split()

    def report(line: str) -> None:
        print(f"local-cluster: {line}", flush=True)
        with contextlib.suppress(OSError):
            connection.sendall((line + "\n").encode())

    if len(request) != 2 or request[0] != "rolling-restart":
        report(f"error: unknown request {' '.join(request)!r}")
        return
    try:
        cluster.rolling_restart(drain_timeout_s=float(request[1]), report=report)
    except (ClusterError, ValueError) as exc:
        report(f"error: {exc}")
    else:
        report("ok")


def _rolling_restart(args: argparse.Namespace) -> int:
    state = _read_state(Path(args.state_file))
    if state is None or not _alive(int(state.get("pid", 0))) or "control" not in state:
        print("rolling-restart: no local cluster is running (`deploy/local-cluster start --detach` first)",
              file=sys.stderr)
        return 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(args.timeout)
        try:
            client.connect(state["control"])
            client.sendall(f"rolling-restart {args.drain_timeout}\n".encode())
            last = ""
            for raw in client.makefile("rb"):
                last = raw.decode(errors="replace").rstrip("\n")
                print(f"rolling-restart: {last}", flush=True)
        except OSError as exc:
            print(f"rolling-restart: lost the cluster process: {exc}", file=sys.stderr)
            return 1
    return 0 if last == "ok" else 1


def _start_detached(args: argparse.Namespace, argv: Sequence[str]) -> int:
    state_file = Path(args.state_file)
    if _already_running(state_file):
        return 1
    state_file.unlink(missing_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"chat-gateway-local-cluster-{os.getuid()}.log"
    forwarded = [a for a in argv if a not in ("--detach", "-d")]
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "deploy.local_cluster", *forwarded], cwd=REPO_ROOT,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = _read_state(state_file)
        if state is not None and state.get("pid") == process.pid:
            print(_banner(state))
            return 0
        if process.poll() is not None:
            print(f"local-cluster: failed to start:\n{_tail(log_path)}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"local-cluster: not ready after 120 s; see {log_path}", file=sys.stderr)
    return 1


def _stop(args: argparse.Namespace) -> int:
    state = _read_state(Path(args.state_file))
    if state is None or not _alive(int(state.get("pid", 0))):
        print("local-cluster: not running")
        Path(args.state_file).unlink(missing_ok=True)
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        print(f"local-cluster: pid {pid} did not stop in 60 s", file=sys.stderr)
        return 1
    print("local-cluster: stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    state = _read_state(Path(args.state_file))
    if state is None or not _alive(int(state.get("pid", 0))):
        print("local-cluster: not running")
        return 1
    print(_banner(state))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="local-cluster",
                                     description="nginx + Redis + N chat-gateway nodes on this machine")
    parser.add_argument("--state-file", default=str(STATE_FILE), help="where a running cluster is recorded")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the cluster (foreground unless --detach)")
    start.add_argument("--nodes", type=int, default=2, help="gateway processes (default 2)")
    start.add_argument("--port", type=int, default=0, help="nginx port (default: a free one)")
    start.add_argument("--database-url", default=None, help="default: an SQLite file in the work directory")
    start.add_argument("--redis-url", default=None, help="default: a private redis-server on a free port")
    start.add_argument("--workdir", default=None, help="default: a temporary directory, removed on stop")
    start.add_argument("--detach", "-d", action="store_true", help="run in the background; stop with `stop`")
    start.add_argument("gateway_args", nargs=argparse.REMAINDER,
                       help="after --: extra `chat-gateway serve` flags for every node (e.g. -- --auth users "
                            "--users alice:secret)")
    sub.add_parser("stop", help="stop the cluster started with --detach (or in another terminal)")
    sub.add_parser("status", help="print the running cluster's URL and processes")
    restart = sub.add_parser("rolling-restart",
                             help="replace every node of the running cluster, one at a time, without downtime "
                                  "(deploy/rolling-restart)")
    restart.add_argument("--drain-timeout", type=float, default=30.0,
                         help="seconds a node may take to drain and exit before SIGKILL (default 30)")
    restart.add_argument("--timeout", type=float, default=600.0,
                         help="give up when the cluster process says nothing for this long (default 600)")
    args = parser.parse_args(argv)
    if args.command == "start":
        args.gateway_args = [a for a in args.gateway_args if a != "--"]
        if args.nodes < 1:
            parser.error("--nodes must be at least 1")
        return _start_detached(args, argv) if args.detach else _run(args)
    if args.command == "stop":
        return _stop(args)
    if args.command == "rolling-restart":
        return _rolling_restart(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
