"""Real multi-process Redis deployments for tests: a Redis Cluster and a Sentinel group, on free ports.

Owns: starting them, waiting until they are usable, and the faults the tests inject.

- :class:`RedisClusterProcesses`: 3 primaries + 3 replicas (``redis-server --cluster-enabled yes`` in
  temporary directories, joined with ``redis-cli --cluster create … --cluster-replicas 1
  --cluster-yes``). :meth:`~RedisClusterProcesses.fail_over` SIGKILLs a primary and waits until its
  replica owns its slots (``CLUSTER FAILOVER FORCE`` on the replica, with a short
  ``cluster-node-timeout`` as the fallback); :meth:`~RedisClusterProcesses.switch_over` is the planned
  ``CLUSTER FAILOVER`` with both alive; :meth:`~RedisClusterProcesses.migrate_slot` moves one
  slot with the ``CLUSTER SETSLOT … IMPORTING/MIGRATING/NODE`` steps ``redis-cli --cluster reshard``
  uses, so a test can choose the slot.
- :class:`RedisSentinelGroup`: 1 primary, 1 replica and 3 Sentinels (``redis-server <conf>
  --sentinel``) monitoring it as ``mymaster``; :meth:`~RedisSentinelGroup.kill_primary` SIGKILLs the
  primary and waits until the Sentinels name the replica.

Needs ``redis-server`` and ``redis-cli`` (apt: redis-server, redis-tools). Imports nothing from the
gateway.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from tests.support.net import free_port, port_is_free
from tests.support.polling import eventually_sync
from tests.support.redis_server import HOST, RedisServer, RedisServerError, RedisServerMissing

CLUSTER_NODE_TIMEOUT_MS = 3000
SERVICE = "mymaster"
T = TypeVar("T")


def _wait(what: str, check: Callable[[], T], timeout_s: float) -> T:
    """:func:`~tests.support.polling.eventually_sync` for the topology checks: a server that does not
    answer yet is "not yet"; a timeout is a :class:`RedisServerError` naming ``what``."""
    try:
        return eventually_sync(check, what, timeout_s=timeout_s, interval_s=0.05,
                               ignoring=(OSError, RedisServerError))
    except AssertionError as exc:
        raise RedisServerError(str(exc)) from None


def _text(reply: object) -> str:
    if not isinstance(reply, bytes):
        raise RedisServerError(f"expected a string reply, got {reply!r}")
    return reply.decode()


@dataclass
class ClusterNodeInfo:
    node_id: str
    address: str
    flags: set[str]
    master_id: str
    link: str
    slots: list[tuple[int, int]]


def parse_cluster_nodes(text: str) -> list[ClusterNodeInfo]:
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being imported/migrated
            low, _, high = item.partition("-")
            slots.append((int(low), int(high or low)))
        nodes.append(ClusterNodeInfo(parts[0], parts[1].split("@")[0], set(parts[2].split(",")),
                                     parts[3], parts[7], slots))
    return nodes


class RedisClusterProcesses:
    """A 3-primary, 3-replica Redis Cluster of child processes (see the module docstring)."""

    def __init__(self, primaries: int = 3, *, node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS) -> None:
        self.primary_count = primaries
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> RedisClusterProcesses:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerMissing("redis-cli is not installed; `make test` installs it (apt: redis-tools)")
        for _ in range(self.primary_count * 2):
            self.servers.append(self._start_node())
        addresses = [f"{HOST}:{s.port}" for s in self.servers]
        result = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "1",
                                 "--cluster-yes"], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed: {result.stdout[-2000:]} {result.stderr}")
        self.wait_stable(60)
        _wait("every primary's replica to be in sync", self._replicas_in_sync, 60)
        return self

    def _replicas_in_sync(self) -> bool:
        replicas = [s for s in self.running if b"role:slave" in _info(s, "INFO", "replication")]
        if len(replicas) < self.primary_count:
            return False
        if not all(b"master_link_status:up" in _info(s, "INFO", "replication") for s in replicas):
            return False
        primary_ids = {n.node_id for n in self.nodes() if "master" in n.flags and n.slots}
        return all({n.master_id for n in self.nodes(via) if "slave" in n.flags} >= primary_ids
                   for via in self.running)

    def _start_node(self) -> RedisServer:
        """A cluster-enabled redis-server on a port whose cluster-bus port (port + 10000) is free too
        (Redis refuses ports above 55535; the kernel's free ports are often higher)."""
        last: Exception | None = None
        for _ in range(20):
            port = _cluster_port()
            server = RedisServer(port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms)))
            try:
                return server.start()
            except RedisServerError as exc:  # taken meanwhile
                server.close()
                last = exc
        raise RedisServerError(f"no cluster node could start: {last}")

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers.clear()

    def __enter__(self) -> RedisClusterProcesses:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- addresses and topology ------------------------------------------------------------------

    @property
    def running(self) -> list[RedisServer]:
        return [s for s in self.servers if s.running]

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every running node as a seed."""
        return "redis+cluster://" + ",".join(f"{HOST}:{s.port}" for s in self.running)

    def by_address(self, address: str) -> RedisServer:
        for server in self.servers:
            if f"{HOST}:{server.port}" == address:
                return server
        raise RedisServerError(f"no cluster node at {address}")

    def nodes(self, via: RedisServer | None = None) -> list[ClusterNodeInfo]:
        server = via or self.running[0]
        return parse_cluster_nodes(_text(server.command("CLUSTER", "NODES")))

    def myid(self, server: RedisServer) -> str:
        return _text(server.command("CLUSTER", "MYID"))

    def primaries(self) -> list[RedisServer]:
        """The running primaries that own slots, as the cluster sees them now."""
        return [self.by_address(n.address) for n in self.nodes()
                if "master" in n.flags and "fail" not in n.flags and n.slots]

    def owner(self, slot: int, via: RedisServer | None = None) -> RedisServer:
        for node in self.nodes(via):
            if "master" in node.flags and any(low <= slot <= high for low, high in node.slots):
                return self.by_address(node.address)
        raise RedisServerError(f"no node owns slot {slot}")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        primary_id = self.myid(primary)
        for node in self.nodes():
            if node.master_id == primary_id and "fail" not in node.flags:
                return self.by_address(node.address)
        raise RedisServerError(f"{primary.port} has no replica")

    def keyslot(self, name: str) -> int:
        reply = self.running[0].command("CLUSTER", "KEYSLOT", name)
        assert isinstance(reply, int)
        return reply

    def wait_stable(self, timeout_s: float = 60.0) -> None:
        """Every running node reports cluster_state:ok and agrees on who owns every slot, and every
        primary with slots has a connected replica unless it lost it."""
        def stable() -> bool:
            views = []
            for server in self.running:
                if b"cluster_state:ok" not in _info(server, "CLUSTER", "INFO"):
                    return False
                nodes = self.nodes(server)
                views.append(sorted((n.address, tuple(n.slots)) for n in nodes
                                    if "master" in n.flags and "fail" not in n.flags and n.slots))
                if any("fail?" in n.flags for n in nodes if n.address in self._running_addresses()):
                    return False
            return all(view == views[0] for view in views)
        _wait("a stable Redis Cluster", stable, timeout_s)

    def _running_addresses(self) -> set[str]:
        return {f"{HOST}:{s.port}" for s in self.running}

    # --- faults --------------------------------------------------------------------------------------

    def fail_over(self, primary: RedisServer, timeout_s: float = 60.0) -> RedisServer:
        """SIGKILL ``primary`` and wait until its replica is a primary that every node agrees on."""
        replica = self.replica_of(primary)
        primary.kill()

        def promoted() -> bool:
            role = replica.command("ROLE")
            if isinstance(role, list) and role and role[0] == b"master":
                return True
            with contextlib.suppress(RedisServerError):
                replica.command("CLUSTER", "FAILOVER", "FORCE")
            return False

        _wait(f"replica {replica.port} to be promoted", promoted, timeout_s)
        self.wait_stable(timeout_s)
        return replica

    def switch_over(self, primary: RedisServer, timeout_s: float = 60.0) -> RedisServer:
        """``CLUSTER FAILOVER`` on ``primary``'s replica (both alive: a planned switch-over); returns it."""
        replica = self.replica_of(primary)
        replica.command("CLUSTER", "FAILOVER")

        def promoted() -> bool:
            role = replica.command("ROLE")
            return isinstance(role, list) and bool(role) and role[0] == b"master"

        _wait(f"replica {replica.port} to take over", promoted, timeout_s)
        self.wait_stable(timeout_s)
        return replica

    def migrate_slot(self, slot: int, target: RedisServer) -> None:
        """Move ``slot`` (and its keys) to ``target`` the way ``redis-cli --cluster reshard`` does."""
        source = self.owner(slot)
        if source is target:
            return
        source_id, target_id = self.myid(source), self.myid(target)
        target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        while True:
            keys = source.command("CLUSTER", "GETKEYSINSLOT", str(slot), "100")
            assert isinstance(keys, list)
            if not keys:
                break
            source.command("MIGRATE", HOST, str(target.port), "", "0", "5000", "KEYS",
                           *[k for k in keys if isinstance(k, bytes)])
        for server in (target, source, *[p for p in self.primaries() if p not in (source, target)]):
            server.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        _wait(f"every node to see slot {slot} on {target.port}",
              lambda: all(self.owner(slot, via) is target for via in self.running), 30)

    def info(self, server: RedisServer, section: str) -> dict[str, str]:
        out = {}
        for line in _info(server, "INFO", section).decode().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key] = value.strip()
        return out


