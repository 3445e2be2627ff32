"""One SockJS session: the state machine between a STOMP :class:`Connection` and its receivers.

Owns: the session's life (open until closed by the connection, the server, an aborted receiver, a
slow consumer or the disconnect-delay reaper), the queue of messages between receivers, the rule of
one receiver at a time (a second one gets ``c[2010,...]`` once the first has had
``RECEIVER_HANDOVER_S`` to turn out gone), what the next frame for a receiver is
(``o``, then ``a[...]`` of everything queued, then ``c[...]`` once closed; ``h`` after an idle
heartbeat interval), and calling ``connection_lost()`` exactly once.

A *receiver* is whatever writes frames to the client: one HTTP polling/streaming response, or the
writer of a websocket. The transport layer (``routes.py``, ``websocket.py``) pulls frames with
:meth:`SockJSSession.next_frame` and does the I/O; this module never touches sockets or HTTP.

Must not import Starlette or the STOMP layer (it talks to the connection only through
:mod:`gateway.transport.base`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

from gateway.settings import Settings
from gateway.transport.base import CLOSE_INTERNAL, CLOSE_SLOW_CONSUMER, Connection, ConnectionFactory
from gateway.transport.sockjs.protocol import (
    CLOSE_ANOTHER_CONNECTION,
    CLOSE_INTERRUPTED,
    HEARTBEAT_FRAME,
    OPEN_FRAME,
    close_frame,
    message_frame,
)

logger = logging.getLogger(__name__)

SLOW_CONSUMER_REASON = "Too many messages queued for the client"
INTERNAL_ERROR_REASON = "Internal error"

# How long a new HTTP receiver waits for the one still attached to end before it is refused with
# c[2010,...]. A client that aborts a receiver and at once sends the next one is common (sockjs-client
# after an abort, a proxy that forwards the new request before it closes the old upstream connection):
# its new request can reach the application before the server has processed the old connection's
# close. Waiting on the old receiver (it ends as soon as its disconnect is processed) turns that race
# into the answer the abort deserves (c[1002,...]). A receiver that is genuinely still open only makes
# the refusal this much later.
RECEIVER_HANDOVER_S = 1.0


class SessionOwner(Protocol):
    """What a session needs from its registry."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a tracked background task."""

    def forget(self, session: SockJSSession) -> None:
        """Drop ``session`` from the registry (its id may then start a new session)."""


class Receiver:
    """A handle for the one request (or websocket writer) currently receiving a session's frames."""

    __slots__ = ("session",)

    def __init__(self, session: SockJSSession) -> None:
        self.session = session


