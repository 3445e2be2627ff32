"""Every Prometheus metric of the gateway, defined once, and the text exposition of them.

Owns: the metric objects (``prometheus_client`` counters, gauges and histograms, names prefixed
``chat_gateway_``), their label children bound once at import for the hot paths (``FRAMES_IN_BY_COMMAND``,
``ERRORS_RATE_LIMIT``, ...: a labelled child costs a dictionary lookup and a lock per ``labels()`` call,
so per-frame code uses the pre-bound ones), and :func:`exposition`, the body of ``GET /metrics``.

Multiprocess mode (``chat-gateway serve --workers N``): when the environment variable
``PROMETHEUS_MULTIPROC_DIR`` names a directory *before* ``prometheus_client`` is first imported, every
process writes its values to memory-mapped files there, and :func:`exposition` reads all of them into
a fresh registry with ``MultiProcessCollector`` (counters and histograms summed over every process
that ever ran, gauges summed over live processes: ``multiprocess_mode="livesum"``). A gauge is
therefore always moved with ``inc``/``dec``/``set`` by the code that owns the fact, never with
``set_function`` (a callback is invisible to the other processes). Without the variable the process's
default registry is exposed (plus Python's process and GC collectors).

Labels are low-cardinality only: transport names, STOMP commands, fixed reason words; never a room,
a user, an address or the text of an exception.

Must not import Starlette, asyncio or anything else of the gateway (it sits just above
``gateway.settings`` in the layers; the sans-I/O ``gateway.stomp`` must not import it either).
"""

from __future__ import annotations

import glob
import os
import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

# No ``*_created`` series (a timestamp per counter and histogram child): nothing here reads them, and
# they double the exposition's size. Process-wide, like the metrics themselves.
disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Frame commands a client may send (the parser yields nothing else).
CLIENT_COMMANDS = ("CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT",
                   "ABORT", "DISCONNECT")
#: Frame commands the server sends.
SERVER_COMMANDS = ("CONNECTED", "MESSAGE", "RECEIPT", "ERROR")

#: Why an ERROR frame was sent (the ``reason`` label of ``chat_gateway_errors_sent_total``).
ERROR_REASONS = (
    "protocol",              # a frame broke the STOMP rules or a limit of the parser / session
    "auth",                  # the CONNECT's credentials were refused
    "too_many_sessions",     # max_sessions_per_user
    "too_many_connections",  # max_connections_per_ip
    "rate_limit",            # a SEND over the user's (or address's) SEND rate
    "not_stored",            # the database did not store the SEND now (session stays open)
    "rejected",              # the application refused the SEND or SUBSCRIBE (bad JSON, unknown room, ...)
    "denied",                # a SUBSCRIBE refused by the authorization policy
    "broker_unavailable",    # the bus refused a publication
    "token_expired",         # the session's JWT expired
    "connect_timeout",       # no CONNECT within connect_timeout_s
    "access_revoked",        # the user left or was removed from a subscribed room
    "server_closing",        # the node drains (shutdown, rolling restart)
    "internal",              # a bug: details are in the log, never on the wire
)

#: Why a STOMP CONNECT (or a REST Basic login) was refused (``chat_gateway_auth_failures_total``).
AUTH_FAILURE_REASONS = ("bad_credentials", "reserved_name", "no_token", "invalid_token", "token_expired")

#: Which abuse limit refused (``chat_gateway_limit_refusals_total``).
LIMITS = ("send_rate", "sessions_per_user", "connections_per_address")

#: Why a session was closed as a slow consumer (``chat_gateway_slow_consumer_closes_total``).
SLOW_CONSUMER_CAUSES = ("queue_bytes", "send_timeout", "resume_backlog")

#: What the authorization policy refused (``chat_gateway_access_denied_total``); gateway.authz.Action.
ACCESS_ACTIONS = ("subscribe", "send", "read", "list", "manage", "create")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# --- sessions and frames (gateway.transport.connection) ------------------------------------------

SESSIONS = Gauge("chat_gateway_sessions", "STOMP connections open now, by transport.", ["transport"],
                 multiprocess_mode="livesum")
CONNECTIONS = Counter("chat_gateway_connections_total", "STOMP connections opened, by transport.", ["transport"])
FRAMES_IN = Counter("chat_gateway_frames_received_total", "STOMP frames received from clients, by command.",
                    ["command"])
FRAMES_OUT = Counter("chat_gateway_frames_sent_total",
                     "STOMP frames queued to clients, by command (heart-beats not counted).", ["command"])
ERRORS = Counter("chat_gateway_errors_sent_total", "ERROR frames sent to clients, by reason.", ["reason"])
SLOW_CONSUMER_CLOSES = Counter("chat_gateway_slow_consumer_closes_total",
                               "Sessions closed (4500) because they did not read fast enough, by cause.",
                               ["cause"])
LIMIT_REFUSALS = Counter("chat_gateway_limit_refusals_total",
                         "SENDs, CONNECTs and connections refused by an abuse limit, by limit.", ["limit"])

# --- authentication and authorization (gateway.auth, gateway.jwt_auth, gateway.authz) ------------

AUTH_FAILURES = Counter("chat_gateway_auth_failures_total",
                        "Credentials refused (STOMP CONNECT, REST Basic login), by reason.", ["reason"])
