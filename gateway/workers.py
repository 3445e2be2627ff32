"""Serving with uvicorn, one process or a supervisor and N workers, each draining like a single node.

Owns: :class:`DrainingServer` (a ``uvicorn.Server`` that drains the node's STOMP sessions before
uvicorn closes the sockets: uvicorn would close every WebSocket with 1012 before the app could say
anything), :func:`serve_workers` (``chat-gateway serve --workers N``: the supervisor process) and the
Prometheus multiprocess directory of a supervisor.

Why a supervisor of our own instead of ``uvicorn.supervisors.Multiprocess`` (read in uvicorn 0.54):
``Multiprocess`` builds every worker's server as a plain ``uvicorn.Server`` inside its ``Process``
class, and creates ``Process`` objects directly in four places (the start, a dead worker's restart,
SIGHUP, SIGTTIN); a ``DrainingServer`` per worker would mean overriding those four methods with
copies of their bodies. The supervisor here is small and
does only what the gateway needs:

- binds the listening socket once (``uvicorn.Config.bind_socket``) and starts N ``spawn`` processes
  sharing it; each builds its logging (:func:`gateway.logs.configure_logging`) and runs a
  :class:`DrainingServer` on the app factory ``gateway.app:app_from_env`` (settings from the
  ``GATEWAY_*`` environment, each worker its own ``node_id``);
- on SIGTERM, SIGINT or SIGHUP sends SIGTERM to every worker (each drains: the "Server shutting down,
  reconnect" ERROR and close 1012 to every session, committed messages published), waits for them
  (bounded by ``drain_timeout_s`` plus uvicorn's graceful shutdown plus a margin, then SIGKILL) and
  exits 0 when every worker ended cleanly, else 1;
- restarts a worker that dies on its own (not sooner than 1 s after that worker started), except
  one that failed at startup (uvicorn's exit code 3: the configuration is broken and every worker
  would fail alike): then the other workers are stopped and the supervisor exits 1;
- Prometheus multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set before the first worker starts,
  to the ``metrics_dir`` setting (its ``*.db`` files deleted first) or to a fresh private temporary
  directory (removed at exit). A gone worker's live gauges are dropped by every scrape
  (:func:`gateway.metrics.forget_dead_processes`, which also covers a worker killed behind the
  supervisor's back), so the supervisor does not clean them itself.

No health pings of the workers (uvicorn's supervisor has them): a hung worker is not replaced.

Must not import the application (:mod:`gateway.app` and what it assembles) at module level: the
workers import it by name through uvicorn's factory.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from gateway.logs import configure_logging
from gateway.settings import Settings, load_settings

log = logging.getLogger("gateway.workers")

#: uvicorn's exit code for a worker whose application failed to start (uvicorn.config.STARTUP_FAILURE).
STARTUP_FAILURE = 3

#: The app factory each worker runs.
WORKER_APP = "gateway.app:app_from_env"

#: Seconds between the supervisor's checks of its stop flag.
_POLL_S = 0.5

#: A worker that died is not restarted sooner than this after its own start (no busy crash loop).
_RESTART_MIN_S = 1.0

#: Seconds past the workers' own shutdown bound before the supervisor SIGKILLs one.
_KILL_MARGIN_S = 10.0


def find_gateway(app: Any) -> Any | None:
    """The node (``app.state.gateway``) of a loaded uvicorn app, looking through middleware that
    wraps it (each middleware keeps the app it wraps as ``.app``)."""
    for _ in range(32):
        if app is None:
            return None
        gateway = getattr(getattr(app, "state", None), "gateway", None)
        if gateway is not None:
            return gateway
        app = getattr(app, "app", None)
    return None


class DrainingServer(uvicorn.Server):
    """Drains STOMP sessions (ERROR + close 1012, queues flushed) before uvicorn closes the sockets."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        gateway = find_gateway(getattr(self.config, "loaded_app", None))
        if gateway is None:
            gateway = find_gateway(self.config.app)
        if gateway is not None:
            await gateway.drain()
        await super().shutdown(sockets)


def _worker_main(config: uvicorn.Config, sockets: list[socket.socket]) -> None:
    """A worker process: logging from the environment's settings, then one DrainingServer."""
    configure_logging(load_settings())
    with contextlib.suppress(KeyboardInterrupt):
        DrainingServer(config).run(sockets=sockets)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    started: float

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


