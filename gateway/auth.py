"""Authenticators for STOMP CONNECT frames (the pluggable authentication hook).

Owns: turning CONNECT credentials into a user name or an :class:`AuthenticationFailed`.
- ``anonymous`` (embedded default): the user is the ``login`` header when given, else anonymous. A
  login that claims a reserved name (the system sender ``[알림]``, or a login of the ``users``
  setting) is refused at CONNECT with ``Authentication failed: the name '...' is reserved``; names
  are compared after Unicode NFKC normalisation, case folding and whitespace trimming, so look-alikes
  such as ``[알림] `` or ``ALICE`` are refused too (:func:`is_reserved_name`).
- ``users``: login/passcode pairs from the ``users`` setting; a wrong or missing passcode fails.
- ``jwt``: see :mod:`gateway.jwt_auth` (Spring's jjwt tokens in ``token`` or ``Authorization``).

Failures are logged in one line (no stack traces: spring-framework#26026) and counted in
``chat_gateway_auth_failures_total`` by reason (:mod:`gateway.metrics`). Must not import
Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

import hmac
import logging
import unicodedata
from collections.abc import Iterable

from gateway.metrics import AUTH_FAILURES_BY_REASON
from gateway.settings import Settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed, Authenticator

log = logging.getLogger(__name__)


SYSTEM_SENDER_NAME = "[알림]"
"""The sender of the chat's system messages (gateway.chat.payload.SYSTEM_SENDER; a test keeps them equal)."""


def _canonical(name: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def is_reserved_name(name: str, users: Iterable[str] = ()) -> bool:
    """Whether an unauthenticated client may not call itself ``name``: the system sender, or a login
    of the ``users`` setting, compared after NFKC normalisation, case folding and whitespace trimming."""
    canonical = _canonical(name)
    return canonical == _canonical(SYSTEM_SENDER_NAME) or any(canonical == _canonical(user) for user in users)


def anonymous_authenticator(frame: Frame, reserved_users: Iterable[str] = ()) -> str | None:
    login = frame.get("login")
    if login and is_reserved_name(login, reserved_users):
        log.info("anonymous CONNECT claiming the reserved name %r refused", login[:64])
        AUTH_FAILURES_BY_REASON["reserved_name"].inc()
        raise AuthenticationFailed(f"Authentication failed: the name {login[:64]!r} is reserved")
    return login or None


def reserving_anonymous_authenticator(users: tuple[str, ...]) -> Authenticator:
    """The anonymous authenticator that also refuses the logins of the ``users`` setting."""
    reserved = tuple(pair.partition(":")[0] for pair in users)

    def authenticate(frame: Frame) -> str | None:
        return anonymous_authenticator(frame, reserved)
    return authenticate


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
            AUTH_FAILURES_BY_REASON["bad_credentials"].inc()
            raise AuthenticationFailed("Authentication failed: bad login or passcode")
        return login
    return authenticate


def create_authenticator(settings: Settings) -> Authenticator:
    if settings.auth == "users":
        return users_authenticator(settings.users)
    if settings.auth == "jwt":
        from gateway.jwt_auth import jwt_authenticator
        return jwt_authenticator(settings.jwt_secret)
    return reserving_anonymous_authenticator(settings.users)
