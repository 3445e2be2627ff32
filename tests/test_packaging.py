"""The wheel works from a NON-editable install, run from outside the repository.

The wheel is built (``pip wheel --no-deps``) from a copy of what the build needs (pyproject.toml,
README.md, gateway/, alembic/, static/), so nothing stale in the checkout can leak into it. It is
installed with ``--no-deps --no-index`` into a fresh venv (no system site-packages); the runtime
dependencies come from the test venv through a ``.pth`` line naming its site-packages directory
(site-packages named that way are only put on ``sys.path``: their own ``.pth`` files, such as the
editable install's import hook, are not run). Every command then runs with its working directory in
a temporary directory, so neither the source tree nor a relative path can stand in for the package
data. constraints.txt is checked against the runtime dependency closure offline.

Needs PyPI (or a local index) for the isolated build's setuptools, like ``pip install .`` does.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.chat.migrations import head_revision
from tests.support.gateway_process import GatewayProcess, http_request

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
VERSION = PYPROJECT["project"]["version"]
#: What the build needs: the Dockerfile copies the same.
BUILD_INPUTS = ("pyproject.toml", "README.md", "gateway", "alembic", "static")
NODE_MODULES = REPO / "node_modules"
SOCKJS = "sockjs-client/sockjs.min.js"

#: A migration a later release might ship: the installed gateway gains it in the upgrade test. It
#: revises whatever head this checkout has (``{head}``) and is named one past it (``{next}``).
NEXT_REVISION = '''"""A release after {head} adds a table (tests/test_packaging.py).

