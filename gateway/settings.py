"""The gateway's configuration: one frozen :class:`Settings` object.

Every setting is a dataclass field with a default, a one-line description and a parser. Values come
from ``GATEWAY_<NAME>`` environment variables and are overridden by ``chat-gateway serve --<name>``
flags (both are generated from the fields, so the two can never drift). :func:`load_settings`
validates everything at start and raises :class:`SettingsError` with a one-line message naming the
setting; the CLI prints that line and exits 2 instead of a traceback.

This module imports nothing from the rest of the gateway.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

ENV_PREFIX = "GATEWAY_"


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it and fits on one line."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _setting(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
             default_factory: Callable[[], Any] | None = None) -> Any:
    metadata = {"help": help, "parse": parse}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    # --- serving -------------------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "Interface to listen on.")
    port: int = _setting(8080, "TCP port to listen on.")
    workers: int = _setting(1, "uvicorn worker processes; more than 1 needs redis_url.")
    node_id: str = _setting("", "This node's id in the cluster (default: hostname-pid-random).")
    log_level: str = _setting("info", "Log level: debug, info, warning, error.")
    allowed_origins: tuple[str, ...] = _setting(
        (), "Origins allowed to open WebSocket/SockJS sessions (comma list; '*' = any; empty = same "
        "origin only). Requests without an Origin header (non-browser clients) are always allowed.",
        parse=_parse_list)
    static_dir: str = _setting("", "Directory of the chat pages (default: the repository's static/).")
    node_modules_dir: str = _setting(
        "", "Directory holding npm's node_modules for the browser libraries (default: the repository's).")

    # --- storage and cluster -------------------------------------------------------------------
    database_url: str = _setting("sqlite+aiosqlite:///./chat-gateway.db",
                                 "SQLAlchemy async URL (sqlite+aiosqlite:// or postgresql+asyncpg://).")
    db_busy_timeout_s: float = _setting(30.0, "Seconds a SQLite write waits for another process's lock.")
    db_connect_timeout_s: float = _setting(
        5.0, "Seconds to open a PostgreSQL connection or wait for a pooled one before the database counts "
        "as unavailable.")
    db_statement_timeout_s: float = _setting(
        5.0, "Seconds one PostgreSQL statement or lock wait may take; a group commit past connect + 2x this "
        "is given up and its SENDs answered 'not stored, retry'.")
    redis_url: str | None = _setting(
        None, "Redis URL: redis://host:port/db (also rediss://, unix://), "
        "redis+sentinel://host:port,host:port/<service> or redis+cluster://host:port,host:port; "
        "empty = in-memory broker (single node).", parse=_parse_optional_str)
    redis_channel_mode: str = _setting(
        "room", "'room': one Redis channel per room named by roomId (the seed's ChannelTopic); "
        "'single': every room on one channel (the reference master's 'chatroom').")
    redis_channel_prefix: str = _setting("", "Prefix put before every Redis channel name.")
    redis_sharded_pubsub: bool = _setting(
        False, "Room channels use sharded Pub/Sub (SSUBSCRIBE/SPUBLISH, Redis 7): on a Redis Cluster each "
        "message crosses only its channel's shard. Spring servers use classic Pub/Sub: leave off in "
        "mixed fleets.", parse=_parse_bool)
    redis_payload: str = _setting(
        "spring", "Room payloads on Redis: 'spring' = the bare ChatMessage JSON Spring servers read (mixed "
        "fleets); 'envelope' = a seq/room/origin header line before it (gateway-only fleets; Spring "
        "cannot read it). Receivers accept both.")
    redis_single_channel: str = _setting("chatroom", "Channel name used when redis_channel_mode=single.")
    redis_reconnect_max_s: float = _setting(30.0, "Longest back-off between Redis reconnect attempts.")
    redis_timeout_s: float = _setting(
        2.0, "Seconds a Redis connect, PUBLISH or health-check PING may take before Redis counts as down.")
    redis_health_check_s: float = _setting(
        5.0, "Seconds of silence on the Redis pub/sub connection before it is PINGed.")
    redis_pool_size: int = _setting(16, "Most Redis connections one node opens for publishing.")
    presence_ttl_s: int = _setting(30, "Seconds a dead node's presence entries survive before expiring.")
    presence_refresh_s: float = _setting(
        1.0, "Seconds between refreshes of the cached cluster-wide room counts put in messages' userCount.")

    # --- STOMP destinations ---------------------------------------------------------------------
    app_prefixes: tuple[str, ...] = _setting(("/pub",), "Application destination prefixes (comma list).",
                                             parse=_parse_list)
    broker_prefixes: tuple[str, ...] = _setting(("/sub",), "Broker destination prefixes (comma list).",
                                                parse=_parse_list)
    allow_client_broker_send: bool = _setting(
        False, "Let clients SEND straight to broker destinations (Spring allows it; off by default).",
        parse=_parse_bool)

    # --- STOMP limits ------------------------------------------------------------------------------
    max_frame_bytes: int = _setting(65536, "Largest inbound STOMP frame (headers + body), bytes.")
    max_headers: int = _setting(64, "Most headers in one inbound frame.")
    max_header_line_bytes: int = _setting(8192, "Longest inbound command or header line, bytes.")
    max_subscriptions: int = _setting(100, "Most subscriptions one session may hold.")
    max_transactions: int = _setting(10, "Most open transactions one session may hold.")
    max_transaction_frames: int = _setting(1000, "Most frames buffered in one transaction.")
    max_pending_acks: int = _setting(10000, "Most unacknowledged client-ack messages kept per session.")
    connect_timeout_s: float = _setting(10.0, "Seconds a new connection has to send CONNECT.")
    heartbeat_send_min_ms: int = _setting(
        1000, "Shortest server heart-beat interval granted to a client that asks (0 = never send).")
    heartbeat_receive_ms: int = _setting(
        10000, "Interval the server asks clients to heart-beat at (0 = no client heart-beats).")
    heartbeat_grace: float = _setting(2.5, "Close a session silent for this multiple of its heart-beat.")
    outbound_max_bytes: int = _setting(524288, "Bytes queued for one slow session before it is closed (4500).")
    outbound_batch_bytes: int = _setting(
        65536, "Frames already queued for a session are sent together in one WebSocket/SockJS message up "
        "to this size (0 = one frame per message, as Spring does).")
    outbound_send_timeout_s: float = _setting(10.0, "Seconds one socket send may block before close (4500).")
    max_sessions_per_user: int = _setting(
        20, "Most concurrent STOMP sessions per user name, cluster-wide when redis_url is set, else on this "
        "node (0 = unlimited). Anonymous sessions without a login are not counted.")
    max_transaction_bytes: int = _setting(
        1048576, "Most bytes of frames one session may hold buffered in its open transactions.")

    # --- abuse limits ----------------------------------------------------------------------------
    send_rate_per_s: float = _setting(
        50.0, "SENDs per second one user may make (token bucket refill), cluster-wide when redis_url is "
        "set; with auth=anonymous the bucket is the client address's (0 = unlimited).")
    send_burst: int = _setting(500, "SENDs one user may make at once before send_rate_per_s applies (bucket size).")
    send_rate_close_after: int = _setting(
        100, "Refused SENDs (about this many within 10 s) after which a session is closed (0 = never close).")
    rate_limit_sync_s: float = _setting(
        0.1, "Seconds between a node's batched exchanges with Redis of what its users spent (one call for "
        "all users; no Redis call per message).")
    max_connections_per_ip: int = _setting(
        1000, "Most STOMP sessions from one client address on this node (0 = unlimited).")
    sockjs_max_sessions: int = _setting(10000, "Most SockJS sessions on this node (0 = unlimited).")
    http_request_timeout_s: float = _setting(
        10.0, "Seconds a client connection has to send a complete HTTP request (headers and body) "
        "before it is closed.")
    max_http_connections: int = _setting(
        0, "Most open client connections on this node; more are closed on accept with one warning line "
        "(0 = derived from the file-descriptor limit: soft limit minus max(128, 10 %)).")

    # --- authentication --------------------------------------------------------------------------
    auth: str = _setting("anonymous", "Authenticator: anonymous, users or jwt.")
    users: tuple[str, ...] = _setting((), "For auth=users: comma list of login:passcode pairs.",
                                      parse=_parse_list)
    jwt_secret: str = _setting("", "For auth=jwt: the HS256 secret, Base64 as jjwt 0.9 reads it.")

    # --- authorization (docs/security.md) --------------------------------------------------------
    authz_policy: str = _setting(
        "open", "Who may subscribe to, send to and read which room: 'open' (anyone, as Spring), 'members' "
        "(only a room's members; needs auth=users or jwt) or 'package.module:function', an async hook.")
    authz_room_wildcards: bool = _setting(
        False, "With authz_policy=open: allow pattern subscriptions (*, **, ?, {id}) that can match room "
        "destinations, as Spring does. Refused otherwise; 'members' always refuses them.", parse=_parse_bool)
    authz_cache_ttl_s: float = _setting(
        5.0, "Seconds a session's cached access decision is trusted: a membership change made on another "
        "node takes effect there within this (on the node that made it, at once).")

    # --- chat domain ---------------------------------------------------------------------------
    chat_message_destination: str = _setting("/pub/chat/message", "Where clients SEND ChatMessages.")
    chat_room_prefix: str = _setting("/sub/chat/room/", "Destination prefix of room topics.")
    max_message_chars: int = _setting(4000, "Longest chat message text, characters.")
    max_room_name_chars: int = _setting(100, "Longest room name, characters.")
    history_max_limit: int = _setting(500, "Most messages one history request may return.")
    commit_batch_max: int = _setting(256, "Most messages persisted in one group commit.")
    room_head_check_s: float = _setting(
        1.0, "Seconds between a node's reads of the last seq of the rooms it serves: a committed message "
        "whose publication was lost reaches subscribers within 2x this, even in a quiet room.")
    resume_max_messages: int = _setting(
        10000, "Most messages a SUBSCRIBE with x-resume-after may replay; an older resume point gets an ERROR.")
    send_window: int = _setting(
        64, "SENDs one session may have in flight (read, not yet committed); RECEIPTs still leave in "
        "SEND order. 1 = one at a time, as Spring does.")
    max_pending_sends: int = _setting(
        1024, "Uncommitted SENDs a node holds before it stops reading from sending sessions (TCP then "
        "slows the publishers).")

    # --- SockJS -------------------------------------------------------------------------------
    sockjs_heartbeat_s: float = _setting(25.0, "Seconds of idleness before SockJS sends an 'h' frame.")
    sockjs_disconnect_delay_s: float = _setting(
        5.0, "Seconds an HTTP-transport SockJS session survives without a receiver.")
    sockjs_streaming_limit_bytes: int = _setting(131072, "Bytes sent on one streaming response before it is recycled.")
    sockjs_max_cached_messages: int = _setting(
        100, "Messages a SockJS session buffers between polls before it is closed as too slow.")
    sockjs_websocket_enabled: bool = _setting(True, "Offer the SockJS websocket transport.",
                                              parse=_parse_bool)
    sockjs_max_send_bytes: int = _setting(
        1048576, "Largest client payload (one xhr_send body or websocket message) a SockJS session accepts.")

    # --- runtime ----------------------------------------------------------------------------------
    gc_gen0_threshold: int = _setting(
        50000, "Allocations between young garbage collections (Python's default is 700, which made cyclic "
        "GC a quarter of the chat path's CPU); 0 keeps Python's defaults and skips gc.freeze at start.")

    # --- shutdown ------------------------------------------------------------------------------
    drain_timeout_s: float = _setting(5.0, "Seconds to drain sessions and pending writes on shutdown.")

    # --- fleet (gateway.chat.fleet: the nodes sharing a database) --------------------------------
    node_heartbeat_s: float = _setting(
        5.0, "Seconds between a node's refreshes of its entry in the gateway_nodes table (the record of "
        "the live nodes on one database, checked at start).")
    node_stale_s: float = _setting(
        30.0, "Seconds after its last refresh that a node's gateway_nodes entry counts as gone (a crashed "
        "node); must exceed node_heartbeat_s. A starting node refuses to share the database with a live "
        "node that delivers through another Redis (or none).")

    # --- logs and multi-worker serving (gateway.logs, gateway.workers) ---------------------------
    log_format: str = _setting(
        "auto", "Log line format: json (one JSON object per line), text (key=value for a person, coloured "
        "on a terminal) or auto (text when stderr is a terminal, else json).")
    metrics_dir: str = _setting(
        "", "With workers > 1: the directory of prometheus-client's multiprocess files (its *.db files "
        "are deleted at start); empty = a private temporary directory, removed at exit.")

    def validate(self) -> Settings:
        """Return self with derived defaults filled in; raise SettingsError on a bad value."""
        positive_ints = ("max_frame_bytes", "max_headers", "max_header_line_bytes", "max_subscriptions",
                         "max_transactions", "max_transaction_frames", "max_pending_acks",
                         "outbound_max_bytes", "max_message_chars", "max_room_name_chars",
                         "history_max_limit", "commit_batch_max", "sockjs_streaming_limit_bytes",
                         "sockjs_max_cached_messages", "sockjs_max_send_bytes", "workers", "presence_ttl_s",
                         "redis_pool_size", "send_window", "max_pending_sends", "resume_max_messages",
                         "max_transaction_bytes", "send_burst")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1 (got {getattr(self, name)})")
        non_negative = ("heartbeat_send_min_ms", "heartbeat_receive_ms", "max_sessions_per_user",
                        "outbound_batch_bytes", "gc_gen0_threshold", "send_rate_per_s",
                        "send_rate_close_after", "max_connections_per_ip", "sockjs_max_sessions",
                        "max_http_connections")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative (got {getattr(self, name)})")
        positive_floats = ("connect_timeout_s", "outbound_send_timeout_s", "sockjs_heartbeat_s",
                           "sockjs_disconnect_delay_s", "drain_timeout_s", "redis_reconnect_max_s",
                           "redis_timeout_s", "redis_health_check_s", "db_busy_timeout_s",
                           "presence_refresh_s", "room_head_check_s", "db_connect_timeout_s",
                           "db_statement_timeout_s", "rate_limit_sync_s", "http_request_timeout_s",
                           "node_heartbeat_s", "node_stale_s")
        for name in positive_floats:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive (got {getattr(self, name)})")
        if self.heartbeat_grace < 1.0:
            raise SettingsError(f"heartbeat_grace must be at least 1.0 (got {self.heartbeat_grace})")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be 0..65535 (got {self.port})")
        if self.auth not in {"anonymous", "users", "jwt"}:
            raise SettingsError(f"auth must be anonymous, users or jwt (got {self.auth!r})")
        if self.auth == "users":
            if not self.users:
                raise SettingsError("users must list login:passcode pairs when auth=users")
            for pair in self.users:
                if ":" not in pair or not pair.split(":", 1)[0]:
                    raise SettingsError(f"users entry {pair!r} is not login:passcode")
        if self.auth == "jwt" and not self.jwt_secret:
            raise SettingsError("jwt_secret is required when auth=jwt")
        if self.jwt_secret:
            cleaned = "".join(self.jwt_secret.split())
            try:
                base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_" if "-" in cleaned or "_" in cleaned else None,
                                 validate=True)
            except (binascii.Error, ValueError):
                raise SettingsError("jwt_secret must be Base64 (jjwt 0.9 reads String secrets as Base64)") from None
        if self.authz_cache_ttl_s <= 0:
            raise SettingsError(f"authz_cache_ttl_s must be positive (got {self.authz_cache_ttl_s})")
        if self.authz_policy not in {"open", "members"}:
            module, _, function = self.authz_policy.partition(":")
            if not module or not function.isidentifier():
                raise SettingsError(f"authz_policy must be open, members or package.module:function "
                                    f"(got {self.authz_policy!r})")
        if self.authz_policy == "members" and self.auth == "anonymous":
            raise SettingsError("authz_policy=members needs authenticated users (auth=users or jwt): with "
                                "auth=anonymous anyone can claim a member's name")
        if self.authz_policy != "open" and self.allow_client_broker_send:
            raise SettingsError("allow_client_broker_send would let clients publish to rooms past the "
                                f"authz_policy {self.authz_policy!r}: use it only with authz_policy=open")
        if self.redis_payload not in {"spring", "envelope"}:
            raise SettingsError(f"redis_payload must be spring or envelope (got {self.redis_payload!r})")
        if self.redis_channel_mode not in {"room", "single"}:
            raise SettingsError(f"redis_channel_mode must be room or single (got {self.redis_channel_mode!r})")
        if self.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise SettingsError(f"log_level must be debug, info, warning or error (got {self.log_level!r})")
        if self.log_format not in {"auto", "json", "text"}:
            raise SettingsError(f"log_format must be auto, json or text (got {self.log_format!r})")
        for name in ("app_prefixes", "broker_prefixes"):
            prefixes: tuple[str, ...] = getattr(self, name)
            if not prefixes:
                raise SettingsError(f"{name} must name at least one prefix")
            for prefix in prefixes:
                if not prefix.startswith("/"):
                    raise SettingsError(f"{name} entry {prefix!r} must start with '/'")
        for app_prefix in self.app_prefixes:
            for broker_prefix in self.broker_prefixes:
                if app_prefix.startswith(broker_prefix) or broker_prefix.startswith(app_prefix):
                    raise SettingsError(
                        f"app_prefixes entry {app_prefix!r} overlaps broker_prefixes entry {broker_prefix!r}")
        if not (self.database_url.startswith("sqlite") or self.database_url.startswith("postgresql")):
            raise SettingsError(f"database_url must be a sqlite or postgresql URL (got {self.database_url!r})")
        if self.redis_url is not None:
            _check_redis_url(self.redis_url)
        if self.workers > 1 and self.redis_url is None:
            raise SettingsError(
                "workers > 1 needs redis_url: nodes share messages and presence only through Redis")
        if self.node_stale_s <= self.node_heartbeat_s:
            raise SettingsError(f"node_stale_s ({self.node_stale_s:g}) must exceed node_heartbeat_s "
                                f"({self.node_heartbeat_s:g}): a live node would count as gone between refreshes")
        if self.max_header_line_bytes > self.max_frame_bytes:
            raise SettingsError("max_header_line_bytes must not exceed max_frame_bytes")
        if not self.node_id:
            return replace(self, node_id=_default_node_id())
        if any(ch in self.node_id for ch in " /:\n"):
            raise SettingsError(f"node_id must not contain spaces, '/', ':' or newlines (got {self.node_id!r})")
        return self


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://",
                     "redis+cluster://", "rediss+cluster://")


def _check_redis_url(url: str) -> None:
    """Raise SettingsError unless ``url`` has the form of a single-server, Sentinel or Cluster Redis URL
    (gateway.broker.redis_urls parses it fully when the broker is built)."""
    if not url.lower().startswith(REDIS_URL_SCHEMES):
        raise SettingsError(f"redis_url must start with {', '.join(REDIS_URL_SCHEMES)} (got {url!r})")
    if "+sentinel://" in url.lower():
        path = url.split("://", 1)[1].split("?", 1)[0].partition("/")[2]
        if not path.strip("/"):
            raise SettingsError("redis_url: a Sentinel URL names the primary's service, "
                                "e.g. redis+sentinel://host:26379,host:26380/mymaster")


def _field_parser(f: Any) -> Callable[[str], Any]:
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse  # type: ignore[no-any-return]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "int":
        return int
    if kind == "float":
        return float
    if kind == "bool":
        return _parse_bool
    return str


def default(name: str) -> Any:
    """The default of setting ``name``: what a lower layer's constructor uses as its own keyword
    default, so that each default is written once, here."""
    for f in fields(Settings):
        if f.name == name:
            if f.default is MISSING:
                raise KeyError(f"setting {name} has no plain default")
            return f.default
    raise KeyError(f"no setting named {name}")


def setting_fields() -> list[Any]:
    """The dataclass fields of :class:`Settings`, in declaration order (used by docs and the CLI)."""
    return list(fields(Settings))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting to ``parser``; values stay strings until :func:`load_settings`."""
    for f in setting_fields():
        default = f.default if f.default is not MISSING else None
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{f.metadata['help']} [env {env_name(f.name)}; default {default!r}]".replace("%", "%%"))


