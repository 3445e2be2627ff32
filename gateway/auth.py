"""Authenticators for STOMP CONNECT frames (the pluggable authentication hook).

Owns: turning CONNECT credentials into a user name or an :class:`AuthenticationFailed`.
- ``anonymous`` (embedded default): the user is the ``login`` header when given, else anonymous.
- ``users``: login/passcode pairs from the ``users`` setting; a wrong or missing passcode fails.
- ``jwt``: see :mod:`gateway.jwt_auth` (Spring's jjwt tokens in ``token`` or ``Authorization``).

Failures are logged in one line (no stack traces: spring-framework#26026). Must not import
Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import hmac
import logging

from gateway.settings import Settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed, Authenticator

log = logging.getLogger(__name__)


def anonymous_authenticator(frame: Frame) -> str | None:
    login = frame.get("login")
    return login or None


def users_authenticator(pairs: tuple[str, ...]) -> Authenticator:
    table = {}
    for pair in pairs:
        login, _, passcode = pair.partition(":")
        table[login] = passcode.encode("utf-8")

    def authenticate(frame: Frame) -> str | None:
        login = frame.get("login")
        passcode = (frame.get("passcode") or "").encode("utf-8")
        expected = table.get(login or "")
        if login is None or expected is None or not hmac.compare_digest(expected, passcode):
            log.info("authentication failed for login %r", (login or "")[:64])
            raise AuthenticationFailed("Authentication failed: bad login or passcode")
        return login
    return authenticate


def create_authenticator(settings: Settings) -> Authenticator:
    if settings.auth == "users":
        return users_authenticator(settings.users)
    if settings.auth == "jwt":
        from gateway.jwt_auth import jwt_authenticator
        return jwt_authenticator(settings.jwt_secret)
    return anonymous_authenticator
