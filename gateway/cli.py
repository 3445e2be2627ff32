"""The ``chat-gateway`` command: ``serve``, ``migrate``, ``downgrade``, ``settings``, ``check``, ``--version``.

Owns: argument parsing, turning invalid settings into a one-line error (exit 2), running uvicorn
(with :mod:`gateway.http_guard`'s request deadline and connection cap, the log format of
:mod:`gateway.logs` for uvicorn's loggers too, and :class:`gateway.workers.DrainingServer`: the
node's sessions are drained before uvicorn closes the WebSockets; with ``--workers N`` under the
supervisor of :mod:`gateway.workers`, each worker drains alike), and ``check``: a readable report
on the configuration (``GATEWAY_*`` typos, invalid values) and on connectivity (database reachable,
schema at the Alembic head, Redis reachable and new enough, the chat pages' files), each
connectivity check bounded by ``--timeout-s``; exit 0 when nothing is wrong, 1 when a line says FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import uvicorn

from gateway import __version__
from gateway.settings import (
    ENV_PREFIX,
    Settings,
    SettingsError,
    add_setting_flags,
    describe_settings,
    env_name,
    load_settings,
    setting_fields,
)
from gateway.workers import DrainingServer

__all__ = ["DrainingServer", "main", "run_checks", "serve", "settings_table"]

T = TypeVar("T")

#: Oldest Redis ``check`` accepts: sharded pub/sub (SSUBSCRIBE/SPUBLISH) needs Redis 7.
REDIS_MIN_VERSION = (7, 0)

#: Default seconds each connectivity check of ``check`` may take.
CHECK_TIMEOUT_S = 5.0

#: The settings the connectivity checks need; checked even when another setting is invalid.
_CONNECTIVITY_SETTINGS = ("database_url", "db_busy_timeout_s", "redis_url")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-gateway", description="STOMP chat gateway")
    parser.add_argument("--version", action="version", version=f"chat-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the gateway (uvicorn)")
    add_setting_flags(serve)
    migrate = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    migrate.add_argument("--database-url", dest="database_url", default=None,
                         help=f"SQLAlchemy URL [env {env_name('database_url')}]")
    downgrade = sub.add_parser("downgrade", help="downgrade the database schema")
    downgrade.add_argument("--database-url", dest="database_url", default=None)
    downgrade.add_argument("revision", nargs="?", default="base")
    listing = sub.add_parser("settings", help="list every setting with its environment variable and default")
    listing.add_argument("--markdown", action="store_true", help="print the table of docs/configuration.md")
    check = sub.add_parser(
        "check", help="check the settings, the database (reachable, migrated) and Redis; exit 1 on a problem",
        description="Validate the configuration the way `serve` would read it (same flags and GATEWAY_* "
                    "variables) and check connectivity. Prints one line per check; exits 1 if any says FAIL.")
    add_setting_flags(check)
    check.add_argument("--timeout-s", dest="check_timeout_s", type=float, default=CHECK_TIMEOUT_S,
                       help=f"seconds each connectivity check may take (default {CHECK_TIMEOUT_S})")
    return parser


def settings_table() -> str:
    """The markdown table of every setting (kept in docs/configuration.md; a test checks it)."""
    rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for name, env, default, help_text in describe_settings():
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `{name}` | `{flag}` | `{env}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, str | None]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "settings":
            print(settings_table() if args.markdown else "\n".join(
                f"{name:32} {env:40} {default:24} {help_text}"
                for name, env, default, help_text in describe_settings()))
            return 0
        if args.command == "check":
            if not args.check_timeout_s > 0:
                raise SettingsError(f"--timeout-s must be positive (got {args.check_timeout_s:g})")
            overrides = _overrides(args, [f.name for f in setting_fields()])
            report = asyncio.run(run_checks(os.environ, overrides, timeout_s=args.check_timeout_s))
            print(report.render())
            return 0 if report.ok else 1
        if args.command in ("migrate", "downgrade"):
            settings = load_settings(overrides=_overrides(args, ["database_url"]))
            from gateway.chat.migrations import downgrade, upgrade
            if args.command == "migrate":
                upgrade(settings.database_url)
            else:
                downgrade(settings.database_url, args.revision)
            return 0
        overrides = _overrides(args, [f.name for f in fields(Settings)])
        settings = load_settings(overrides=overrides)
    except SettingsError as exc:
        print(f"chat-gateway: invalid setting: {exc}", file=sys.stderr)
        return 2
    return serve(settings, overrides)


def serve(settings: Settings, overrides: dict[str, str | None]) -> int:
    # Worker processes (and the factory below) read settings from the environment.
    for name, value in overrides.items():
        if value is not None:
            os.environ[env_name(name)] = value
    os.environ[env_name("node_id")] = settings.node_id if settings.workers == 1 else ""
    from gateway.http_guard import Gate, connection_cap, install_gate, raise_fd_limit
    from gateway.logs import configure_logging, logging_config

    # One formatter for every logger, uvicorn's included (log_config: uvicorn installs no handler).
    configure_logging(settings)
    # Unfinished requests are closed after http_request_timeout_s and connections past the cap are
    # refused on accept (gateway.http_guard says why uvicorn's own options do not do it).
    soft_limit = raise_fd_limit()
    install_gate(Gate(settings.http_request_timeout_s, connection_cap(settings, soft_limit)))
    config_kwargs: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                                         log_config=logging_config(settings),
                                         proxy_headers=True, ws_max_size=max(settings.max_frame_bytes * 2, 1 << 20),
                                         timeout_graceful_shutdown=settings.drain_timeout_s + 5,
                                         http="gateway.http_guard:GuardedHttpProtocol")
    if settings.workers > 1:
        # A supervisor and N workers, each a DrainingServer (gateway.workers says why not uvicorn's).
        from gateway.workers import WORKER_APP, serve_workers
        return serve_workers(uvicorn.Config(WORKER_APP, factory=True, **config_kwargs), settings)
    from gateway.app import create_app, tune_gc
    app = create_app(settings)
    tune_gc(settings.gc_gen0_threshold)
    config = uvicorn.Config(app, **config_kwargs)
    server = DrainingServer(config)
    server.run()
    return 0


# --- check ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CheckLine:
    """One line of the ``check`` report."""

    status: str     # "ok", "FAIL", "warn" (reported, not a failure) or "skip"
    subject: str    # what was checked: settings, environment, database, schema, redis, pages
    detail: str

    def render(self) -> str:
        return f"{self.status:<5} {self.subject:<12} {self.detail}"


@dataclass(slots=True)
class CheckReport:
    lines: list[CheckLine]

    def add(self, status: str, subject: str, detail: str) -> None:
        self.lines.append(CheckLine(status, subject, detail))

    @property
    def problems(self) -> int:
        return sum(1 for line in self.lines if line.status == "FAIL")

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def render(self) -> str:
        count = self.problems
        summary = ("all checks passed" if count == 0
                   else f"{count} problem{'s' if count > 1 else ''} found")
        return "\n".join([f"chat-gateway {__version__} check", *(line.render() for line in self.lines),
                          summary])


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Every ``GATEWAY_*`` variable that is not a setting, with the closest setting's variable (or None)."""
    known = {f.name.upper(): env_name(f.name) for f in setting_fields()}
    found = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known.values():
            # Compare without the shared prefix, which would make every name look close.
            close = difflib.get_close_matches(name[len(ENV_PREFIX):].upper(), list(known), n=1, cutoff=0.6)
            found.append((name, known[close[0]] if close else None))
    return found