def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, str | None] | None = None,
                  **values: Any) -> Settings:
    """Build validated settings from the environment, then string overrides (CLI), then typed values.

    Raises :class:`SettingsError` naming the first bad setting.
    """
    env = os.environ if environ is None else environ
    known = {f.name: f for f in setting_fields()}
    kwargs: dict[str, Any] = {}
    sources: list[tuple[str, str, str]] = []  # (name, raw, where)
    for name in known:
        raw_env = env.get(env_name(name))
        if raw_env is not None:
            sources.append((name, raw_env, env_name(name)))
    for name, raw in (overrides or {}).items():
        if raw is not None:
            if name not in known:
                raise SettingsError(f"unknown setting {name!r}")
            sources.append((name, raw, flag_name(name)))
    for name, raw, where in sources:
        try:
            kwargs[name] = _field_parser(known[name])(raw)
        except ValueError as exc:
            raise SettingsError(f"{name} ({where}): invalid value {raw!r}: {exc}") from None
    for name, value in values.items():
        if name not in known:
            raise SettingsError(f"unknown setting {name!r}")
        kwargs[name] = value
    return Settings(**kwargs).validate()


def describe_settings() -> Sequence[tuple[str, str, str, str]]:
    """(name, env var, default, help) per setting, for docs/configuration.md."""
    rows = []
    for f in setting_fields():
        default = f.default if f.default is not MISSING else "(generated)"
        if isinstance(default, tuple):
            default = ",".join(default)
        rows.append((f.name, env_name(f.name), repr(default) if default != "" else "''", f.metadata["help"]))
    return rows