class SockJSSession:
    """A SockJS session; it is also the :class:`~gateway.transport.base.FrameSink` of its connection.

    ``websocket=True`` sessions live exactly as long as their websocket (the transport ends them);
    HTTP sessions outlive their requests and are reaped ``sockjs_disconnect_delay_s`` after their
    last receiver left, and remembered that long after closing so later polls still get ``c[...]``.
    """

    def __init__(self, session_id: str, *, settings: Settings, owner: SessionOwner,
                 connection_factory: ConnectionFactory, transport: str, remote: str,
                 websocket: bool = False) -> None:
        self.session_id = session_id
        self.transport = transport
        self.websocket = websocket
        self._settings = settings
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._open_pending = True
        self._queue: deque[str] = deque()
        self._close_status: tuple[int, str] | None = None
        self._receiver: Receiver | None = None
        self._changed = asyncio.Event()        # queue got data, or the session closed
        self._room = asyncio.Event()           # the queue was drained by a receiver
        self._no_receiver = asyncio.Event()
        self._no_receiver.set()
        self._timer: asyncio.TimerHandle | None = None
        self._input_lock = asyncio.Lock()
        self._lost = False
        self.connection: Connection = connection_factory(self, transport=transport, remote=remote)

    # --- state ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._close_status is not None

    @property
    def close_status(self) -> tuple[int, str] | None:
        return self._close_status

    @property
    def has_receiver(self) -> bool:
        return self._receiver is not None

    @property
    def queued(self) -> int:
        """Messages waiting for a receiver."""
        return len(self._queue)

    async def start(self) -> None:
        """Start the connection; for HTTP sessions also arm the disconnect-delay reaper."""
        if not self.websocket and self._receiver is None and not self.closed:
            self._arm_timer(self._settings.sockjs_disconnect_delay_s, self._idle_expired)
        await self.connection.start()

    # --- FrameSink (called by the connection) ---------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Queue one STOMP frame for the client; never blocks unless a receiver is draining.

        A full queue (``sockjs_max_cached_messages``) with no receiver closes the session as a slow
        consumer (4500). With a receiver attached, waits up to ``outbound_send_timeout_s`` for it to
        take the queue, then closes the same way. Frames sent after close are dropped.
        """
        if self.closed:
            return
        text = data.decode("utf-8", errors="replace")
        while len(self._queue) >= self._settings.sockjs_max_cached_messages:
            if self._receiver is None:
                self._close_from_connection_side(CLOSE_SLOW_CONSUMER, SLOW_CONSUMER_REASON)
                return
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), self._settings.outbound_send_timeout_s)
            except TimeoutError:
                self._close_from_connection_side(CLOSE_SLOW_CONSUMER, SLOW_CONSUMER_REASON)
                return
            if self.closed:
                return
        self._queue.append(text)
        self._changed.set()

    async def close(self, code: int, reason: str) -> None:
        """The connection closes the session: ``c[code,"reason"]`` goes to the current or next receiver."""
        self._close_from_connection_side(code, reason)

    # --- transport side -------------------------------------------------------------------------

    async def terminate(self, code: int, reason: str) -> None:
        """The server side ends the session (shutdown, abort, reaper, websocket gone); idempotent.

        Records ``c[code,"reason"]`` if the session was still open, then runs ``connection_lost()``
        (once per session, whoever closed it).
        """
        self._mark_closed(code, reason)
        await self._lose_connection()

    async def deliver(self, messages: list[str]) -> None:
        """Feed client messages to the connection, one ``receive()`` per message, in order."""
        async with self._input_lock:
            for message in messages:
                if self.closed or self.connection.closed:
                    return
                try:
                    await self.connection.receive(message.encode("utf-8"))
                except Exception:
                    logger.exception("SockJS session %s: connection.receive failed", self.session_id)
                    await self.terminate(CLOSE_INTERNAL, INTERNAL_ERROR_REASON)
                    return

    def attach(self) -> Receiver | str:
        """Become the session's receiver, or get the one frame to answer with instead.

        A second receiver while one is attached gets ``c[2010,...]`` (or, once the session is closed,
        its close frame, so the newest request learns why the session ended).
        """
        if self._receiver is not None:
            if self._close_status is not None:
                return close_frame(*self._close_status)
            return close_frame(*CLOSE_ANOTHER_CONNECTION)
        receiver = Receiver(self)
        self._receiver = receiver
        self._no_receiver.clear()
        if not self.closed:
            self._cancel_timer()
        return receiver

    async def attach_when_free(self, wait_s: float = RECEIVER_HANDOVER_S) -> Receiver | str:
        """:meth:`attach` for a new HTTP receiver, after giving a receiver still attached ``wait_s`` to end.

        The attached receiver may belong to a request its client already aborted whose disconnect the
        server has not processed yet; it detaches as soon as it is. If it does within ``wait_s``, this
        receiver takes its place: it gets the close frame when the abort closed the session
        (``c[1002,"Connection interrupted"]``), or becomes the receiver when the old one finished
        normally. Only a receiver still attached after ``wait_s`` makes this one a ``c[2010,...]``.
        """
        deadline = self._loop.time() + wait_s
        while self._receiver is not None and not self.closed:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._no_receiver.wait(), remaining)
            except TimeoutError:
                break
        return self.attach()

    def detach(self, receiver: Receiver) -> None:
        """The receiver finished its response normally; an open HTTP session starts its reap timer."""
        if self._receiver is not receiver:
            return
        self._receiver = None
        self._no_receiver.set()
        if not self.closed and not self.websocket:
            self._arm_timer(self._settings.sockjs_disconnect_delay_s, self._idle_expired)

    async def receiver_lost(self, receiver: Receiver) -> None:
        """The client dropped the receiving request mid-response: close with 1002 (state unknown)."""
        if self._receiver is not receiver:
            return
        self.detach(receiver)
        await self.terminate(*CLOSE_INTERRUPTED)

    async def next_frame(self, receiver: Receiver, heartbeat_s: float) -> str:
        """Wait for the next frame for ``receiver``: ``o``, ``a[...]``, ``c[...]``, or ``h`` when idle.

        Messages are removed from the queue when returned; after ``c[...]`` the receiver must stop.
        """
        while True:
            if self._receiver is not receiver:
                return close_frame(*(self._close_status or CLOSE_ANOTHER_CONNECTION))
            if self._open_pending:
                self._open_pending = False
                return OPEN_FRAME
            if self._queue:
                messages = list(self._queue)
                self._queue.clear()
                self._room.set()
                return message_frame(messages)
            if self._close_status is not None:
                return close_frame(*self._close_status)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), heartbeat_s)
            except TimeoutError:
                return HEARTBEAT_FRAME

    async def wait_no_receiver(self, timeout: float) -> None:
        """Wait (bounded) until no receiver is attached, e.g. after close so ``c[...]`` gets written."""
        try:
            await asyncio.wait_for(self._no_receiver.wait(), timeout)
        except TimeoutError:
            pass

    # --- internals ------------------------------------------------------------------------------

    def _mark_closed(self, code: int, reason: str) -> bool:
        if self._close_status is not None:
            return False
        self._close_status = (code, reason)
        self._changed.set()
        self._room.set()
        if self.websocket:
            self._cancel_timer()
        else:
            # Remembered for disconnect_delay so later polls still get the close frame.
            self._arm_timer(self._settings.sockjs_disconnect_delay_s, self._forget)
        return True

    def _close_from_connection_side(self, code: int, reason: str) -> None:
        # Called from inside the connection (send/close): run connection_lost in its own task so
        # the connection is never re-entered from its own call stack.
        if self._mark_closed(code, reason):
            self._owner.spawn(self._lose_connection())

    async def _lose_connection(self) -> None:
        if self._lost:
            return
        self._lost = True
        try:
            await self.connection.connection_lost()
        except Exception:
            logger.exception("SockJS session %s: connection_lost failed", self.session_id)

    def _arm_timer(self, delay: float, callback: Any) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if self._receiver is not None or self.closed:
            return
        self._owner.forget(self)
        self._owner.spawn(self._reap())

    async def _reap(self) -> None:
        await self.terminate(*CLOSE_INTERRUPTED)
        self._cancel_timer()

    def _forget(self) -> None:
        self._timer = None
        self._owner.forget(self)