ACCESS_DENIED = Counter("chat_gateway_access_denied_total",
                        "Requests the authorization policy refused, by action.", ["action"])

# --- the chat path (gateway.chat.group_commit, gateway.chat.service) -------------------------------

MESSAGES_COMMITTED = Counter("chat_gateway_messages_committed_total",
                             "Chat messages stored by this node's group commits (client-id repeats excluded).")
COMMIT_BATCH = Histogram("chat_gateway_commit_batch_messages", "Messages per group-commit transaction.",
                         buckets=_BATCH_BUCKETS)
COMMIT_DURATION = Histogram("chat_gateway_commit_duration_seconds",
                            "Duration of a successful group-commit transaction.", buckets=_LATENCY_BUCKETS)
COMMIT_FAILURES = Counter("chat_gateway_commit_failures_total",
                          "Group-commit transactions that failed, by reason (unavailable: nothing stored, "
                          "the SENDs are answered 'not stored, retry'; error: retried message by message).",
                          ["reason"])
MESSAGES_PUBLISHED = Counter("chat_gateway_messages_published_total",
                             "Committed chat messages published on the bus by this node.")
PUBLISH_FAILURES = Counter("chat_gateway_publish_failures_total",
                           "Publish attempts of committed messages that the bus refused (retried).")
PUBLISH_BACKLOG = Gauge("chat_gateway_publish_backlog",
                        "Committed messages waiting to be published (or re-published after a bus failure).",
                        multiprocess_mode="livesum")
PUBLICATIONS_DROPPED = Counter("chat_gateway_publications_dropped_total",
                               "Committed messages dropped from a full publish backlog (receivers repair "
                               "them from the database).")

# --- the receive path (instrumented in gateway.hub, gateway.chat.sequencer, gateway.chat.component) --

MESSAGES_DELIVERED = Counter("chat_gateway_messages_delivered_total",
                             "MESSAGE frames handed to local subscribers.")
SAVE_TO_DELIVER = Histogram("chat_gateway_save_to_deliver_seconds",
                            "From a message's commit to its delivery to this node's subscribers.",
                            buckets=_LATENCY_BUCKETS)
SEQUENCER_REPAIRS = Counter("chat_gateway_sequencer_repairs_total",
                            "Gap repairs: a room's missing messages read from the database.")
MESSAGES_RECOVERED = Counter("chat_gateway_messages_recovered_total",
                             "Messages delivered from the database by a repair (lost on the bus).")
DUPLICATES_DROPPED = Counter("chat_gateway_duplicates_dropped_total",
                             "Publications dropped because their seq was already delivered.")
SUBSCRIPTIONS = Gauge("chat_gateway_subscriptions", "Local STOMP subscriptions now.",
                      multiprocess_mode="livesum")
ROOMS_SERVED = Gauge("chat_gateway_rooms_served", "Rooms with at least one local subscriber now.",
                     multiprocess_mode="livesum")

# --- the bus (gateway.broker.redis) ---------------------------------------------------------------

REDIS_RECONNECTS = Counter("chat_gateway_redis_reconnects_total",
                           "Redis pub/sub connections made again after one was lost or failed.")

# --- children bound once (the hot paths never call labels()) ----------------------------------------

FRAMES_IN_BY_COMMAND = {command: FRAMES_IN.labels(command) for command in CLIENT_COMMANDS}
FRAMES_OUT_BY_COMMAND = {command: FRAMES_OUT.labels(command) for command in SERVER_COMMANDS}
FRAMES_OUT_MESSAGE = FRAMES_OUT_BY_COMMAND["MESSAGE"]
ERRORS_BY_REASON = {reason: ERRORS.labels(reason) for reason in ERROR_REASONS}
AUTH_FAILURES_BY_REASON = {reason: AUTH_FAILURES.labels(reason) for reason in AUTH_FAILURE_REASONS}
LIMIT_REFUSALS_BY_LIMIT = {limit: LIMIT_REFUSALS.labels(limit) for limit in LIMITS}
SLOW_CONSUMER_BY_CAUSE = {cause: SLOW_CONSUMER_CLOSES.labels(cause) for cause in SLOW_CONSUMER_CAUSES}
ACCESS_DENIED_BY_ACTION = {action: ACCESS_DENIED.labels(action) for action in ACCESS_ACTIONS}
COMMITS_UNAVAILABLE = COMMIT_FAILURES.labels("unavailable")
COMMITS_FAILED = COMMIT_FAILURES.labels("error")


# --- exposition -----------------------------------------------------------------------------------

_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(path: str) -> list[int]:
    """Remove the live-gauge files of processes that are gone (a worker that crashed or was replaced
    never decremented its gauges); returns their pids. Counters and histograms of dead processes are
    kept: they only ever add up."""
    dead: set[int] = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        found = _LIVE_GAUGE_FILE.search(os.path.basename(name))
        if found is not None and not _alive(int(found.group(1))):
            dead.add(int(found.group(1)))
    for pid in sorted(dead):
        _multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return sorted(dead)


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric and its content type. With ``PROMETHEUS_MULTIPROC_DIR``,
    every process's files are merged into a fresh registry (see the module docstring). Blocking
    (reads files): call it in a thread from async code."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        forget_dead_processes(path)
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
