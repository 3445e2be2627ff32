"""The STOMP layer's limits have no defaults of their own: they are the settings of the same names."""

from __future__ import annotations

from dataclasses import fields

import pytest

from gateway.settings import Settings
from gateway.stomp.codec import FrameParser
from gateway.stomp.session import SessionConfig, StompSession
from gateway.transport.connection import session_config


def test_every_session_limit_is_the_setting_of_the_same_name() -> None:
    settings = Settings(max_subscriptions=7, heartbeat_grace=3.0, app_prefixes=("/app",))
    config = session_config(settings)
    names = [f.name for f in fields(SessionConfig) if f.name != "server_name"]
    assert names and all(getattr(config, name) == getattr(settings, name) for name in names)
    assert (config.max_subscriptions, config.heartbeat_grace, config.app_prefixes) == (7, 3.0, ("/app",))


def test_overrides_and_a_missing_limit() -> None:
    assert SessionConfig.of(Settings(), max_headers=3).max_headers == 3
    with pytest.raises(TypeError):
        SessionConfig.of(object())        # no defaults to fall back on


def test_the_parser_has_no_default_limits_and_the_session_passes_its_own() -> None:
    with pytest.raises(TypeError):
        FrameParser()  # type: ignore[call-arg]
    session = StompSession("s", SessionConfig.of(Settings(), max_frame_bytes=100, max_headers=5,
                                                 max_header_line_bytes=50))
    limits = session._parser
    assert (limits.max_frame_bytes, limits.max_headers, limits.max_header_line_bytes) == (100, 5, 50)