@contextlib.contextmanager
def metrics_directory(settings: Settings) -> Iterator[Path]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the workers: ``metrics_dir`` wiped of ``*.db`` files, or a
    private temporary directory removed at the end; the variable is set in ``os.environ`` for the
    duration (workers are spawned with it)."""
    created = not settings.metrics_dir
    path = Path(tempfile.mkdtemp(prefix="chat-gateway-metrics-")) if created else Path(settings.metrics_dir)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
        if created:
            shutil.rmtree(path, ignore_errors=True)


class Supervisor:
    """N worker processes on one listening socket; see the module docstring."""

    def __init__(self, config: uvicorn.Config, settings: Settings, metrics_dir: Path) -> None:
        self.config = config
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.workers: list[_Worker] = []
        self.sockets: list[socket.socket] = []
        self.stop_signal: int | None = None
        self.failed = False
        self._context = multiprocessing.get_context("spawn")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def _spawn(self) -> _Worker:
        process = self._context.Process(target=_worker_main, args=(self.config, self.sockets),
                                        name="chat-gateway-worker")
        process.start()
        worker = _Worker(process, time.monotonic())
        log.info("worker %d started", worker.pid, extra={"worker_pid": worker.pid})
        return worker

    def run(self) -> int:
        """Serve until a stop signal (or a worker's startup failure); the process's exit code."""
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            self.sockets = [self.config.bind_socket()]
            log.info("supervisor %d: %d workers on %s:%d", os.getpid(), self.settings.workers,
                     self.config.host, self.config.port,
                     extra={"workers": self.settings.workers, "metrics_dir": str(self.metrics_dir)})
            self.workers = [self._spawn() for _ in range(self.settings.workers)]
            self._watch()
            return self._stop()
        finally:
            for sock in self.sockets:
                sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> None:
        while self.stop_signal is None and not self.failed:
            wait_any([w.process.sentinel for w in self.workers], timeout=_POLL_S)
            if self.stop_signal is not None:
                return
            for index, worker in enumerate(self.workers):
                if worker.process.is_alive():
                    continue
                worker.process.join()
                code = worker.process.exitcode
                if code == STARTUP_FAILURE:
                    log.error("worker %d failed to start: stopping", worker.pid,
                              extra={"worker_pid": worker.pid, "exit_code": code})
                    self.failed = True
                    self.workers.pop(index)
                    return
                log.warning("worker %d exited with %s: starting another", worker.pid, code,
                            extra={"worker_pid": worker.pid, "exit_code": code})
                delay = _RESTART_MIN_S - (time.monotonic() - worker.started)
                if delay > 0:
                    time.sleep(delay)
                self.workers[index] = self._spawn()

    def _stop(self) -> int:
        if self.stop_signal is not None:
            log.info("supervisor: %s, draining %d workers", signal.Signals(self.stop_signal).name,
                     len(self.workers))
        for worker in self.workers:
            if worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        # A worker drains for drain_timeout_s, then uvicorn waits up to its graceful-shutdown timeout.
        bound = self.settings.drain_timeout_s + float(self.config.timeout_graceful_shutdown or 0) + _KILL_MARGIN_S
        deadline = time.monotonic() + bound
        clean = not self.failed
        for worker in self.workers:
            worker.process.join(max(deadline - time.monotonic(), 0.0))
            if worker.process.is_alive():
                log.error("worker %d still running %.0f s after SIGTERM: killing it", worker.pid, bound,
                          extra={"worker_pid": worker.pid})
                worker.process.kill()
                worker.process.join()
                clean = False
            code = worker.process.exitcode
            # uvicorn re-raises the signal it handled once it has shut down: -SIGTERM is a clean end.
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                log.warning("worker %d exited with %s", worker.pid, code,
                            extra={"worker_pid": worker.pid, "exit_code": code})
                clean = False
        log.info("supervisor: every worker stopped", extra={"clean": clean})
        return 0 if clean else 1


def serve_workers(config: uvicorn.Config, settings: Settings) -> int:
    """Run ``settings.workers`` draining workers under a supervisor; returns its exit code."""
    with metrics_directory(settings) as path:
        return Supervisor(config, settings, path).run()
