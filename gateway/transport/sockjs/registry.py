"""The SockJS sessions of this process, by session id, and closing them all on shutdown.

Owns: :class:`SessionRegistry`: finding or creating HTTP sessions by id, tracking websocket sessions
(which are not addressable by id: SockJS allows a websocket to reuse an id), the background tasks
sessions spawn, :meth:`SessionRegistry.close_all` for draining, and the cap on sessions per node
(``sockjs_max_sessions``: a new session past it raises :class:`RegistryFull`; the first refusal of an
episode logs one warning).

Sessions live in this process's memory only, so HTTP transports need sticky routing across nodes.

Must not import Starlette or the STOMP layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from gateway.settings import Settings
from gateway.transport.base import CLOSE_TRY_AGAIN_LATER, ConnectionFactory
from gateway.transport.sockjs.protocol import CLOSE_GO_AWAY
from gateway.transport.sockjs.session import SockJSSession

logger = logging.getLogger(__name__)


class RegistryClosing(RuntimeError):
    """The registry is draining (``close_all`` ran): no new sessions."""


class RegistryFull(RuntimeError):
    """The node holds ``sockjs_max_sessions`` SockJS sessions: no new ones until some end."""


#: The close a refused new session gets: 1013 "try again later".
CLOSE_TOO_MANY_SESSIONS = (CLOSE_TRY_AGAIN_LATER, "Too many SockJS sessions")


class SessionRegistry:
    """Every live SockJS session of this process."""

    def __init__(self, settings: Settings, connection_factory: ConnectionFactory) -> None:
        self.settings = settings
        self.connection_factory = connection_factory
        self._sessions: dict[str, SockJSSession] = {}
        self._websockets: set[SockJSSession] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._refusing = False   # in a refusal episode (logged once)

    # --- lookup and creation --------------------------------------------------------------------

    def get(self, session_id: str) -> SockJSSession | None:
        return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions) + len(self._websockets)

    async def get_or_create(self, session_id: str, *, transport: str, remote: str) -> SockJSSession:
        """The HTTP session ``session_id``, created and started if unknown.

        Raises :class:`RegistryClosing` for an unknown id once :meth:`close_all` has run.
        """
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        if self.closing:
            raise RegistryClosing(session_id)
        self._check_room(remote)
        session = SockJSSession(session_id, settings=self.settings, owner=self,
                                connection_factory=self.connection_factory,
                                transport=f"sockjs-{transport}", remote=remote)
        self._sessions[session_id] = session
        try:
            await session.start()
        except BaseException:
            self.forget(session)
            raise
        return session

    async def open_websocket(self, session_id: str, *, remote: str) -> SockJSSession:
        """A new session for one websocket; the caller ends it with ``terminate`` and ``forget``."""
        if self.closing:
            raise RegistryClosing(session_id)
        self._check_room(remote)
        session = SockJSSession(session_id, settings=self.settings, owner=self,
                                connection_factory=self.connection_factory,
                                transport="sockjs-websocket", remote=remote, websocket=True)
        self._websockets.add(session)
        try:
            await session.start()
        except BaseException:
            self.forget(session)
            raise
        return session

    def _check_room(self, remote: str) -> None:
        limit = self.settings.sockjs_max_sessions
        if not limit:
            return
        if len(self) < limit:
            self._refusing = False
            return
        if not self._refusing:
            self._refusing = True
            logger.warning("refusing new SockJS sessions: %d open, limit %d (sockjs_max_sessions); first "
                           "refused from %s", len(self), limit, remote)
        raise RegistryFull(remote)

    # --- SessionOwner ---------------------------------------------------------------------------

    def forget(self, session: SockJSSession) -> None:
        if session.websocket:
            self._websockets.discard(session)
        elif self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- shutdown -------------------------------------------------------------------------------

    async def close_all(self, code: int = CLOSE_GO_AWAY[0], reason: str = CLOSE_GO_AWAY[1], *,
                        flush_timeout_s: float = 1.0) -> None:
        """Close every session with ``c[code,"reason"]`` and refuse new ones.

        Each connection gets ``connection_lost()`` (once); receivers attached at that moment get up
        to ``flush_timeout_s`` to write the close frame. Sessions without a receiver keep serving the
        close frame to later polls until their disconnect delay expires.
        """
        self.closing = True
        sessions = [*self._sessions.values(), *self._websockets]
        await asyncio.gather(*(session.terminate(code, reason) for session in sessions))
        if sessions:
            await asyncio.gather(*(session.wait_no_receiver(flush_timeout_s) for session in sessions))
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=flush_timeout_s)
