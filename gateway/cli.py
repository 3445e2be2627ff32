"""The ``chat-gateway`` command: ``serve``, ``migrate``, ``settings``.

Owns: argument parsing, turning invalid settings into a one-line error (exit 2), and running uvicorn
with a drain step before uvicorn closes the WebSockets (uvicorn would close them with 1012 before
the app could say anything).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn

from gateway.settings import (
    Settings,
    SettingsError,
    add_setting_flags,
    describe_settings,
    env_name,
    load_settings,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-gateway", description="STOMP chat gateway")
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
        if args.command in ("migrate", "downgrade"):
            settings = load_settings(overrides=_overrides(args, ["database_url"]))
            from gateway.chat.migrations import downgrade, upgrade
            if args.command == "migrate":
                upgrade(settings.database_url)
            else:
                downgrade(settings.database_url, args.revision)
            return 0
        from dataclasses import fields
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
    config_kwargs: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                                         proxy_headers=True, ws_max_size=max(settings.max_frame_bytes * 2, 1 << 20),
                                         timeout_graceful_shutdown=settings.drain_timeout_s + 5)
    if settings.workers > 1:
        uvicorn.run("gateway.app:app_from_env", factory=True, workers=settings.workers, **config_kwargs)
        return 0
    from gateway.app import create_app
    app = create_app(settings)
    config = uvicorn.Config(app, **config_kwargs)
    server = DrainingServer(config)
    server.run()
    return 0


class DrainingServer(uvicorn.Server):
    """Drains STOMP sessions (ERROR + close 1012, queues flushed) before uvicorn closes the sockets."""

    async def shutdown(self, sockets: Any = None) -> None:
        gateway = getattr(getattr(self.config.app, "state", None), "gateway", None)
        if gateway is not None:
            await gateway.drain()
        await super().shutdown(sockets)


if __name__ == "__main__":
    sys.exit(main())