Revision ID: {next}
Revises: {head}
"""

import sqlalchemy as sa
from alembic import op

revision = "{next}"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("packaging_test_marker", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("packaging_test_marker")
'''


def _run(args: list[str], *, cwd: Path, env: Mapping[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base.update(env or {})
    return subprocess.run(args, cwd=cwd, env=base, capture_output=True, text=True, timeout=timeout, check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("wheel-source")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)],
             cwd=out, timeout=300))
    wheels = list(out.glob("chat_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@dataclass(frozen=True)
class Installed:
    """A venv holding the wheel (not editable) and a working directory outside the repository."""

    venv: Path
    cwd: Path

    @property
    def binary(self) -> str:
        return str(self.venv / "bin" / "chat-gateway")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def versions_dir(self) -> Path:
        found = list(self.venv.glob("lib/python*/site-packages/gateway/_data/alembic/versions"))
        assert len(found) == 1, found
        return found[0]

    def cli(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _run([self.binary, *args], cwd=self.cwd, env=env)


def install(wheel: Path, where: Path) -> Installed:
    venv, cwd = where / "venv", where / "elsewhere"
    cwd.mkdir()
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=where))
    _ok(_run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
              "--no-deps", "--no-index", str(wheel)], cwd=where))
    site = _ok(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=cwd)).strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_chat_gateway_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return Installed(venv, cwd)


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return install(wheel, tmp_path_factory.mktemp("installed"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"


def _revision(database: Path) -> list[str]:
    with sqlite3.connect(database) as conn:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]


# --- the wheel's contents ------------------------------------------------------------------------

def test_the_wheel_holds_every_module_and_the_migrations_and_pages(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "gateway").rglob("*.py")
                if "__pycache__" not in p.parts}
    for top in ("alembic", "static"):
        expected |= {f"gateway/_data/{p.relative_to(REPO).as_posix()}" for p in (REPO / top).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel (a new subpackage? list it in pyproject.toml): {missing}"
    assert "gateway/_data/alembic/env.py" in names and "gateway/_data/static/rooms.html" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


# --- the installed wheel, run from elsewhere -----------------------------------------------------

def test_installed_version_is_the_package_version(installed: Installed) -> None:
    result = installed.cli("--version")
    assert _ok(result).strip() == f"chat-gateway {VERSION}"


def test_installed_package_reads_its_package_data_not_the_checkout(installed: Installed) -> None:
    script = ("import gateway; from gateway.chat.migrations import alembic_dir; "
              "print(gateway.__file__); print(gateway.resource_dir('static')); print(alembic_dir()); "
              "print(gateway.source_root())")
    lines = _ok(_run([installed.python, "-c", script], cwd=installed.cwd)).splitlines()
    venv = str(installed.venv)
    assert all(line.startswith(venv) for line in lines[:3]), lines
    assert lines[1].endswith("gateway/_data/static") and lines[2].endswith("gateway/_data/alembic")
    assert lines[3] == "None"


def test_installed_wheel_migrates_and_serves_from_outside_the_repository(installed: Installed,
                                                                          tmp_path: Path) -> None:
    database = tmp_path / "chat.db"
    url = f"sqlite+aiosqlite:///{database}"
    _ok(installed.cli("migrate", "--database-url", url))
    assert _revision(database) == [head_revision()]
    with GatewayProcess({"database_url": url}, launcher=[installed.binary], cwd=installed.cwd,
                        workdir=tmp_path) as gateway:
        assert http_request(gateway.url + "/healthz")[0] == 200
        for path, file in (("/chat/room", "rooms.html"), ("/chat/room/enter/r1", "room.html"),
                           ("/static/js/room.js", "js/room.js"), ("/static/css/chat.css", "css/chat.css")):
            status, body = http_request(gateway.url + path)
            assert (status, body) == (200, (REPO / "static" / file).read_bytes()), path
        status, body = http_request(gateway.url + "/chat/room", data=b"name=packaged")
        assert status == 200 and b'"packaged"' in body
        status, body = http_request(gateway.url + "/chat/rooms")
        assert status == 200 and b'"packaged"' in body
        # No checkout, no node_modules_dir: the browser libraries are missing and the answer says why.
        status, body = http_request(f"{gateway.url}/static/vendor/{SOCKJS}")
        assert status == 404 and b"GATEWAY_NODE_MODULES_DIR" in body
    assert "GATEWAY_NODE_MODULES_DIR" in gateway.log_text()


def test_installed_wheel_serves_the_browser_libraries_from_node_modules_dir(installed: Installed,
                                                                            tmp_path: Path) -> None:
    if not (NODE_MODULES / "sockjs-client" / "dist" / "sockjs.min.js").is_file():
        pytest.skip("node_modules is not installed (make node-deps)")
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    _ok(installed.cli("migrate", "--database-url", url))
    report = _ok(installed.cli("check", "--database-url", url, "--node-modules-dir", str(NODE_MODULES)))
    assert re.search(r"^ok +browser-libs ", report, re.M), report
    with GatewayProcess({"database_url": url}, env={"GATEWAY_NODE_MODULES_DIR": str(NODE_MODULES)},
                        launcher=[installed.binary], cwd=installed.cwd, workdir=tmp_path) as gateway:
        status, body = http_request(f"{gateway.url}/static/vendor/{SOCKJS}")
        assert (status, body) == (200, (NODE_MODULES / "sockjs-client" / "dist" / "sockjs.min.js").read_bytes())


def test_installed_check_passes_and_warns_about_the_browser_libraries(installed: Installed,
                                                                      sqlite_url: str) -> None:
    _ok(installed.cli("migrate", "--database-url", sqlite_url))
    report = _ok(installed.cli("check", "--database-url", sqlite_url))
    assert re.search(rf"^ok +schema +at the Alembic head revision {head_revision()}$", report, re.M), report
    assert re.search(r"^ok +pages +chat pages in .*gateway/_data/static$", report, re.M), report
    assert re.search(r"^warn +browser-libs .*GATEWAY_NODE_MODULES_DIR", report, re.M), report
    assert report.rstrip().endswith("all checks passed")


def test_an_upgraded_release_reports_the_older_revision_until_migrate(wheel: Path, installed: Installed,
                                                                      tmp_path: Path) -> None:
    """A database migrated by this release, then checked by a release with one more migration."""
    database = tmp_path / "chat.db"
    url = f"sqlite+aiosqlite:///{database}"
    _ok(installed.cli("migrate", "--database-url", url))
    newer = install(wheel, tmp_path)
    old = head_revision()
    new = f"{int(old) + 1:04d}"
    (newer.versions_dir / f"{new}_packaging_test_marker.py").write_text(NEXT_REVISION.format(head=old, next=new))

    result = newer.cli("check", "--database-url", url)
    assert result.returncode == 1, result.stdout
    assert re.search(rf"^FAIL +schema +revision {old} is not head {new}: run `chat-gateway migrate`$",
                     result.stdout, re.M), result.stdout
    assert result.stdout.rstrip().endswith("1 problem found")

    _ok(newer.cli("migrate", "--database-url", url))
    assert _revision(database) == [new]
    assert re.search(rf"^ok +schema +at the Alembic head revision {new}$",
                     _ok(newer.cli("check", "--database-url", url)), re.M)

    # The older release, pointed at the newer schema, says so instead of starting on it.
    result = installed.cli("check", "--database-url", url)
    assert result.returncode == 1
    assert re.search(rf"^FAIL +schema +revision {new} is unknown to this chat-gateway \(head is {old}\)",
                     result.stdout, re.M), result.stdout


# --- constraints.txt -----------------------------------------------------------------------------

def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _runtime_closure() -> dict[str, str]:
    """Every distribution the runtime dependencies pull in, with the version installed here."""
    found: dict[str, str] = {}
    pending = [Requirement(r) for r in metadata.requires("chat-gateway") or []]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        extras = frozenset(requirement.extras)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(requirement.name), extras)
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(requirement.name)
        found[key[0]] = dist.version
        for raw in dist.requires or []:
            dependency = Requirement(raw)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in (*extras, "")):
                pending.append(Requirement(str(dependency).split(";")[0]))
    return found


def test_constraints_pin_every_runtime_dependency_at_the_installed_version() -> None:
    pins, closure = _pins(), _runtime_closure()
    assert closure, "no runtime dependencies found"
    unpinned = sorted(set(closure) - set(pins))
    assert not unpinned, f"constraints.txt lacks {unpinned}: regenerate it (see its header)"
    drifted = {name: (pins[name], version) for name, version in closure.items() if pins[name] != version}
    assert not drifted, f"pinned vs installed: {drifted}: run `make install-test` or regenerate constraints.txt"
