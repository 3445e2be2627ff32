"""The sans-I/O STOMP server session: one client connection's protocol state.

Owns every STOMP rule the server follows: version negotiation, CONNECT/CONNECTED, heart-beat
negotiation and deadlines, receipts, subscriptions, ack modes and ACK/NACK validation,
transactions, destination classification (application vs broker prefix), DISCONNECT and errors.
It decides; the I/O layer executes:

- ``receive_data(data, now)`` parses bytes and returns :class:`Event` values (facts the I/O layer acts
  on, in order). Frames the session answers itself (CONNECTED, ERROR) are queued as bytes.
- ``data_to_send()`` returns queued outbound bytes; ``render_message`` builds one MESSAGE for a
  subscription; ``send_receipt``/``send_error`` queue answers after the I/O layer did its part.
- ``heartbeat_due``/``peer_timed_out`` implement the heart-beat timers against an injected clock.
- ``on_frame`` (optional) is called with the command of every frame parsed, before it is handled (the
  I/O layer counts frames with it).

Misuse by the I/O layer raises :class:`~gateway.stomp.frames.LocalProtocolError` (a bug in our
code, as in wsproto): a RECEIPT before CONNECTED or once the session's output is closed (after the
ERROR that ended it, or after :meth:`StompSession.close`), and ``refuse_connected`` of a session that is
not CONNECTED. After a DISCONNECT the output stays open until ``close()``: the RECEIPTs of the frames
before it, and its own, are still sent. The I/O layer therefore never writes to a closed session.

A protocol violation never raises out of ``receive_data``: it becomes an ERROR frame (with the bad
frame's ``receipt-id`` when it had a receipt) followed by a :class:`CloseRequested` event. The session
names no WebSocket close codes (they are the transport's, :mod:`gateway.close_codes`, which this layer
cannot import): a ``CloseRequested`` is a protocol error, a ``DisconnectRequested`` a normal close.

Must not import asyncio, Starlette, the broker, the transport or the chat domain.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from gateway.stomp.codec import FrameParser, MessageTemplate, escape, serialize
from gateway.stomp.frames import Frame, LocalProtocolError, ProtocolError

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("1.2", "1.1", "1.0")
ACK_MODES = frozenset({"auto", "client", "client-individual"})
# Headers that carry credentials: never copied from a client's frame to anyone else.
CREDENTIAL_HEADERS = frozenset({"login", "passcode", "token", "authorization", "Authorization"})
# Headers a client's SEND has that must not be forwarded as "custom" headers of a MESSAGE.
_STANDARD_SEND_HEADERS = frozenset({
    "destination", "content-length", "content-type", "receipt", "transaction", "subscription",
    "message-id", "ack", "id",
})


class AuthenticationFailed(Exception):
    """Raised by an authenticator; ``str(exc)`` goes into the ERROR frame's ``message`` header."""


class Principal(str):
    """A user name that also says when the credential it was proven with expires (wall-clock seconds
    since the epoch, or None): what an authenticator returns when the session must end then. It is a
    ``str``, so an authenticator returning one still returns "the user name"."""

    expires_at: float | None

    def __new__(cls, name: str, expires_at: float | None = None) -> Principal:
        principal = super().__new__(cls, name)
        principal.expires_at = expires_at
        return principal


Authenticator = Callable[[Frame], "str | None"]
"""Given the CONNECT frame, return the user name (or None for an anonymous session), or raise
:class:`AuthenticationFailed`. A :class:`Principal` also carries the credential's expiry."""


class State(enum.Enum):
    AWAITING_CONNECT = "awaiting-connect"
    CONNECTED = "connected"
    CLOSED = "closed"