def _describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _bounded(step: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    async with asyncio.timeout(timeout_s):
        return await step()


async def run_checks(environ: Mapping[str, str], overrides: Mapping[str, str | None], *,
                     timeout_s: float = CHECK_TIMEOUT_S) -> CheckReport:
    """Everything ``chat-gateway check`` reports (settings from ``environ`` and flag ``overrides``)."""
    report = CheckReport([])
    for name, close in unknown_variables(environ):
        hint = f"; did you mean {close}?" if close else " (no setting has a similar name)"
        report.add("FAIL", "environment", f"{name} is not a setting{hint}")
    settings: Settings | None
    try:
        settings = load_settings(environ, overrides)
    except SettingsError as exc:
        report.add("FAIL", "settings", f"invalid setting: {exc}")
        settings = None
        try:  # still check connectivity if the settings it needs are fine
            partial = load_settings(
                {env_name(n): environ[env_name(n)] for n in _CONNECTIVITY_SETTINGS if env_name(n) in environ},
                {n: v for n, v in overrides.items() if n in _CONNECTIVITY_SETTINGS})
        except SettingsError:
            report.add("skip", "database", "not checked: the database settings are invalid")
            report.add("skip", "redis", "not checked: the Redis settings are invalid")
            return report
    else:
        partial = settings
        report.add("ok", "settings", "valid")
    await _check_database(report, partial, timeout_s)
    await _check_redis(report, partial, timeout_s)
    if settings is not None:
        _check_pages(report, settings)
    return report


async def _check_database(report: CheckReport, settings: Settings, timeout_s: float) -> None:
    from sqlalchemy import make_url, text

    from gateway.chat.migrations import schema_problem
    from gateway.chat.repository import make_engine

    url = make_url(settings.database_url)
    shown = url.render_as_string(hide_password=True)
    missing = _missing_sqlite_file(url.get_backend_name(), url.database)
    if missing is not None:  # connecting would create an empty file
        report.add("FAIL", "database", f"{shown}: the SQLite file {missing} does not exist "
                   "(`chat-gateway migrate` creates it)")
        report.add("skip", "schema", "not checked: no database")
        return
    try:
        engine = make_engine(settings.database_url, busy_timeout_s=min(timeout_s, settings.db_busy_timeout_s))
    except Exception as exc:  # an unsupported URL, a missing driver
        report.add("FAIL", "database", f"{shown}: {_describe_error(exc)}")
        report.add("skip", "schema", "not checked: no database")
        return
    query = text("SELECT sqlite_version()" if url.get_backend_name() == "sqlite" else "SHOW server_version")

    async def server_version() -> str:
        async with engine.connect() as conn:
            return str((await conn.execute(query)).scalar_one())

    try:
        try:
            version = await _bounded(server_version, timeout_s)
        except TimeoutError:
            report.add("FAIL", "database", f"{shown}: unreachable: no answer within {timeout_s:g} s")
            report.add("skip", "schema", "not checked: database unreachable")
            return
        except Exception as exc:
            report.add("FAIL", "database", f"{shown}: unreachable: {_describe_error(exc)}")
            report.add("skip", "schema", "not checked: database unreachable")
            return
        report.add("ok", "database", f"{shown}: reachable ({url.get_backend_name()} {version})")
        try:
            problem = await _bounded(lambda: schema_problem(engine), timeout_s)
        except TimeoutError:
            report.add("FAIL", "schema", f"reading the Alembic revision took longer than {timeout_s:g} s")
            return
        except Exception as exc:
            report.add("FAIL", "schema", f"could not read the Alembic revision: {_describe_error(exc)}")
            return
        if problem is None:
            from gateway.chat.migrations import head_revision
            report.add("ok", "schema", f"at the Alembic head revision {head_revision()}")
        else:
            report.add("FAIL", "schema", problem)
    finally:
        with contextlib.suppress(Exception):
            await _bounded(engine.dispose, timeout_s)


def _missing_sqlite_file(backend: str, database: str | None) -> str | None:
    if backend != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return None if os.path.isfile(database) else database


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


async def _check_redis(report: CheckReport, settings: Settings, timeout_s: float) -> None:
    if settings.redis_url is None:
        report.add("skip", "redis", "redis_url is not set: in-memory broker, a single node")
        return
    from redis.exceptions import ResponseError

    from gateway.broker.redis_urls import data_client, parse_redis_url, redact

    shown = redact(settings.redis_url)
    try:
        client = data_client(parse_redis_url(settings.redis_url), timeout_s=timeout_s)  # one server, Sentinel or Cluster
    except Exception as exc:  # a malformed URL
        report.add("FAIL", "redis", f"{shown}: {_describe_error(exc)}")
        return
    try:
        try:
            await _bounded(client.ping, timeout_s)
        except TimeoutError:
            report.add("FAIL", "redis", f"{shown}: unreachable: no answer within {timeout_s:g} s")
            return
        except Exception as exc:
            report.add("FAIL", "redis", f"{shown}: unreachable: {_describe_error(exc)}")
            return
        try:
            info = await _bounded(lambda: client.info("server"), timeout_s)
        except (ResponseError, TimeoutError) as exc:
            report.add("warn", "redis", f"{shown}: reachable, version unknown (INFO failed: {_describe_error(exc)})")
            return
        if isinstance(info, dict) and "redis_version" not in info:  # a cluster: one INFO per node
            versions = [str(v.get("redis_version", "?")) for v in info.values() if isinstance(v, dict)]
            info = {"redis_version": min(versions, key=_version_tuple)} if versions else {}
        version = str(info.get("redis_version", "?"))
        if _version_tuple(version)[:2] < REDIS_MIN_VERSION:
            needed = ".".join(map(str, REDIS_MIN_VERSION))
            report.add("FAIL", "redis", f"{shown}: reachable, but Redis {version} is too old: sharded pub/sub "
                       f"needs Redis {needed} or newer")
        else:
            report.add("ok", "redis", f"{shown}: reachable (Redis {version})")
    finally:
        with contextlib.suppress(Exception):
            await _bounded(client.aclose, timeout_s)


def _check_pages(report: CheckReport, settings: Settings) -> None:
    from gateway.pages import check_vendor, static_dir

    try:
        pages = static_dir(settings)
    except FileNotFoundError as exc:
        report.add("FAIL", "pages", str(exc))
        return
    missing = [name for name in ("rooms.html", "room.html") if not (pages / name).is_file()]
    if missing:
        report.add("FAIL", "pages", f"{', '.join(missing)} missing from {pages} (the static_dir setting)")
    else:
        report.add("ok", "pages", f"chat pages in {pages}")
    problems = check_vendor(settings)
    for problem in problems:
        report.add("warn", "browser-libs", problem)
    if not problems:
        report.add("ok", "browser-libs", "sockjs-client and @stomp/stompjs installed")


if __name__ == "__main__":
    sys.exit(main())
