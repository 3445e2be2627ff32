"""JWT authentication compatible with the Spring reference (jjwt 0.9.1, HS256).

Owns: reading the token from a CONNECT frame (``token`` header, or ``Authorization`` with or
without ``Bearer ``), verifying it with a fixed algorithm list (HS256 only) and a required ``exp``,
and taking the user name from ``jti`` (the reference's claim; ``sub`` as a fallback). Also mints
tokens the same way (for the chat page's ``/chat/user``).

Key derivation: jjwt 0.9's ``signWith(HS256, String)`` treats the string as Base64 key material.
``jwt_secret`` is that string: the HMAC key is its Base64 decoding (standard or URL-safe alphabet,
padding optional), exactly as a Java node derives it, so tokens minted by either side verify on both.

A refused CONNECT is counted in ``chat_gateway_auth_failures_total`` (no_token, invalid_token,
token_expired; :mod:`gateway.metrics`). Must not import Starlette, the transport layer or the chat
domain.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from gateway.metrics import AUTH_FAILURES_BY_REASON
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed, Authenticator, Principal

log = logging.getLogger(__name__)

ALGORITHMS = ["HS256"]


class TokenExpired(AuthenticationFailed):
    """The token was valid but its ``exp`` has passed."""


def key_from_secret(secret: str) -> bytes:
    """jjwt 0.9's String-secret rule: the secret is Base64; the key is the decoded bytes."""
    cleaned = "".join(secret.split())
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        if "-" in padded or "_" in padded:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("jwt_secret is not valid Base64 (jjwt 0.9 reads String secrets as Base64)") from None


def token_from_headers(frame: Frame) -> str | None:
    token = frame.get("token")
    if token:
        return token.strip()
    authorization = frame.get("Authorization") or frame.get("authorization")
    if authorization:
        value = authorization.strip()
        if value[:7].lower() == "bearer ":
            value = value[7:].strip()
        return value or None
    return None


def user_from_token(token: str, key: bytes) -> str:
    return str(principal_from_token(token, key))


def principal_from_token(token: str, key: bytes) -> Principal:
    """The token's user and its ``exp`` (a STOMP session is closed with ``token expired`` then)."""
    try:
        claims = jwt.decode(token, key, algorithms=ALGORITHMS, options={"require": ["exp"]})
    except jwt.ExpiredSignatureError:
        raise TokenExpired("Authentication failed: token expired") from None
    except jwt.PyJWTError:
        raise AuthenticationFailed("Authentication failed: invalid token") from None
    user = claims.get("jti") or claims.get("sub")
    if not isinstance(user, str) or not user:
        raise AuthenticationFailed("Authentication failed: token names no user")
    exp = claims.get("exp")
    return Principal(user, float(exp) if isinstance(exp, int | float) else None)


def mint_token(user: str, key: bytes, *, ttl_s: int = 3600, now: float | None = None) -> str:
    """A token shaped like the reference's: ``jti`` = user name, ``iat``, ``exp`` (1 h)."""
    issued = int(time.time() if now is None else now)
    return jwt.encode({"jti": user, "iat": issued, "exp": issued + ttl_s}, key, algorithm="HS256")


def jwt_authenticator(secret: str) -> Authenticator:
    key = key_from_secret(secret)
    if len(key) < 32:
        # Spring deployments often use short secrets; say so once instead of once per CONNECT.
        log.warning("jwt_secret decodes to %d bytes; HS256 keys should be at least 32 bytes", len(key))
        warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

    def authenticate(frame: Frame) -> str | None:
        token = token_from_headers(frame)
        if token is None:
            log.info("CONNECT without token rejected")
            AUTH_FAILURES_BY_REASON["no_token"].inc()
            raise AuthenticationFailed("Authentication failed: no token")
        try:
            return principal_from_token(token, key)
        except AuthenticationFailed as exc:
            log.info("CONNECT rejected: %s", exc)
            AUTH_FAILURES_BY_REASON["token_expired" if isinstance(exc, TokenExpired) else "invalid_token"].inc()
            raise
    return authenticate
