"""WebSocket close codes the gateway sends: one name per number, defined here only.

Owns: the RFC 6455 codes (and Spring's 4500) that end a STOMP session or a SockJS session, and
which codes may be sent on the wire at all (:func:`sendable`). The transports (raw WebSocket,
SockJS) and the chat layer (a session whose access was revoked) use these names; the sans-I/O
STOMP session uses none (its ``CloseRequested`` means "protocol error", 1002, chosen by the
connection). SockJS's own close frames that are not WebSocket codes (3000, 2010) live in
:mod:`gateway.transport.sockjs.protocol`.

Must not import anything: the standard library only (every layer may import it).
"""

from __future__ import annotations

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
"""Policy violation: a refused origin, a CONNECT timeout, too many connections, an expired token, revoked access."""
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_SLOW_CONSUMER = 4500
"""Spring's "send limit exceeded / send time limit exceeded"."""

# RFC 6455 section 7.4: the registered codes an endpoint may send (1004-1006 and 1015 are reserved
# or must never be sent), plus the ranges for libraries (3000-3999) and applications (4000-4999).
_SENDABLE_REGISTERED = frozenset({
    CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, 1003, CLOSE_INVALID_DATA, CLOSE_POLICY,
    CLOSE_TOO_BIG, 1010, CLOSE_INTERNAL, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER, 1014,
})


def sendable(code: int) -> bool:
    """Whether ``code`` may be sent in a WebSocket close frame."""
    return code in _SENDABLE_REGISTERED or 3000 <= code <= 4999
