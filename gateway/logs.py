"""Logging for the whole process: one formatter for the gateway's loggers and uvicorn's.

Owns: :func:`configure_logging` (called by ``chat-gateway serve`` before uvicorn starts and in each
worker process, and by :func:`gateway.app.create_app` with ``replace=False``), :func:`logging_config` (the
:func:`logging.config.dictConfig` dictionary, also handed to ``uvicorn.Config(log_config=...)`` so
uvicorn installs none of its own handlers: ``uvicorn``, ``uvicorn.error`` and ``uvicorn.access``
propagate to the root handler like every other logger), and the formats:

- ``json``: one JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (the
  message), ``pid``, plus every ``extra={...}`` field of the call (the session lines of
  :mod:`gateway.transport.connection` use them) and ``exception`` for a traceback. uvicorn's access
  lines get ``client``, ``method``, ``path``, ``http_version`` and ``status`` as keys.
- ``text``: ``ts [level] event key=value ...`` for a person, coloured when stderr is a terminal.
- ``auto`` (the ``log_format`` default): text when stderr is a terminal, else JSON. Decided in each
  process when its formatter is built (uvicorn's workers inherit stderr, so they decide alike).

Values of ``token``, ``access_token``, ``passcode``, ``password`` and ``authorization`` in a query
string or ``key=value`` text (a URL in an access line, say) are replaced by ``[redacted]`` in every
line, whatever its level: callers must still not log credentials or message bodies (docs/operations.md).

Built on structlog's standard-library integration (``structlog.stdlib.ProcessorFormatter``): plain
``logging`` calls stay the API of every module. Must not import the rest of the gateway except
:mod:`gateway.settings`.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from gateway.settings import Settings

#: The values of the ``log_format`` setting.
LOG_FORMATS = ("auto", "json", "text")

#: uvicorn's loggers, routed to the root handler (their own handlers removed).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

_SECRET = re.compile(r"(?i)\b(access_token|token|passcode|password|authorization)=([^&\s\"']+)")

# Extras uvicorn and structlog put on records that are not fields of the line.
_DROPPED = ("color_message", "positional_args", "_record", "_from_structlog")

EventDict = MutableMapping[str, Any]


def resolve_format(log_format: str, stream: TextIO | None = None) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal (``stream``, default stderr), else JSON."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)} (got {log_format!r})")
    if log_format != "auto":
        return log_format
    return "text" if _isatty(stream if stream is not None else sys.stderr) else "json"


def _isatty(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def redact(text: str) -> str:
    """``text`` with the values of credential-like ``key=value`` pairs replaced by ``[redacted]``."""
    return _SECRET.sub(r"\1=[redacted]", text)


def _add_pid(logger: Any, method: str, event: EventDict) -> EventDict:
    event.setdefault("pid", os.getpid())
    return event


def _access_fields(logger: Any, method: str, event: EventDict) -> EventDict:
    """uvicorn's access line as fields: ``client``, ``method``, ``path``, ``http_version``, ``status``."""
    args = event.get("positional_args")
    if event.get("logger") == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        client, http_method, path, version, status = args
        event.update(event="http request", client=str(client), method=str(http_method),
                     path=redact(str(path)), http_version=str(version), status=status)
    return event


def _clean(logger: Any, method: str, event: EventDict) -> EventDict:
    for key in _DROPPED:
        event.pop(key, None)
    message = event.get("event")
    if isinstance(message, str):
        event["event"] = redact(message)
    return event


def _ordered(logger: Any, method: str, event: EventDict) -> EventDict:
    """``ts``, ``level``, ``logger``, ``event`` first, then the fields in the order they came."""
    head = {key: event.pop(key) for key in ("ts", "level", "logger", "event") if key in event}
    return {**head, **event}


def make_formatter(log_format: str = "auto") -> logging.Formatter:
    """The formatter of every line of the process (``log_format``: auto, json or text)."""
    kind = resolve_format(log_format)
    pre_chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _add_pid,
        _access_fields,
    ]
    renderer: Any
    if kind == "json":
        final: list[Any] = [structlog.processors.format_exc_info, _ordered,
                            structlog.processors.JSONRenderer(sort_keys=False)]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(sys.stderr), pad_event_to=40)
        final = [renderer]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _clean, *final],
        pass_foreign_args=True,
    )


def logging_config(settings: Settings) -> dict[str, Any]:
    """The :func:`logging.config.dictConfig` dictionary for ``settings`` (``log_level``, ``log_format``)."""
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": {"()": "gateway.logs.make_formatter", "log_format": settings.log_format}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "gateway"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": level, "handlers": [], "propagate": True} for name in UVICORN_LOGGERS},
    }


def configure_logging(settings: Settings, *, replace: bool = True) -> None:
    """Route every logger of this process (the gateway's, uvicorn's, structlog's) to one stderr
    handler in ``settings.log_format``. Idempotent: calling it again replaces the handler.

    With ``replace=False`` (what :func:`gateway.app.create_app` uses) nothing changes when the root
    logger already has a handler: an embedder's logging, pytest's capture or the set-up that
    ``chat-gateway serve`` made before building the app stays as it is."""
    if not replace and logging.getLogger().handlers:
        return
    logging.config.dictConfig(logging_config(settings))
    structlog.configure(
        processors=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"), _add_pid,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
