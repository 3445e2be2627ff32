"""A REAL gateway process for tests: ``.venv/bin/chat-gateway serve`` on a free port.

Owns: starting the installed console script the way an operator does (settings as ``--flags`` and/or
``GATEWAY_*`` environment variables), waiting for ``/healthz``, capturing stdout+stderr to a log file,
and stopping it (SIGTERM, then SIGKILL) or killing it. Used by the integration tests and by the
multi-node cluster tests::

    with GatewayProcess({"redis_url": url, "node_id": "a"}) as gw:
        ... gw.ws_url, gw.url, gw.port, gw.log_text() ...
        gw.kill()                      # SIGKILL, e.g. a node crash

Every process gets its own working directory (``workdir``, a temp dir by default) holding its log
(unless ``log_path`` says elsewhere) and, unless ``database_url`` is given, a fresh SQLite database
migrated with ``chat-gateway migrate`` first. The parent's ``GATEWAY_*`` variables are not inherited:
only ``settings`` and ``env`` count. :func:`run_cli` runs any other ``chat-gateway`` command and
returns its result.

This is the one gateway launcher: the tests, the benchmarks (bench/procs.py) and the local cluster
(deploy/local_cluster.py) start ``chat-gateway serve`` through it; ports come from
:func:`tests.support.net.free_port`.

Must not import the gateway package (it tests the installed binary from the outside).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tests.support.net import HOST, free_port, http_request
from tests.support.polling import eventually_sync

__all__ = ["BINARY", "REPO", "WS_PATH", "GatewayProcess", "free_port", "http_request", "run_cli"]

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".venv" / "bin" / "chat-gateway"
WS_PATH = "/ws-stomp/websocket"


def _flag_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base["PYTHONUNBUFFERED"] = "1"
    base.update(env or {})
    return base


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``chat-gateway <args>`` to completion (stdout/stderr captured as text)."""
    return subprocess.run([str(BINARY), *args], env=_child_env(env), cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)


class GatewayProcess:
    """One ``chat-gateway serve`` process. See the module docstring."""

    def __init__(self, settings: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None,
                 port: int | None = None, workdir: Path | None = None, migrate: bool | None = None,
                 args: Sequence[str] = (), launcher: Sequence[str] | None = None,
                 cwd: Path | None = None, log_path: Path | None = None) -> None:
        self.settings = dict(settings or {})
        given = self.settings.pop("port", None)
        self.port = port or int(given or 0) or free_port()
        self.settings.setdefault("host", HOST)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gateway-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.env = dict(env or {})
        if "database_url" not in self.settings and "GATEWAY_DATABASE_URL" not in self.env:
            self.settings["database_url"] = f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
            migrate = True if migrate is None else migrate
        self.migrate = bool(migrate)
        self.extra_args = list(args)
        # How ``chat-gateway`` is invoked (default: the installed console script) and from where
        # (default: ``workdir``); ``[python, "-m", "gateway.cli"]`` with ``cwd`` = another checkout
        # runs that checkout's gateway package (the benchmarks' A/B mode).
        self.launcher = list(launcher) if launcher is not None else [str(BINARY)]
        self.cwd = cwd
        self.log_path = log_path or workdir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._terminating = False  # SIGTERM sent: the gateway drains; a second one is not sent

    # --- addresses ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return str(self.settings["host"])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        argv = [*self.launcher, "serve", "--port", str(self.port)]
        for name, value in self.settings.items():
            argv += ["--" + name.replace("_", "-"), _flag_value(value)]
        return argv + self.extra_args

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> GatewayProcess:
        """Start the process; with ``wait``, return once ``/healthz`` answers 200."""
        if self.migrate:
            result = run_cli("migrate", "--database-url", str(self.settings["database_url"]), env=self.env,
                             cwd=self.workdir)
            if result.returncode != 0:
                raise RuntimeError(f"chat-gateway migrate failed:\n{result.stdout}{result.stderr}")
        self._log = self.log_path.open("ab")
        self._terminating = False
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=_child_env(self.env),
                                        cwd=self.cwd or self.workdir, start_new_session=True)
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0, path: str = "/healthz") -> None:
        """Wait until ``path`` answers 200; RuntimeError if the process exits first, TimeoutError
        after ``timeout`` (both carry the log)."""
        def answers() -> bool:
            if not self.running:
                raise RuntimeError(f"gateway exited with {self.returncode} before serving:\n{self.log_text()}")
            return http_request(self.url + path, timeout=2)[0] == 200
        try:
            eventually_sync(answers, f"{path} answers 200", timeout_s=timeout, interval_s=0.05,
                            ignoring=(OSError,))
        except AssertionError:
            raise TimeoutError(f"gateway did not answer {path} within {timeout} s:\n{self.log_text()}") from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for ``/readyz`` 200 (broker connected, startup done)."""
        self.wait_healthy(timeout, "/readyz")

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)
            self._terminating = self._terminating or signum == signal.SIGTERM

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            if not self._terminating:
                self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL now (a crash: no drain)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_log()
        return self.process.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop if needed and remove the temp working directory (if this object made it)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
