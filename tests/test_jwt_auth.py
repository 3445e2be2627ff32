"""JWT authentication as the Spring reference does it (jjwt 0.9.1, HS256, user name in ``jti``)."""

from __future__ import annotations

import base64

import jwt
import pytest

from gateway.jwt_auth import jwt_authenticator, key_from_secret, mint_token, token_from_headers
from gateway.settings import SettingsError, load_settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed

RAW = b"a-long-enough-secret-for-hs256-tokens!"
SECRET = base64.b64encode(RAW).decode()


def connect(**headers: str) -> Frame:
    return Frame.build("CONNECT", {"accept-version": "1.2", **headers})


def test_the_string_secret_is_base64_key_material_like_jjwt() -> None:
    assert key_from_secret(SECRET) == RAW
    assert key_from_secret(base64.urlsafe_b64encode(b"\xfb\xff" * 20).decode().rstrip("=")) == b"\xfb\xff" * 20


def test_a_token_signed_with_the_decoded_key_verifies() -> None:
    # What a Java node does: signWith(HS256, secret) signs with Base64-decoded bytes.
    token = jwt.encode({"jti": "happydaddy", "iat": 1, "exp": 4_000_000_000}, RAW, algorithm="HS256")
    assert jwt_authenticator(SECRET)(connect(token=token)) == "happydaddy"


@pytest.mark.parametrize("header", ["Authorization", "authorization"])
@pytest.mark.parametrize("prefix", ["", "Bearer ", "bearer "])
def test_authorization_header_with_or_without_bearer(header: str, prefix: str) -> None:
    token = mint_token("react-user", RAW)
    assert jwt_authenticator(SECRET)(connect(**{header: prefix + token})) == "react-user"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: None, "no token"),
    (lambda: "garbage", "invalid token"),
    (lambda: mint_token("u", RAW, ttl_s=-5), "token expired"),
    (lambda: mint_token("u", b"another-key-of-sufficient-length-xx"), "invalid token"),
    (lambda: jwt.encode({"jti": "u", "exp": 4_000_000_000}, RAW, algorithm="HS512"), "invalid token"),
    (lambda: jwt.encode({"jti": "u"}, RAW, algorithm="HS256"), "invalid token"),
    (lambda: jwt.encode({"exp": 4_000_000_000}, RAW, algorithm="HS256"), "names no user"),
])
def test_bad_tokens_fail(make: object, reason: str) -> None:
    token = make()  # type: ignore[operator]
    frame = connect() if token is None else connect(token=token)
    with pytest.raises(AuthenticationFailed, match=reason):
        jwt_authenticator(SECRET)(frame)


def test_alg_none_is_refused() -> None:
    token = jwt.encode({"jti": "u", "exp": 4_000_000_000}, None, algorithm="none")
    with pytest.raises(AuthenticationFailed):
        jwt_authenticator(SECRET)(connect(token=token))


def test_token_header_wins_over_authorization() -> None:
    assert token_from_headers(connect(token="a", Authorization="Bearer b")) == "a"


def test_settings_refuse_a_secret_that_is_not_base64() -> None:
    with pytest.raises(SettingsError, match="jwt_secret must be Base64"):
        load_settings(environ={}, auth="jwt", jwt_secret="not base64!")
    with pytest.raises(SettingsError, match="jwt_secret is required"):
        load_settings(environ={}, auth="jwt")
