"""Run a Node 20 script that drives a real JavaScript client, and read its JSON result.

Owns: locating ``node`` and the repository's ``node_modules`` (npm's pinned packages), running a
script from ``tests/clients/`` with one JSON argument (``process.argv[2]``) and a timeout, and parsing
the JSON object the script prints as its LAST stdout line. Scripts may print progress lines before
it; :class:`NodeScript` runs one in the background and lets a test wait for such a line (e.g.
``{"event": "subscribed"}``) before acting.

Tests that need Node are marked ``@pytest.mark.node``; :func:`require_node` skips them (with the
reason) when node or node_modules is missing, and fails instead when the CI variable is set.
Must not import the gateway package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.ci import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
CLIENTS = REPO / "tests" / "clients"
NODE_MODULES = Path(os.environ.get("GATEWAY_TEST_NODE_MODULES", REPO / "node_modules"))


class NodeScriptError(AssertionError):
    """The script failed, timed out or printed no JSON result; the message carries its output."""


def node_binary() -> str | None:
    return shutil.which("node")


def require_node() -> str:
    """The node binary; skip (or, under CI, fail) when node or the pinned packages are missing."""
    node = node_binary()
    reason = None
    if node is None:
        reason = "node is not installed"
    elif not (NODE_MODULES / "@stomp" / "stompjs").is_dir():
        reason = f"npm packages missing in {NODE_MODULES} (run `make node-deps`)"
    if reason is not None:
        skip_or_fail(reason, tests="the JavaScript client tests")
    assert node is not None
    return node


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NODE_PATH"] = str(NODE_MODULES)
    return env


def _script_path(script: str) -> Path:
    path = Path(script)
    return path if path.is_absolute() else CLIENTS / script


def _last_json(stdout: str, stderr: str, script: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result: dict[str, Any] = json.loads(line)
                return result
            except json.JSONDecodeError:
                break
    raise NodeScriptError(f"{script} printed no JSON result\n--- stdout\n{stdout}\n--- stderr\n{stderr}")


def run_node(script: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
    """Run ``tests/clients/<script>`` with ``args`` as JSON; return its last-line JSON object.

    A non-zero exit or a result with ``"ok": false`` raises :class:`NodeScriptError` with the output.
    """
    node = require_node()
    try:
        proc = subprocess.run([node, str(_script_path(script)), json.dumps(args or {})], env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NodeScriptError(f"{script} timed out after {timeout} s\n--- stdout\n{exc.stdout!r}\n"
                              f"--- stderr\n{exc.stderr!r}") from None
    result = _last_json(proc.stdout, proc.stderr, script)
    if proc.returncode != 0 or result.get("ok") is False:
        raise NodeScriptError(f"{script} failed (exit {proc.returncode}): {json.dumps(result)}\n"
                              f"--- stderr\n{proc.stderr}")
    return result


class NodeScript:
    """A script running in the background; its stdout lines are collected as they arrive."""

    def __init__(self, script: str, args: dict[str, Any] | None = None) -> None:
        node = require_node()
        self.script = script
        self.proc = subprocess.Popen([node, str(_script_path(script)), json.dumps(args or {})], env=_env(),
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for a stdout line ``{"event": name, ...}``."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise NodeScriptError(f"{self.script} exited before {name!r}:\n" + "\n".join(self.lines)
                                      + "\n--- stderr\n" + "".join(self._stderr))
            if time.monotonic() > deadline:
                self.proc.kill()
                raise NodeScriptError(f"{self.script}: no {name!r} within {timeout} s:\n" + "\n".join(self.lines)
                                      + "\n--- stderr\n" + "".join(self._stderr))
            time.sleep(0.01)

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the script to exit; its last JSON line (``"ok": false`` raises)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise NodeScriptError(f"{self.script} timed out:\n" + "\n".join(self.lines)
                                  + "\n--- stderr\n" + "".join(self._stderr)) from None
        self._reader.join(5)
        self._err_reader.join(5)
        result = _last_json("\n".join(self.lines), "".join(self._stderr), self.script)
        if self.proc.returncode != 0 or result.get("ok") is False:
            raise NodeScriptError(f"{self.script} failed (exit {self.proc.returncode}): {json.dumps(result)}\n"
                                  f"--- stderr\n" + "".join(self._stderr))
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