# --- events ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Connected:
    """CONNECT succeeded; CONNECTED is queued. ``expires_at``: when the credential expires (epoch s)."""
    user: str | None
    version: str
    headers: tuple[tuple[str, str], ...]
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The client subscribed; the I/O layer registers it, then calls ``send_receipt(receipt)``."""
    subscription_id: str
    destination: str
    ack: str
    headers: tuple[tuple[str, str], ...]
    receipt: str | None


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    subscription_id: str
    destination: str
    receipt: str | None


@dataclass(frozen=True, slots=True)
class MessageSent:
    """A SEND to apply (outside a transaction, or at COMMIT). ``to_broker`` is True for a SEND straight
    to a broker destination (only when allowed); ``custom_headers`` excludes standard headers and
    credentials."""
    destination: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    receipt: str | None
    to_broker: bool
    custom_headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class ReceiptRequested:
    """A frame the session handled itself asked for a receipt; send it when reached (keeps order)."""
    receipt: str


@dataclass(frozen=True, slots=True)
class DisconnectRequested:
    """Client DISCONNECT: send the receipt (if any), then close normally."""
    receipt: str | None


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """The session failed (an ERROR is queued before it): flush, then close the transport as a
    protocol error (WebSocket 1002; the code is the transport's to name). ``reason`` is for the close frame."""
    reason: str


Event = Connected | Subscribed | Unsubscribed | MessageSent | ReceiptRequested | DisconnectRequested | CloseRequested


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """A session's limits and prefixes. Every field but ``server_name`` is the setting of the same
    name, whose default and meaning are written once, in ``gateway.settings``: build one with
    :meth:`of` (this layer cannot import the settings, so it has no defaults of its own)."""

    max_frame_bytes: int
    max_headers: int
    max_header_line_bytes: int
    max_subscriptions: int
    max_transactions: int
    max_transaction_frames: int
    max_transaction_bytes: int
    max_pending_acks: int
    heartbeat_send_min_ms: int
    heartbeat_receive_ms: int
    heartbeat_grace: float
    app_prefixes: tuple[str, ...]
    broker_prefixes: tuple[str, ...]
    allow_client_broker_send: bool
    server_name: str = "chat-gateway"
    """CONNECTED's ``server`` header; the gateway passes ``chat-gateway/<version>``
    (:func:`gateway.transport.connection.session_config`, from ``gateway.__version__``)."""

    @classmethod
    def of(cls, settings: object, **overrides: Any) -> SessionConfig:
        """The config whose fields are the same-named attributes of ``settings`` (a
        ``gateway.settings.Settings``), then ``overrides``. A missing one is a TypeError."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        values.update(overrides)
        return cls(**values)


@dataclass(slots=True)
class Subscription:
    id: str
    destination: str
    ack: str
    # "subscription:<id>\nmessage-id:<session>-" encoded once (escaped as the session's version says);
    # a delivery only appends its counter.
    header_prefix: bytes = b""


@dataclass(slots=True)
class _Transaction:
    frames: list[Frame] = field(default_factory=list)
    size: int = 0   # bytes buffered (see _buffered_size)


class StompSession:
    """Server side of one STOMP connection. See the module docstring."""

    def __init__(self, session_id: str, config: SessionConfig,
                 authenticator: Authenticator | None = None, *, now: float = 0.0,
                 on_frame: Callable[[str], None] | None = None) -> None:
        self.session_id = session_id
        self.on_frame = on_frame
        self.config = config
        self._authenticate = authenticator
        self.state = State.AWAITING_CONNECT
        self.version: str | None = None
        self.user: str | None = None
        self.expires_at: float | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self._transactions: dict[str, _Transaction] = {}
        self._transaction_bytes = 0   # what every open transaction buffers, bytes
        # message-id -> subscription id, for messages awaiting ACK/NACK (client ack modes only)
        self._pending_acks: OrderedDict[str, str] = OrderedDict()
        self._message_counter = itertools.count()
        self._message_id_prefix = b""   # "<session id>-", encoded once the version is known
        self._outbox: list[bytes] = []
        self._parser = FrameParser(max_frame_bytes=self.config.max_frame_bytes,
                                   max_headers=self.config.max_headers,
                                   max_header_line_bytes=self.config.max_header_line_bytes)
        self.send_interval_s = 0.0     # we beat at least this often (0 = never)
        self.receive_interval_s = 0.0  # the client promised to beat this often (0 = never)
        self.created_at = now
        self.last_received = now
        self.last_sent = now
        self._output_closed = False   # an ERROR ended the session, or close(): nothing more may be queued

    # --- inbound ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def writable(self) -> bool:
        """Whether RECEIPTs may still be queued: not once an ERROR ended the session or ``close()`` ran
        (a DISCONNECT leaves it writable, for the RECEIPTs of the frames up to it)."""
        return not self._output_closed and self.state is not State.AWAITING_CONNECT

    @property
    def escape_headers(self) -> bool:
        return self.version != "1.0"

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed received bytes; returns the events to act on, in order."""
        if self.state is State.CLOSED:
            return []
        self.last_received = now
        events: list[Event] = []
        try:
            frames = self._parser.feed(data)
        except ProtocolError as exc:
            return [self._fail(exc.message, exc.receipt_id)]
        on_frame = self.on_frame
        for frame in frames:
            if on_frame is not None:
                on_frame(frame.command)
            try:
                self._handle(frame, events)
            except ProtocolError as exc:
                events.append(self._fail(exc.message, exc.receipt_id or frame.get("receipt")))
            if self.closed:
                break
        return events

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        command = frame.command
        if self.state is State.AWAITING_CONNECT:
            if command not in ("CONNECT", "STOMP"):
                raise ProtocolError(f"{command} frame received before CONNECT")
            self._connect(frame, events)
            return
        if command in ("CONNECT", "STOMP"):
            return  # a second CONNECT is ignored (CVE-2022-22971)
        receipt = frame.get("receipt")
        if command == "SEND":
            self._send(frame, events, receipt)
        elif command == "SUBSCRIBE":
            self._subscribe(frame, events, receipt)
        elif command == "UNSUBSCRIBE":
            self._unsubscribe(frame, events, receipt)
        elif command in ("ACK", "NACK"):
            transaction = frame.get("transaction")
            self._resolve_ack_target(frame)  # validate now, even inside a transaction
            if transaction is not None:
                self._buffer(transaction, frame)
            else:
                self._apply_ack(frame)
            if receipt is not None:
                events.append(ReceiptRequested(receipt))
        elif command == "BEGIN":
            name = self._required(frame, "transaction")
            if name in self._transactions:
                raise ProtocolError(f"Transaction {name!r} already started")
            if len(self._transactions) >= self.config.max_transactions:
                raise ProtocolError(f"Too many open transactions (limit {self.config.max_transactions})")
            self._transactions[name] = _Transaction()
            if receipt is not None:
                events.append(ReceiptRequested(receipt))
        elif command == "COMMIT":
            tx = self._take_transaction(frame)
            for buffered in tx.frames:
                if buffered.command == "SEND":
                    self._send(buffered, events, None, in_commit=True)
                else:
                    self._apply_ack(buffered)
            if receipt is not None:
                events.append(ReceiptRequested(receipt))
        elif command == "ABORT":
            self._take_transaction(frame)
            if receipt is not None:
                events.append(ReceiptRequested(receipt))
        elif command == "DISCONNECT":
            self.state = State.CLOSED
            events.append(DisconnectRequested(receipt))
        else:  # pragma: no cover - the parser only yields client commands
            raise ProtocolError(f"Unexpected command {command}")

    @staticmethod
    def _required(frame: Frame, name: str) -> str:
        value = frame.get(name)
        if value is None or value == "":
            raise ProtocolError(f"Missing required header '{name}' on {frame.command}")
        return value

    # --- CONNECT ---------------------------------------------------------------------------

    def _connect(self, frame: Frame, events: list[Event]) -> None:
        offered_raw = frame.get("accept-version")
        offered = {v.strip() for v in offered_raw.split(",")} if offered_raw else {"1.0"}
        version = next((v for v in SUPPORTED_VERSIONS if v in offered), None)
        if version is None:
            self._queue_error("Supported protocol versions are 1.2,1.1,1.0", frame.get("receipt"),
                              extra=(("version", ",".join(SUPPORTED_VERSIONS)),))
            self.state = State.CLOSED
            self._output_closed = True
            events.append(CloseRequested("unsupported version"))
            return
        # The version is known from here on, before anything below can refuse the CONNECT: an ERROR
        # answering a 1.0 CONNECT (refused credentials, too many sessions, a bad header) must not be
        # escaped, since STOMP 1.0 has no header escaping.
        self.version = version
        client_send, client_receive = self._parse_heartbeat(frame.get("heart-beat"))
        user: str | None = None
        expires_at: float | None = None
        if self._authenticate is not None:
            try:
                found = self._authenticate(frame)
            except AuthenticationFailed as exc:
                raise ProtocolError(str(exc) or "Authentication failed") from None
            except Exception:
                # A bug in an authenticator: log it here, never put its details on the wire.
                log.exception("session %s: authenticator failed", self.session_id)
                raise ProtocolError("Authentication failed") from None
            if isinstance(found, Principal):
                expires_at = found.expires_at
            user = None if found is None else str(found)
            if user is not None and ("\n" in user or "\r" in user):
                raise ProtocolError("Authentication failed: invalid user name")
        self.user = user
        self.expires_at = expires_at
        self.state = State.CONNECTED
        self._parser.unescape_headers = version != "1.0"
        self._message_id_prefix = ((escape(self.session_id) if version != "1.0" else self.session_id) + "-").encode()
        # Heart-beats (STOMP 1.1+): we can send every `floor` ms; we want to hear every `want` ms.
        floor, want = self.config.heartbeat_send_min_ms, self.config.heartbeat_receive_ms
        if version == "1.0":
            floor = want = 0
        send_ms = max(floor, client_receive) if floor and client_receive else 0
        receive_ms = max(want, client_send) if want and client_send else 0
        self.send_interval_s = send_ms / 1000
        self.receive_interval_s = receive_ms / 1000
        headers: list[tuple[str, str]] = [("version", version), ("heart-beat", f"{floor},{want}"),
                                          ("session", self.session_id), ("server", self.config.server_name)]
        if user is not None:
            headers.append(("user-name", user))
        self._outbox.append(serialize(Frame("CONNECTED", tuple(headers))))
        events.append(Connected(user, version, frame.headers, expires_at))
        receipt = frame.get("receipt")
        if receipt is not None:
            events.append(ReceiptRequested(receipt))

    @staticmethod
    def _parse_heartbeat(raw: str | None) -> tuple[int, int]:
        if raw is None or raw.strip() == "":
            return 0, 0
        parts = raw.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ProtocolError(f"Invalid heart-beat header {raw[:40]!r}")
        return int(parts[0]), int(parts[1])

    # --- SEND ------------------------------------------------------------------------------

    def classify(self, destination: str) -> str:
        """'app', 'broker' or 'unknown' for a destination, by the configured prefixes."""
        for prefix in self.config.app_prefixes:   # loops, not any(<genexpr>): once per SEND
            if _has_prefix(destination, prefix):
                return "app"
        for prefix in self.config.broker_prefixes:
            if _has_prefix(destination, prefix):
                return "broker"
        return "unknown"

    def _send(self, frame: Frame, events: list[Event], receipt: str | None, *, in_commit: bool = False) -> None:
        destination = self._required(frame, "destination")
        kind = self.classify(destination)
        if kind == "unknown":
            raise ProtocolError(f"No destination {destination!r}: SEND to an application prefix "
                                f"({', '.join(self.config.app_prefixes)})")
        if kind == "broker" and not self.config.allow_client_broker_send:
            raise ProtocolError(f"SEND to broker destination {destination!r} is not allowed; "
                                f"send to an application prefix ({', '.join(self.config.app_prefixes)})")
        transaction = frame.get("transaction")
        if transaction is not None and not in_commit:
            self._buffer(transaction, frame)
            if receipt is not None:
                events.append(ReceiptRequested(receipt))
            return
        custom = tuple((k, v) for k, v in frame.headers
                       if k not in _STANDARD_SEND_HEADERS and k not in CREDENTIAL_HEADERS
                       and k.lower() not in CREDENTIAL_HEADERS)
        events.append(MessageSent(destination, frame.headers, frame.body, receipt, kind == "broker", custom))

    # --- transactions -----------------------------------------------------------------------

    def _buffer(self, name: str, frame: Frame) -> None:
        tx = self._transactions.get(name)
        if tx is None:
            raise ProtocolError(f"Unknown transaction {name!r}")
        if len(tx.frames) >= self.config.max_transaction_frames:
            raise ProtocolError(
                f"Transaction {name!r} exceeds the limit of {self.config.max_transaction_frames} frames")
        size = _buffered_size(frame)
        if self._transaction_bytes + size > self.config.max_transaction_bytes:
            raise ProtocolError(f"Transactions exceed the limit of {self.config.max_transaction_bytes} "
                                "buffered bytes per session")
        self._transaction_bytes += size
        tx.size += size
        tx.frames.append(frame)

    def _take_transaction(self, frame: Frame) -> _Transaction:
        name = self._required(frame, "transaction")
        tx = self._transactions.pop(name, None)
        if tx is None:
            raise ProtocolError(f"Unknown transaction {name!r}")
        self._transaction_bytes -= tx.size
        return tx

    # --- SUBSCRIBE / UNSUBSCRIBE --------------------------------------------------------------

    def _subscribe(self, frame: Frame, events: list[Event], receipt: str | None) -> None:
        destination = self._required(frame, "destination")
        sub_id = frame.get("id")
        if sub_id is None or sub_id == "":
            if self.version != "1.0":
                raise ProtocolError("Missing required header 'id' on SUBSCRIBE")
            sub_id = destination
        if sub_id in self.subscriptions:
            raise ProtocolError(f"Subscription id {sub_id!r} is already in use")
        if len(self.subscriptions) >= self.config.max_subscriptions:
            raise ProtocolError(f"Too many subscriptions (limit {self.config.max_subscriptions})")
        if self.classify(destination) != "broker":
            raise ProtocolError(f"Cannot subscribe to {destination!r}: subscribe to a broker prefix "
                                f"({', '.join(self.config.broker_prefixes)})")
        ack = frame.get("ack") or "auto"
        if ack not in ACK_MODES:
            raise ProtocolError(f"Invalid ack mode {ack!r} (auto, client or client-individual)")
        prefix = (b"subscription:" + (escape(sub_id) if self.escape_headers else sub_id).encode()
                  + b"\nmessage-id:" + self._message_id_prefix)
        self.subscriptions[sub_id] = Subscription(sub_id, destination, ack, prefix)
        events.append(Subscribed(sub_id, destination, ack, frame.headers, receipt))

    def _unsubscribe(self, frame: Frame, events: list[Event], receipt: str | None) -> None:
        sub_id = frame.get("id")
        if (sub_id is None or sub_id == "") and self.version == "1.0":
            sub_id = frame.get("destination")
        if sub_id is None or sub_id == "":
            raise ProtocolError("Missing required header 'id' on UNSUBSCRIBE")
        sub = self.subscriptions.pop(sub_id, None)
        if sub is None:
            raise ProtocolError(f"No subscription with id {sub_id!r}")
        stale = [mid for mid, sid in self._pending_acks.items() if sid == sub_id]
        for mid in stale:
            del self._pending_acks[mid]
        events.append(Unsubscribed(sub_id, sub.destination, receipt))

    # --- ACK / NACK ------------------------------------------------------------------------

    def _resolve_ack_target(self, frame: Frame) -> str:
        if self.version == "1.2":
            message_id = self._required(frame, "id")
        else:
            message_id = self._required(frame, "message-id")
        if message_id not in self._pending_acks:
            raise ProtocolError(f"{frame.command} for unknown or already acknowledged message {message_id!r}")
        return message_id

    def _apply_ack(self, frame: Frame) -> None:
        message_id = self._resolve_ack_target(frame)
        sub_id = self._pending_acks[message_id]
        sub = self.subscriptions.get(sub_id)
        if sub is not None and sub.ack == "client":
            # cumulative: everything delivered on this subscription up to this message
            for mid in list(self._pending_acks):
                if self._pending_acks[mid] == sub_id:
                    del self._pending_acks[mid]
                if mid == message_id:
                    break
        else:
            del self._pending_acks[message_id]

    @property
    def pending_acks(self) -> int:
        return len(self._pending_acks)

    # --- outbound --------------------------------------------------------------------------

    def render_message(self, template: MessageTemplate, subscription_id: str) -> bytes | None:
        """One MESSAGE for ``subscription_id`` (None if it no longer exists)."""
        sub = self.subscriptions.get(subscription_id)
        if sub is None or self.state is not State.CONNECTED:
            return None
        counter = str(next(self._message_counter)).encode()
        headers = sub.header_prefix + counter + b"\n"
        if sub.ack != "auto":
            message_id = f"{self.session_id}-{counter.decode()}"
            self._pending_acks[message_id] = subscription_id
            while len(self._pending_acks) > self.config.max_pending_acks:
                self._pending_acks.popitem(last=False)
            if self.version == "1.2":
                headers += b"ack:" + self._message_id_prefix + counter + b"\n"
        return template.render_with(headers, escape_headers=self.escape_headers)

    def send_receipt(self, receipt_id: str) -> None:
        """Queue the RECEIPT of a frame the I/O layer handled (see the module docstring for when)."""
        if self._output_closed:
            raise LocalProtocolError(f"RECEIPT {receipt_id!r} queued after the session was closed")
        if self.version is None or self.state is State.AWAITING_CONNECT:
            raise LocalProtocolError(f"RECEIPT {receipt_id!r} queued before CONNECTED")
        self._outbox.append(serialize(Frame("RECEIPT", (("receipt-id", receipt_id),)),
                                      escape_headers=self.escape_headers))

    def send_error(self, message: str, receipt_id: str | None = None) -> CloseRequested:
        """Queue an ERROR and end the session; returns the close to execute."""
        return self._fail(message, receipt_id)

    def send_error_keep_open(self, message: str, receipt_id: str | None = None) -> None:
        """Queue an ERROR without ending the session (for failures the client may simply retry)."""
        if self.state is not State.CLOSED:
            self._queue_error(message, receipt_id)

    def refuse_connected(self, message: str) -> CloseRequested:
        """Take back the CONNECTED not yet sent (and anything queued after it) and answer the CONNECT
        with an ERROR instead, ending the session: for checks the I/O layer makes after
        ``receive_data`` returned :class:`Connected` (e.g. a cluster-wide count of the user's sessions)."""
        if self.state is not State.CONNECTED or self._output_closed:
            raise LocalProtocolError("refuse_connected() of a session that is not CONNECTED")
        self._outbox.clear()
        self._queue_error(message)
        self.state = State.CLOSED
        self._output_closed = True
        return CloseRequested(message[:120])

    def data_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def _queue_error(self, message: str, receipt_id: str | None = None,
                     extra: Sequence[tuple[str, str]] = ()) -> None:
        headers = [("message", message.replace("\r", " ").replace("\n", " ")[:512])]
        if receipt_id is not None:
            headers.append(("receipt-id", receipt_id))
        headers.extend(extra)
        self._outbox.append(serialize(Frame("ERROR", tuple(headers)), escape_headers=self.escape_headers))

    def _fail(self, message: str, receipt_id: str | None = None) -> CloseRequested:
        if self.state is not State.CLOSED:
            self._queue_error(message, receipt_id)
            self.state = State.CLOSED
            self._output_closed = True
        return CloseRequested(message[:120])

    def close(self) -> None:
        """Mark the session closed (transport lost, or the I/O layer is closing it): nothing more may be
        queued."""
        self.state = State.CLOSED
        self._output_closed = True

    # --- heart-beats --------------------------------------------------------------------------

    def note_sent(self, now: float) -> None:
        self.last_sent = now

    def heartbeat_due(self, now: float) -> bool:
        """True when nothing was sent for the negotiated interval: send ``b"\\n"``."""
        return (self.state is State.CONNECTED and self.send_interval_s > 0
                and now - self.last_sent >= self.send_interval_s)

    def peer_timed_out(self, now: float) -> bool:
        """True when the client was silent for longer than its interval times the grace multiple."""
        return (self.state is State.CONNECTED and self.receive_interval_s > 0
                and now - self.last_received > self.receive_interval_s * self.config.heartbeat_grace)

    def next_timer(self, now: float) -> float | None:
        """Seconds until the next heart-beat check is needed (None: no timers)."""
        deadlines = []
        if self.send_interval_s > 0:
            deadlines.append(self.last_sent + self.send_interval_s)
        if self.receive_interval_s > 0:
            deadlines.append(self.last_received + self.receive_interval_s * self.config.heartbeat_grace)
        if not deadlines or self.state is not State.CONNECTED:
            return None
        return max(0.0, min(deadlines) - now)


def _buffered_size(frame: Frame) -> int:
    """What a buffered frame costs: its body, command and header text (each header line with ':' and EOL)."""
    return (len(frame.body) + len(frame.command) + 1
            + sum(len(key) + len(value) + 2 for key, value in frame.headers))


def _has_prefix(destination: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return destination.startswith(prefix)
    return destination == prefix or destination.startswith(prefix + "/")
