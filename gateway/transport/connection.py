"""One STOMP connection over any transport: the asyncio shell around a sans-I/O StompSession.

Owns: feeding received bytes to the session and executing its events through the hub, the
window of pipelined SENDs (up to ``send_window`` SENDs to application destinations may be in flight
at once: the next frames are read while earlier SENDs wait for their group commit, and their
RECEIPTs, or the ERROR of the first that failed, leave in SEND order; any other frame first waits
for every SEND before it; a full window stops the reading, so TCP slows the client; a SEND whose
session closes meanwhile is still committed, only its RECEIPT is not sent), the
bounded outbound queue and its single writer task (past ``outbound_max_bytes`` queued, or one send
blocked past ``outbound_send_timeout_s``, the session is closed with 4500 without slowing anyone
else), the CONNECT deadline, heart-beat timers, the credential's expiry (ERROR ``token expired`` and
close 1008 at the token's ``exp``), the abuse limits of :mod:`gateway.limits` (sessions per client
address at start; sessions per user at CONNECT; the SEND token bucket, the user's or in the anonymous
mode the client address's, before each SEND reaches its handler: a refused SEND takes its place in
the window and is answered, in order, with an ERROR ``rate limit exceeded`` that keeps the session
open, until repeated refusals close it), and closing exactly once.

Also counts, with the pre-bound children of :mod:`gateway.metrics`: sessions and connections by
transport, frames in and out by command (MESSAGEs added up per connection and flushed by the writer
once per transport write, not per frame), ERRORs by reason, slow-consumer closes and limit refusals.
And logs, on the ``gateway.session`` logger with the fields as ``extra`` (never a body or a
credential): one INFO line when a session is opened (at its CONNECT, when the user is known) and one
when it is closed (duration, the server's close code and reason, SENDs read and MESSAGEs queued).

The protocol decisions live in :mod:`gateway.stomp.session`; the routing in :mod:`gateway.hub`.
Must not import Starlette or the chat domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable

from gateway import __version__
from gateway.broker.base import BrokerUnavailable, Publication
from gateway.hub import (
    RESUME_HEADER,
    Hub,
    InboundMessage,
    MessageNotStored,
    MessageRejected,
    SessionInfo,
    SubscriptionDenied,
)
from gateway.limits import (
    RATE_LIMIT_MESSAGE,
    NodeLimits,
    RefusalMeter,
    address_of,
    create_limits,
)
from gateway.metrics import (
    CONNECTIONS,
    ERRORS_BY_REASON,
    FRAMES_IN_BY_COMMAND,
    FRAMES_OUT_BY_COMMAND,
    FRAMES_OUT_MESSAGE,
    LIMIT_REFUSALS_BY_LIMIT,
    SESSIONS,
    SLOW_CONSUMER_BY_CAUSE,
)
from gateway.settings import Settings
from gateway.stomp.codec import MessageTemplate
from gateway.stomp.frames import Frame
from gateway.stomp.session import (
    Authenticator,
    CloseRequested,
    Connected,
    DisconnectRequested,
    Event,
    MessageSent,
    ReceiptRequested,
    SessionConfig,
    StompSession,
    Subscribed,
    Unsubscribed,
)
from gateway.transport.base import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SLOW_CONSUMER,
    FrameSink,
)

log = logging.getLogger(__name__)
#: One INFO line per session opened (at CONNECT) and closed, fields as ``extra`` (docs/operations.md#logs).
session_log = logging.getLogger("gateway.session")

TOKEN_EXPIRED = "token expired"

_ids = itertools.count(1)
_prefix = f"{os.getpid():x}"

# Server frames by their first byte (CONNECTED, RECEIPT, ERROR: what the session queues itself).
_FRAMES_OUT_BY_FIRST_BYTE = {ord(command[0]): child for command, child in FRAMES_OUT_BY_COMMAND.items()
                             if command != "MESSAGE"}
# The ERROR of a close_soon, by its close code: a policy close is a revoked access (the chat layer's),
# anything else the node draining (Hub.close_all).
_CLOSE_ERROR_REASONS = {CLOSE_POLICY: "access_revoked"}


def _count_frame_in(command: str) -> None:
    child = FRAMES_IN_BY_COMMAND.get(command)
    if child is not None:
        child.inc()


def session_config(settings: Settings) -> SessionConfig:
    """The STOMP session's limits and prefixes: the settings of the same names; CONNECTED's
    ``server`` header names the installed version."""
    return SessionConfig.of(settings, server_name=f"chat-gateway/{__version__}")


def _is_text(frame: bytes) -> bool:
    if frame.isascii():
        return True
    try:
        frame.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class _InFlight:
    """One SEND read and handed to its handler, in SEND order: done when ``future`` is."""

    __slots__ = ("error", "fatal", "future", "reason", "receipt")

    def __init__(self, future: asyncio.Future[None] | None, receipt: str | None, error: str | None,
                 fatal: bool = True, reason: str = "rejected") -> None:
        self.future = future
        self.receipt = receipt
        self.error = error
        self.fatal = fatal   # an ERROR for it closes the session
        self.reason = reason  # the metrics' reason label of that ERROR


class StompConnection:
    """Implements :class:`gateway.transport.base.Connection` and :class:`gateway.hub.Subscriber`."""

    def __init__(self, hub: Hub, settings: Settings, config: SessionConfig, sink: FrameSink, *,
                 transport: str, remote: str, authenticator: Authenticator | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hub = hub
        self.settings = settings
        self.sink = sink
        self.clock = clock
        session_id = f"{_prefix}{next(_ids):x}"
        self.info = SessionInfo(session_id=session_id, transport=transport, remote=remote)
        self._authenticator = authenticator
        self._auth_refused = False   # the authenticator refused the CONNECT (the ERROR's metrics reason)
        self.session = StompSession(session_id, config, self._authenticate if authenticator else None,
                                    now=clock(), on_frame=_count_frame_in)
        self._queue: deque[bytes | _Close] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._lost = False
        self._connected = False
        self._connected_event = asyncio.Event()
        self._lock = asyncio.Lock()
        self._writer_task: asyncio.Task[None] | None = None
        self._aborted = False
        self._inflight: deque[_InFlight] = deque()
        # Subscriptions resuming after a seq: live MESSAGEs wait here until the history before them is out.
        self._catching_up: dict[str, list[MessageTemplate]] = {}
        # After a replay: the last seq replayed per subscription, until a live MESSAGE passes it (a
        # message read from the database may reach this node through the bus after the replay).
        self._replayed_up_to: dict[str, int] = {}
        self._queue_low = asyncio.Event()   # set by the writer when the queue is under half its limit
        self._refusing = False   # a SEND failed: read nothing more, its ERROR closes the session
        if hub.limits is None:
            hub.limits = create_limits(settings)
        self.limits: NodeLimits = hub.limits
        self._address = address_of(remote)
        self._address_counted = False
        self._user_counted: str | None = None   # counted in limits.sessions (released when the session ends)
        self._refusals = RefusalMeter(settings.send_rate_close_after)
        self._rate_key: str | None = None          # whose SEND budget in limits.rate (set at CONNECT)
        self._expires_at: float | None = None      # the credential's expiry, epoch seconds
        self._sessions_gauge = SESSIONS.labels(transport)
        self._gauged = False                       # counted in chat_gateway_sessions (until lost)
        self._opened_at = clock()
        self._close_cause: tuple[int | None, str] | None = None   # the server's close, for the log line
        self._sends = 0        # SEND frames read, and MESSAGE frames queued (the session close line)
        self._delivered = 0
        self._delivered_counted = 0   # how many of them the MESSAGE frames metric has (added per write)

    # --- Connection protocol ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing or self._lost

    async def start(self) -> None:
        CONNECTIONS.labels(self.info.transport).inc()
        self._sessions_gauge.inc()
        self._gauged = True
        self.hub.register(self)
        self._writer_task = asyncio.create_task(self._writer(), name=f"stomp-writer-{self.info.session_id}")
        self._tasks.append(self._writer_task)
        if not self.limits.addresses.acquire(self._address):
            limit = self.limits.addresses.limit
            LIMIT_REFUSALS_BY_LIMIT["connections_per_address"].inc()
            self._fail(f"Too many connections from this address (limit {limit})", None, code=CLOSE_POLICY,
                       reason="too_many_connections")
            return
        self._address_counted = True
        self._tasks.append(asyncio.create_task(self._timers(), name=f"stomp-timers-{self.info.session_id}"))

    async def receive(self, data: bytes) -> None:
        if self.closed or self._refusing:
            return
        async with self._lock:  # transports may call concurrently (SockJS xhr_send)
            if self.closed or self._refusing:
                return
            try:
                events = self.session.receive_data(data, self.clock())
            except Exception:  # a bug in the session: never a traceback on the wire or a dead task
                log.exception("session %s: internal error receiving data", self.info.session_id)
                self._fail("Internal server error", None, code=CLOSE_INTERNAL, reason="internal")
                return
            if events and isinstance(events[-1], CloseRequested):
                # The session refused a frame itself and queued its ERROR.
                ERRORS_BY_REASON["auth" if self._auth_refused else "protocol"].inc()
            if events and isinstance(events[0], Connected) and not await self._count_user(events[0]):
                return
            self._drain_session()
            for event in events:
                if self._lost or self._refusing:
                    break
                if isinstance(event, MessageSent):
                    self._sends += 1
                if isinstance(event, MessageSent) and not event.to_broker:
                    await self._submit(event)
                    continue
                if self._inflight:
                    await self._settle()
                    if self._lost or self._refusing:
                        break
                await self._handle(event)
                self._drain_session()

    async def connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._log_closed()
        if self._gauged:
            self._gauged = False
            self._sessions_gauge.dec()
        self._flush_messages_out()
        if self._address_counted:
            self._address_counted = False
            self.limits.addresses.release(self._address)
        if self._user_counted is not None:
            user, self._user_counted = self._user_counted, None
            self.limits.sessions.release(user)
        self._queue_low.set()
        self.session.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self.hub.session_ended(self, connected=self._connected)

    def _log_fields(self) -> dict[str, object]:
        return {"session": self.info.session_id, "transport": self.info.transport, "user": self.info.user,
                "remote": self.info.remote}

    def _log_closed(self) -> None:
        code, reason = self._close_cause or (None, "connection lost")
        session_log.info("session closed", extra={
            **self._log_fields(), "duration_s": round(self.clock() - self._opened_at, 3), "close_code": code,
            "close_reason": reason, "connected": self._connected, "sends": self._sends,
            "delivered": self._delivered})

    # --- Subscriber protocol ----------------------------------------------------------------

    def deliver(self, template: MessageTemplate, subscription_id: str) -> None:
        if self.closed:
            return
        if self._catching_up:
            held = self._catching_up.get(subscription_id)
            if held is not None:
                if len(held) >= self.settings.resume_max_messages:
                    log.info("session %s: %d live messages held behind a replay, closing slow consumer",
                             self.info.session_id, len(held))
                    self._abort_slow("resume_backlog")
                    return
                held.append(template)
                return
        if self._replayed_up_to:
            floor = self._replayed_up_to.get(subscription_id)
            if floor is not None and template.seq is not None:
                if template.seq <= floor:
                    return  # replayed from history already; its bus copy arrived late
                del self._replayed_up_to[subscription_id]
        self._render(template, subscription_id)

    def _render(self, template: MessageTemplate, subscription_id: str) -> None:
        data = self.session.render_message(template, subscription_id)
        if data is not None:
            self._enqueue(data)
            self._delivered += 1

    def _flush_messages_out(self) -> None:
        uncounted = self._delivered - self._delivered_counted
        if uncounted:
            FRAMES_OUT_MESSAGE.inc(uncounted)
            self._delivered_counted = self._delivered

    def close_soon(self, code: int, reason: str, error: str | None = None) -> None:
        if self.closed:
            return
        if error is not None:
            if not self.session.closed:
                ERRORS_BY_REASON[_CLOSE_ERROR_REASONS.get(code, "server_closing")].inc()
            self.session.send_error(error)
            self._drain_session()
        self._begin_close(code, reason)

    # --- event execution -----------------------------------------------------------------------

    async def _count_user(self, event: Connected) -> bool:
        """Count the new session against its user's limit (cluster-wide with Redis); on refusal the
        CONNECTED is taken back and the CONNECT answered with an ERROR. True when the session may go on."""
        limit = self.settings.max_sessions_per_user
        user = event.user
        if not limit or user is None:
            return True
        if await self.limits.sessions.acquire(user, limit):
            if self._lost:
                self.limits.sessions.release(user)
                return False
            self._user_counted = user
            return True
        if self.closed:
            return False   # lost (or closed) while counting: nothing to refuse
        log.info("session %s: CONNECT of %r refused: %d sessions (max_sessions_per_user)",
                 self.info.session_id, user[:64], limit)
        LIMIT_REFUSALS_BY_LIMIT["sessions_per_user"].inc()
        ERRORS_BY_REASON["too_many_sessions"].inc()
        close = self.session.refuse_connected(f"Too many sessions for user {user!r} (limit {limit})")
        self._drain_session()
        self._begin_close(CLOSE_PROTOCOL_ERROR, close.reason)
        return False

    def _rate_allowed(self) -> bool | None:
        """The SEND token bucket without waiting (None: ask :meth:`_rate_wait`)."""
        if self._rate_key is None or self.limits.rate is None:
            return True
        return self.limits.rate.try_acquire(self._rate_key)

    async def _rate_wait(self) -> bool:
        assert self.limits.rate is not None and self._rate_key is not None
        return await self.limits.rate.acquire(self._rate_key)

    def _rate_refused(self) -> bool:
        """Count a refused SEND; True when the refusals add up to abuse and the session must close."""
        LIMIT_REFUSALS_BY_LIMIT["send_rate"].inc()
        close = self._refusals.refuse(self.clock())
        if close:
            log.info("session %s (user %r, %s): closed after repeated SENDs over the rate limit",
                     self.info.session_id, self.info.user, self._address)
        return close

    async def _handle(self, event: Event) -> None:
        try:
            if isinstance(event, MessageSent):  # only broker SENDs come here
                await self._message(event)
            elif isinstance(event, Subscribed):
                resume_after = self._resume_point(event)
                if resume_after is not None:
                    self._catching_up[event.subscription_id] = []
                await self.hub.subscribe(self, event.subscription_id, event.destination)
                if self._lost:
                    # The connection died while the subscription was being set up (after
                    # session_ended removed this session's subscriptions): undo it, or it leaks.
                    await self.hub.unsubscribe(self, event.subscription_id, event.destination,
                                               run_hooks=False)
                    return
                history: list[MessageTemplate] = []
                if resume_after is not None:
                    # Read before the RECEIPT: a refused resume is an ERROR without a RECEIPT.
                    history = await self._resume_history(event.subscription_id, event.destination,
                                                         resume_after)
                if event.receipt is not None:
                    self._receipt(event.receipt)
                    self._drain_session()
                if resume_after is not None:
                    await self._replay(event.subscription_id, resume_after, history)
                await self.hub.subscribed(self, event.subscription_id, event.destination)
            elif isinstance(event, Unsubscribed):
                self._replayed_up_to.pop(event.subscription_id, None)
                await self.hub.unsubscribe(self, event.subscription_id, event.destination)
                if event.receipt is not None:
                    self._receipt(event.receipt)
            elif isinstance(event, ReceiptRequested):
                self._receipt(event.receipt)
            elif isinstance(event, Connected):
                self.info.user = event.user
                self.info.version = event.version
                self._expires_at = event.expires_at
                # Whose SEND budget: an authenticated user's (all their sessions share it); in the
                # anonymous mode the client address's (a login there is a free claim: keyed by it,
                # anyone could drain another's budget, or escape the limit by reconnecting).
                if event.user is not None and self.settings.auth != "anonymous":
                    self._rate_key = "user:" + event.user
                else:
                    self._rate_key = "addr:" + self._address
                self._connected = True
                self._connected_event.set()
                session_log.info("session opened", extra={**self._log_fields(), "stomp_version": event.version})
                await self.hub.session_connected(self)
            elif isinstance(event, DisconnectRequested):
                if event.receipt is not None:
                    self._receipt(event.receipt)
                self._drain_session()
                self._begin_close(CLOSE_NORMAL, "DISCONNECT")
            elif isinstance(event, CloseRequested):
                self._begin_close(CLOSE_PROTOCOL_ERROR, event.reason)
        except (MessageRejected, SubscriptionDenied) as exc:
            self._fail(str(exc), getattr(event, "receipt", None),
                       reason="denied" if isinstance(exc, SubscriptionDenied) else "rejected")
        except BrokerUnavailable:
            log.warning("session %s: broker unavailable", self.info.session_id)
            self._fail("Message broker unavailable, try again", getattr(event, "receipt", None),
                       reason="broker_unavailable")
        except Exception:
            log.exception("session %s: internal error handling %s", self.info.session_id, type(event).__name__)
            self._fail("Internal server error", getattr(event, "receipt", None), reason="internal")

    async def _message(self, event: MessageSent) -> None:
        """A SEND straight to a broker destination (application SENDs go through :meth:`_submit`)."""
        allowed = self._rate_allowed()
        if allowed is None:
            allowed = await self._rate_wait()
        if not allowed:
            if self._rate_refused():
                self._fail(RATE_LIMIT_MESSAGE, event.receipt, reason="rate_limit")
            else:
                self._error_keep_open(RATE_LIMIT_MESSAGE, event.receipt, "rate_limit")
            return
        content_type = event.get("content-type")
        await self.hub.publish(Publication(event.destination, event.body, content_type=content_type,
                                           headers=event.custom_headers, origin=self.hub.node_id))
        if event.receipt is not None:
            self._receipt(event.receipt)

    # --- pipelined SENDs to application destinations ----------------------------------------------

    async def _submit(self, event: MessageSent) -> None:
        """Hand one SEND to its handler and keep its outcome in the window (see module docstring)."""
        while len(self._inflight) >= self.settings.send_window and not self._lost:
            await self._wait_head()
        if self._lost or self._refusing:
            return
        allowed = self._rate_allowed()
        if allowed is None:
            allowed = await self._rate_wait()
            if self._lost or self._refusing:
                return
        if not allowed:
            # Refused before the handler: nothing is stored. Its ERROR takes the SEND's place in the
            # window, so every RECEIPT and ERROR still leaves in SEND order.
            fatal = self._rate_refused()
            self._inflight.append(_InFlight(None, event.receipt, RATE_LIMIT_MESSAGE, fatal, "rate_limit"))
            if fatal:
                self._refusing = True
            self._advance()
            return
        future: asyncio.Future[None] | None = None
        error: str | None = None
        fatal = True
        reason = "rejected"
        try:
            handler = self.hub.router.resolve(event.destination)
            if handler is None:
                raise MessageRejected(f"No handler for destination {event.destination!r}")
            future = await handler(InboundMessage(self.info, event.destination, event.headers, event.body))
        except MessageRejected as exc:
            error = str(exc)
            fatal = exc.close_session
            reason = "not_stored" if isinstance(exc, MessageNotStored) else "rejected"
        except BrokerUnavailable:
            log.warning("session %s: broker unavailable", self.info.session_id)
            error = "Message broker unavailable, try again"
            reason = "broker_unavailable"
        except Exception:
            log.exception("session %s: internal error handling a SEND", self.info.session_id)
            error = "Internal server error"
            reason = "internal"
        self._inflight.append(_InFlight(future, event.receipt, error, fatal, reason))
        if error is not None and fatal:
            self._refusing = True
        elif future is not None and not future.done():
            future.add_done_callback(self._send_done)
        self._advance()

    def _send_done(self, _future: asyncio.Future[None]) -> None:
        self._advance()

    def _advance(self) -> None:
        """Answer the SENDs at the head of the window that are done: RECEIPT, or ERROR and close."""
        inflight = self._inflight
        while inflight:
            head = inflight[0]
            future = head.future
            if future is not None and not future.done():
                break
            inflight.popleft()
            error, fatal, reason = head.error, head.fatal, head.reason
            if future is not None:
                exc = MessageRejected("Message not stored") if future.cancelled() else future.exception()
                if isinstance(exc, MessageRejected):
                    error, fatal = str(exc), exc.close_session
                    reason = "not_stored" if isinstance(exc, MessageNotStored) else "rejected"
                elif exc is not None:
                    log.error("session %s: a SEND failed", self.info.session_id, exc_info=exc)
                    error, reason = "Internal server error", "internal"
            if self.closed:
                continue  # nobody to answer; the message was committed or not, either way not dropped
            if error is not None and not fatal:
                self._error_keep_open(error, head.receipt, reason)
            elif error is not None:
                self._refusing = True
                self._fail(error, head.receipt, reason=reason)
            elif head.receipt is not None:
                self._receipt(head.receipt)
        if not self.closed:
            self._drain_session()

    async def _wait_head(self) -> None:
        head = self._inflight[0]
        if head.future is not None and not head.future.done():
            await asyncio.wait((head.future,))  # never cancels the SEND's future
        self._advance()

    async def _settle(self) -> None:
        """Wait until every SEND read so far is answered (before any other frame is handled)."""
        while self._inflight and not self._lost:
            await self._wait_head()

    @staticmethod
    def _resume_point(event: Subscribed) -> int | None:
        raw = next((value for key, value in event.headers if key == RESUME_HEADER), None)
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 18:
            raise MessageRejected(f"{RESUME_HEADER} must be a sequence number (0 or more), not {raw!r}")
        return int(raw)

    async def _resume_history(self, subscription_id: str, destination: str, after: int) -> list[MessageTemplate]:
        try:
            return await self.hub.resume(destination, after)
        except BaseException:
            self._catching_up.pop(subscription_id, None)
            raise

    async def _replay(self, subscription_id: str, after: int, history: list[MessageTemplate]) -> None:
        """Send the history after ``after``, then the live MESSAGEs held meanwhile, without overlap;
        later live copies of replayed messages are dropped too."""
        last = after
        for template in history:
            # Paced by the writer: a long replay never makes this session a slow consumer by itself.
            while self._queued_bytes > self.settings.outbound_max_bytes // 2 and not self.closed:
                self._queue_low.clear()
                await self._queue_low.wait()
            if self.closed:
                return
            self._render(template, subscription_id)
            last = template.seq if template.seq is not None else last
        self._replayed_up_to[subscription_id] = last
        for template in self._catching_up.pop(subscription_id, []):
            self.deliver(template, subscription_id)

    def _authenticate(self, frame: Frame) -> str | None:
        """The authenticator, noting a refusal (the session turns it into an ERROR and a close)."""
        assert self._authenticator is not None
        try:
            return self._authenticator(frame)
        except Exception:
            self._auth_refused = True
            raise

    def _error_keep_open(self, message: str, receipt: str | None, reason: str) -> None:
        if not self.session.closed:
            ERRORS_BY_REASON[reason].inc()
        self.session.send_error_keep_open(message, receipt)

    def _fail(self, message: str, receipt: str | None, *, code: int | None = None, reason: str) -> None:
        """ERROR (counted under ``reason``, one of gateway.metrics.ERROR_REASONS) and close."""
        if not self.session.closed:
            ERRORS_BY_REASON[reason].inc()
        close = self.session.send_error(message, receipt)
        self._drain_session()
        self._begin_close(code or CLOSE_PROTOCOL_ERROR, close.reason)

    # --- outbound ------------------------------------------------------------------------------

    def _receipt(self, receipt: str) -> None:
        """Queue a RECEIPT unless the connection is closing or gone (the session refuses to write
        after its close: a frame handled across an await may find the connection closed, and a frame
        before a protocol error in the same read finds the session ended by its ERROR)."""
        if not self.closed and self.session.writable:
            self.session.send_receipt(receipt)

    def _drain_session(self) -> None:
        # The session's own frames (CONNECTED, RECEIPT, ERROR) count against the queue limit too: a
        # client that keeps asking for receipts without reading them is a slow consumer like any other.
        for data in self.session.data_to_send():
            if not self._closing:
                child = _FRAMES_OUT_BY_FIRST_BYTE.get(data[0])
                if child is not None:
                    child.inc()
            self._enqueue(data)

    def _enqueue(self, data: bytes, *, force: bool = False) -> None:
        if self._closing:
            return
        # Like Spring's ConcurrentWebSocketSessionDecorator, one frame is always accepted into an
        # empty queue (a 1 MB MESSAGE to a fast client is not a slow consumer); the limit bounds backlog.
        if (not force and self._queued_bytes
                and self._queued_bytes + len(data) > self.settings.outbound_max_bytes):
            log.info("session %s: outbound queue over %d bytes, closing slow consumer",
                     self.info.session_id, self.settings.outbound_max_bytes)
            self._abort_slow("queue_bytes")
            return
        self._queue.append(data)
        self._queued_bytes += len(data)
        self._wakeup.set()

    def _abort_slow(self, cause: str) -> None:
        SLOW_CONSUMER_BY_CAUSE[cause].inc()
        # Drop what is queued: a slow consumer must not hold memory or delay its close. A send that
        # is blocked right now is abandoned too (the writer is cancelled), so the session ends at
        # once instead of after outbound_send_timeout_s.
        self._queue.clear()
        self._queued_bytes = 0
        self._begin_close(CLOSE_SLOW_CONSUMER, "Send limit exceeded")
        self._aborted = True
        if self._writer_task is not None and self._writer_task is not asyncio.current_task():
            self._writer_task.cancel()

    def _begin_close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_cause = (code, reason)
        self.session.close()
        self._queue.append(_Close(code, reason))
        self._wakeup.set()

    def _take_batch(self, first: bytes, limit: int) -> bytes:
        """Join frames that are already queued behind ``first`` into one transport message (up to
        ``limit`` bytes). Never waits for more: a lone frame goes out alone, at once. Only text
        (UTF-8) frames are joined, so a binary frame still travels as its own binary message."""
        if not _is_text(first):
            return first
        parts = [first]
        size = len(first)
        queue = self._queue
        while queue and size < limit:
            nxt = queue[0]
            if not isinstance(nxt, bytes) or size + len(nxt) > limit or not _is_text(nxt):
                break
            queue.popleft()
            self._queued_bytes -= len(nxt)
            size += len(nxt)
            parts.append(nxt)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _writer(self) -> None:
        timeout = self.settings.outbound_send_timeout_s
        batch_limit = self.settings.outbound_batch_bytes
        close: _Close | None = None
        try:
            while True:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                item = self._queue.popleft()
                if isinstance(item, _Close):
                    close = item
                    break
                self._queued_bytes -= len(item)
                if batch_limit and self._queue and isinstance(self._queue[0], bytes):
                    item = self._take_batch(item, batch_limit)
                try:
                    async with asyncio.timeout(timeout):
                        await self.sink.send(item)
                except TimeoutError:
                    log.info("session %s: send blocked over %.1fs, closing", self.info.session_id, timeout)
                    SLOW_CONSUMER_BY_CAUSE["send_timeout"].inc()
                    close = _Close(CLOSE_SLOW_CONSUMER, "Send time limit exceeded")
                    self._closing = True
                    self._queue.clear()
                    self._queued_bytes = 0
                    break
                except Exception:
                    break  # the transport is gone
                self.session.note_sent(self.clock())
                self._flush_messages_out()
                if self._queued_bytes <= self.settings.outbound_max_bytes // 2:
                    self._queue_low.set()
        except asyncio.CancelledError:
            if not self._aborted:
                return  # connection_lost cancelled us
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            close = _Close(CLOSE_SLOW_CONSUMER, "Send limit exceeded")
        # Release the session (hub, subscriptions, hooks) before the close handshake: the close may
        # wait for a peer that does not read, and nothing else must wait with it.
        if close is not None:
            self._close_cause = (close.code, close.reason)
        await self.connection_lost()
        if close is not None:
            # Not bounded by a timeout: a stalled peer gets the close frame if it ever reads again,
            # and the transport (uvicorn) owns the socket's lifetime; this task holds no queue.
            with contextlib.suppress(Exception):
                await self.sink.close(close.code, close.reason)

    async def _timers(self) -> None:
        try:
            deadline = self.settings.connect_timeout_s
            try:
                await asyncio.wait_for(self._connected_event.wait(), deadline)
            except TimeoutError:
                if not self.closed:
                    log.info("session %s: no CONNECT within %.1fs", self.info.session_id, deadline)
                    ERRORS_BY_REASON["connect_timeout"].inc()
                    self.session.send_error(f"No CONNECT frame within {deadline:g} s")
                    self._drain_session()
                    self._begin_close(CLOSE_POLICY, "CONNECT timeout")
                return
            while not self.closed:
                now = self.clock()
                if self._expires_at is not None and time.time() >= self._expires_at:
                    log.info("session %s: token of %r expired, closing", self.info.session_id, self.info.user)
                    self._fail(TOKEN_EXPIRED, None, code=CLOSE_POLICY, reason="token_expired")
                    return
                if self.session.peer_timed_out(now):
                    log.info("session %s: no heart-beat from client, closing", self.info.session_id)
                    self._begin_close(CLOSE_PROTOCOL_ERROR, "Heart-beat timeout")
                    return
                if self.session.heartbeat_due(now):
                    if not self._queue:
                        self._enqueue(b"\n", force=True)
                    # A non-empty queue is about to send anyway; restart the interval either way
                    # (otherwise this loop would spin while a send is blocked).
                    self.session.note_sent(now)
                wait = self.session.next_timer(self.clock())
                if self._expires_at is not None:
                    left = self._expires_at - time.time()
                    wait = left if wait is None else min(wait, left)
                if wait is None:
                    return
                await asyncio.sleep(max(wait, 0.01))
        except asyncio.CancelledError:
            return