def _cluster_port() -> int:
    """A free port in 20000..45535 whose +10000 bus port is free as well."""
    for _ in range(1000):
        port = random.randint(20000, 45535)
        if port_is_free(port) and port_is_free(port + 10000):
            return port
    raise RedisServerError("no free port pair for a cluster node")


def _info(server: RedisServer, *command: str) -> bytes:
    reply = server.command(*command)
    if not isinstance(reply, bytes):
        raise RedisServerError(f"{command} returned {reply!r}")
    return reply


class SentinelProcess:
    """One ``redis-server <conf> --sentinel`` child process."""

    def __init__(self, workdir: Path, primary_port: int, *, quorum: int = 2, down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind {HOST}\ndir {workdir}\nlogfile {workdir / f'sentinel-{self.port}.log'}\n"
            f"sentinel monitor {SERVICE} {HOST} {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n")
        self.server = RedisServer(self.port)  # only for ping()/command() on this port
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RedisServerMissing("redis-server is not installed")
        self._process = subprocess.Popen([executable, str(self.conf), "--sentinel"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait(f"sentinel on {self.port}", lambda: self.server.ping(), 10)

    def master_address(self) -> str | None:
        reply = self.server.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        if isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, bytes) for x in reply):
            return f"{_text(reply[0])}:{_text(reply[1])}"
        return None

    def close(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class RedisSentinelGroup:
    """1 primary, 1 replica, 3 Sentinels monitoring ``mymaster`` (see the module docstring)."""

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelProcess] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> RedisSentinelGroup:
        self._workdir = tempfile.TemporaryDirectory(prefix="redis-sentinel-test-")
        self.primary.start()
        self.replica = RedisServer(extra_args=("--replicaof", HOST, str(self.primary.port)))
        self.replica.start()
        replica = self.replica
        _wait("the replica's initial sync",
              lambda: b"master_link_status:up" in _info(replica, "INFO", "replication"), 30)
        for _ in range(3):
            sentinel = SentinelProcess(Path(self._workdir.name), self.primary.port)
            sentinel.start()
            self.sentinels.append(sentinel)
        _wait("every Sentinel to see the replica and the other Sentinels", self._sentinels_ready, 30)
        return self

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            reply = sentinel.server.command("SENTINEL", "MASTER", SERVICE)
            if not isinstance(reply, list):
                return False
            fields = {_text(reply[i]): reply[i + 1] for i in range(0, len(reply) - 1, 2)}
            if fields.get("num-slaves") != b"1" or fields.get("num-other-sentinels") != b"2":
                return False
        return True

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"{HOST}:{s.port}" for s in self.sentinels) + f"/{SERVICE}"

    def kill_primary(self, timeout_s: float = 60.0) -> RedisServer:
        """SIGKILL the primary; wait until every Sentinel names the replica and it is a primary."""
        replica = self.replica
        assert replica is not None
        self.primary.kill()
        address = f"{HOST}:{replica.port}"
        _wait("the Sentinels to promote the replica",
              lambda: all(s.master_address() == address for s in self.sentinels)
              and (role := replica.command("ROLE")) is not None and isinstance(role, list)
              and role[0] == b"master", timeout_s)
        return replica

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        self.sentinels.clear()
        self.primary.close()
        if self.replica is not None:
            self.replica.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisSentinelGroup:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
