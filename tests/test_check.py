"""``chat-gateway check`` against good and broken configurations, as an operator runs it.

Every test runs the installed ``chat-gateway`` binary in a temporary working directory against real
services: SQLite files, the PostgreSQL test server, private redis-servers; "unreachable" is a port
nothing listens on, a "dead host" is a socket that accepts connections and never answers. The report
is checked line by line (``<status> <subject> <detail>``) together with the exit code (0 when no line
says FAIL, else 1). ``schema_problem`` is also called directly, the way the chat layer's start-up
calls it. The older-revision case of an upgrade lives in tests/test_packaging.py (it needs a
release with one more migration, i.e. an installed wheel whose scripts can be extended).
"""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.chat.migrations import head_revision, schema_problem, upgrade
from gateway.chat.repository import make_engine
from tests.support import postgres
from tests.support.gateway_process import free_port, run_cli
from tests.support.redis_server import RedisServer, RedisServerMissing

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def check(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = run_cli("check", *args, cwd=cwd, env=env)
    assert result.stderr == "", result.stderr
    return result.returncode, result.stdout


def line(report: str, status: str, subject: str, detail: str) -> bool:
    """Whether ``report`` has the line ``status subject detail…`` (``detail`` is a regex prefix)."""
    return re.search(rf"^{re.escape(status)} +{re.escape(subject)} +{detail}", report, re.M) is not None


@pytest.fixture
def migrated(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    result = run_cli("migrate", "--database-url", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return url


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.fixture
def pg_database() -> Iterator[str]:
    """An empty database on the PostgreSQL test server (skipped or failed like the other PG tests)."""
    asyncio.run(postgres.require_postgres())
    name = asyncio.run(postgres.create_database())
    try:
        yield postgres.async_url(name)
    finally:
        asyncio.run(postgres.drop_database(name))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    try:
        with RedisServer() as server:
            yield server
    except RedisServerMissing as exc:
        pytest.skip(str(exc))


# --- version and a good configuration ----------------------------------------------------------

def test_version_prints_the_package_version(tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"chat-gateway {VERSION}\n")


def test_a_migrated_database_without_redis_passes(tmp_path: Path, migrated: str) -> None:
    status, report = check("--database-url", migrated, cwd=tmp_path)
    assert status == 0, report
    lines = report.splitlines()
    assert lines[0] == f"chat-gateway {VERSION} check"
    assert line(report, "ok", "settings", "valid$")
    assert line(report, "ok", "database", rf"{re.escape(migrated)}: reachable \(sqlite 3\.")
    assert line(report, "ok", "schema", f"at the Alembic head revision {head_revision()}$")
    assert line(report, "skip", "redis", "redis_url is not set")
    assert line(report, "ok", "pages", "chat pages in ")
    assert lines[-1] == "all checks passed"
    assert not [entry for entry in lines[1:-1] if entry.startswith("FAIL")]


def test_settings_come_from_the_environment_like_serve(tmp_path: Path, migrated: str) -> None:
    status, report = check(cwd=tmp_path, env={"GATEWAY_DATABASE_URL": migrated})
    assert status == 0, report
    assert line(report, "ok", "schema", "at the Alembic head revision")


def test_missing_browser_libraries_are_a_warning_not_a_failure(tmp_path: Path, migrated: str) -> None:
    empty = tmp_path / "node_modules"
    empty.mkdir()
    status, report = check("--database-url", migrated, "--node-modules-dir", str(empty), cwd=tmp_path)
    assert status == 0, report
    assert line(report, "warn", "browser-libs", r"/static/vendor/sockjs-client/sockjs\.min\.js: .* not installed")


# --- configuration problems ----------------------------------------------------------------------

def test_a_misspelt_gateway_variable_is_named_with_the_setting_it_resembles(tmp_path: Path,
                                                                             migrated: str) -> None:
    env = {"GATEWAY_REDIS_UR": "redis://127.0.0.1:6379/0", "GATEWAY_MAX_FRAME_BYTE": "1000",
           "GATEWAY_XYZZY": "1", "GATEWAY_DATABASE_URL": migrated}
    status, report = check(cwd=tmp_path, env=env)
    assert status == 1, report
    assert line(report, "FAIL", "environment",
                "GATEWAY_MAX_FRAME_BYTE is not a setting; did you mean GATEWAY_MAX_FRAME_BYTES\\?$")
    assert line(report, "FAIL", "environment", "GATEWAY_REDIS_UR is not a setting; did you mean GATEWAY_REDIS_URL\\?$")
    assert line(report, "FAIL", "environment", r"GATEWAY_XYZZY is not a setting \(no setting has a similar name\)$")
    assert line(report, "ok", "schema", "at the Alembic head revision")  # the rest is still checked
    assert report.splitlines()[-1] == "3 problems found"


def test_an_invalid_value_fails_and_connectivity_is_still_checked(tmp_path: Path, migrated: str) -> None:
    status, report = check("--database-url", migrated, cwd=tmp_path, env={"GATEWAY_PORT": "99999"})
    assert status == 1, report
    assert line(report, "FAIL", "settings", re.escape("invalid setting: port must be 0..65535 (got 99999)"))
    assert line(report, "ok", "database", ".*reachable")
    assert line(report, "ok", "schema", "at the Alembic head revision")


# --- database problems ---------------------------------------------------------------------------

def test_a_missing_sqlite_file_fails_and_is_not_created(tmp_path: Path) -> None:
    database = tmp_path / "absent.db"
    status, report = check("--database-url", f"sqlite+aiosqlite:///{database}", cwd=tmp_path)
    assert status == 1, report
    assert line(report, "FAIL", "database", f".*the SQLite file {re.escape(str(database))} does not exist")
    assert line(report, "skip", "schema", "not checked")
    assert not database.exists()


def test_a_never_migrated_sqlite_database_fails_the_schema(tmp_path: Path) -> None:
    database = tmp_path / "empty.db"
    sqlite3.connect(database).close()
    status, report = check("--database-url", f"sqlite+aiosqlite:///{database}", cwd=tmp_path)
    assert status == 1, report
    assert line(report, "ok", "database", ".*reachable")
    assert line(report, "FAIL", "schema",
                "no alembic_version table: the database was never migrated .*: run `chat-gateway migrate`$")


def test_a_database_downgraded_to_base_fails_the_schema(tmp_path: Path, migrated: str) -> None:
    result = run_cli("downgrade", "--database-url", migrated, "base", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status, report = check("--database-url", migrated, cwd=tmp_path)
    assert status == 1, report
    assert line(report, "FAIL", "schema", "no revision recorded in alembic_version .*: run `chat-gateway migrate`$")


def test_an_unreachable_database_fails(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://chat:secret@127.0.0.1:{free_port()}/chat"
    status, report = check("--database-url", url, cwd=tmp_path)
    assert status == 1, report
    assert line(report, "FAIL", "database", r"postgresql\+asyncpg://chat:\*\*\*@127\.0\.0\.1:\d+/chat: unreachable: ")
    assert line(report, "skip", "schema", "not checked: database unreachable")
    assert "secret" not in report


def test_a_silent_database_and_redis_time_out_instead_of_hanging(tmp_path: Path, silent_port: int) -> None:
    status, report = check("--timeout-s", "2", "--database-url",
                           f"postgresql+asyncpg://chat@127.0.0.1:{silent_port}/chat",
                           "--redis-url", f"redis://127.0.0.1:{silent_port}/0", cwd=tmp_path)
    assert status == 1, report
    assert line(report, "FAIL", "database", r".*: unreachable: no answer within 2 s$")
    assert line(report, "FAIL", "redis", r".*: unreachable: no answer within 2 s$")


@pytest.mark.postgres
def test_postgres_schema_states(tmp_path: Path, pg_database: str) -> None:
    status, report = check("--database-url", pg_database, cwd=tmp_path)
    assert status == 1, report
    assert line(report, "ok", "database", r".*: reachable \(postgresql \d+")
    assert line(report, "FAIL", "schema", "no alembic_version table")

    assert run_cli("migrate", "--database-url", pg_database, cwd=tmp_path).returncode == 0
    status, report = check("--database-url", pg_database, cwd=tmp_path)
    assert status == 0, report
    assert line(report, "ok", "schema", f"at the Alembic head revision {head_revision()}$")

    assert run_cli("downgrade", "--database-url", pg_database, "base", cwd=tmp_path).returncode == 0
    status, report = check("--database-url", pg_database, cwd=tmp_path)
    assert status == 1 and line(report, "FAIL", "schema", "no revision recorded in alembic_version")


# --- Redis ---------------------------------------------------------------------------------------

@pytest.mark.redis
def test_redis_reachable_with_its_version_then_unreachable(tmp_path: Path, migrated: str,
                                                           redis_server: RedisServer) -> None:
    info = redis_server.command("INFO", "server")
    assert isinstance(info, bytes)
    version = re.search(rb"redis_version:([\d.]+)", info)
    assert version is not None
    expected_ok = tuple(int(p) for p in version.group(1).split(b".")[:2]) >= (7, 0)
    status, report = check("--database-url", migrated, "--redis-url", redis_server.url, cwd=tmp_path)
    shown = re.escape(redis_server.url)
    if expected_ok:
        assert status == 0, report
        assert line(report, "ok", "redis", rf"{shown}: reachable \(Redis {re.escape(version.group(1).decode())}\)$")
    else:
        assert status == 1 and line(report, "FAIL", "redis", rf"{shown}: reachable, but Redis .* is too old")

    redis_server.kill()
    status, report = check("--database-url", migrated, "--redis-url", redis_server.url, cwd=tmp_path)
    assert status == 1, report
    assert line(report, "FAIL", "redis", rf"{shown}: unreachable: ")
    assert line(report, "ok", "schema", "at the Alembic head revision")


# --- schema_problem, as the chat layer's start-up calls it ---------------------------------------

async def test_schema_problem_names_the_fix_until_the_database_is_at_head(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    engine = make_engine(url)
    try:
        problem = await schema_problem(engine)
        assert problem is not None and problem.startswith("no alembic_version table")
        assert problem.endswith("run `chat-gateway migrate`")
        await asyncio.to_thread(upgrade, url)
        assert await schema_problem(engine) is None
    finally:
        await engine.dispose()
