"""A private ``redis-server`` process for tests, on a free loopback port.

Owns: starting, stopping, killing (SIGKILL), pausing (SIGSTOP/SIGCONT) and restarting one
redis-server on the same port, and waiting until it answers PING. No persistence: every start is an
empty server (``--save "" --appendonly no``), bound to 127.0.0.1, working in a temporary directory.

Usage::

    with RedisServer() as server:          # started; stopped on exit
        url = server.url                   # redis://127.0.0.1:<port>/0
        server.kill()                      # SIGKILL: clients see the connection drop
        server.restart()                   # same port, empty server
        server.command("CLIENT", "KILL", "TYPE", "pubsub")

If ``redis-server`` is not installed, :meth:`RedisServer.start` raises :class:`RedisServerMissing`
(``make test`` installs it). This is the one redis-server launcher: the tests, the benchmarks and the
local cluster (deploy/local_cluster.py) use it. Imports nothing from the gateway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from tests.support.net import HOST, free_port

__all__ = ["HOST", "RedisServer", "RedisServerError", "RedisServerMissing", "Reply", "free_port",
           "redis_server"]


class RedisServerMissing(RuntimeError):
    """redis-server is not on PATH."""


class RedisServerError(RuntimeError):
    """redis-server did not start or did not answer in time."""


def _encode_command(args: tuple[str | bytes, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer:
    """One redis-server child process (see the module docstring)."""

    def __init__(self, port: int | None = None, *, executable: str | None = None,
                 startup_timeout_s: float = 10.0, extra_args: tuple[str, ...] = (),
                 log_path: Path | None = None) -> None:
        self.host = HOST
        self._fixed_port = port is not None
        self._port = port
        self._executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self._log_path = log_path  # default: redis.log in the server's temporary directory
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.starts = 0

    # --- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the server has no port until it is started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def workdir(self) -> str:
        """The server's temporary working directory (created on first use, removed by close())."""
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="redis-test-")
        return self._workdir.name

    @property
    def log_path(self) -> Path:
        return self._log_path or Path(self.workdir) / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server (on the same port as before, if it ran already) and wait for PING."""
        if self.running:
            raise RedisServerError("redis-server is already running")
        executable = self._executable or shutil.which("redis-server")
        if executable is None:
            raise RedisServerMissing(
                "redis-server is not installed (not on PATH); `make test` installs it, "
                "or run: apt-get install redis-server")
        attempts = 1 if (self._fixed_port or self.starts) else 5
        for attempt in range(attempts):
            if self._port is None or (attempt and not self._fixed_port):
                self._port = free_port()
            if self._spawn(executable):
                self.starts += 1
                return self
        raise RedisServerError(f"redis-server did not start: {self._log_tail()}")

    def _spawn(self, executable: str) -> bool:
        log_path = self.log_path
        args = [executable, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no",
                "--logfile", str(log_path), *self.extra_args]
        # Its own session: a Ctrl-C meant for the parent (e.g. the local cluster in a terminal) must
        # not stop Redis before the gateways have drained.
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False  # e.g. the port was taken meanwhile
            if self.ping():
                return True
            time.sleep(0.01)
        self._signal_and_wait(signal.SIGKILL)
        raise RedisServerError(f"redis-server did not answer PING in {self.startup_timeout_s} s: "
                               f"{self._log_tail()}")

    def _log_tail(self) -> str:
        if self._workdir is None and self._log_path is None:
            return "(no log)"
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if sig != signal.SIGCONT:
                    os.kill(process.pid, signal.SIGCONT)  # a paused server must be able to exit
                os.kill(process.pid, sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._process = None

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM) and wait for the process to exit."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server and wait: clients see their connections reset, nothing is flushed."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Kill the server if it runs, then start an empty one on the same port."""
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        if self._process is None:
            raise RedisServerError("redis-server is not running")
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._process is None:
            raise RedisServerError("redis-server is not running")
        os.kill(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.kill()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- talking to it -----------------------------------------------------------------------------

    def ping(self, timeout_s: float = 0.5) -> bool:
        """Whether the server answers PING right now."""
        try:
            return self.command("PING", timeout_s=timeout_s) == b"PONG"
        except (OSError, RedisServerError):
            return False

    def command(self, *args: str | bytes, timeout_s: float = 5.0) -> Reply:
        """Send one command on a fresh connection and return its parsed reply.

        Simple strings and bulk strings are bytes, integers int, arrays lists, a nil None; an
        error reply raises :class:`RedisServerError`.
        """
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
            sock.sendall(_encode_command(args))
            return _read_reply(sock.makefile("rb"))


Reply = bytes | int | None | list["Reply"]


def _read_reply(stream: BinaryIO) -> Reply:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise RedisServerError("connection closed before a complete reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisServerError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise RedisServerError(f"unexpected reply line {line!r}")


@contextlib.contextmanager
def redis_server(**kwargs: object) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, closed on exit (kwargs go to its constructor)."""
    server = RedisServer(**kwargs)  # type: ignore[arg-type]
    with server:
        yield server
