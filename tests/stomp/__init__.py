"""Tests of the sans-I/O STOMP layer, plus the feeding helpers they share.

The helpers feed one input to a fresh :class:`FrameParser` in every way a transport could deliver it
(whole, byte by byte, split once at every point) and insist that the outcome never depends on the split.
Must not import asyncio or any transport.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from gateway.settings import Settings
from gateway.stomp.codec import FrameParser
from gateway.stomp.frames import Frame, ProtocolError

_DEFAULTS = Settings()
DEFAULT_LIMITS = {"max_frame_bytes": _DEFAULTS.max_frame_bytes, "max_headers": _DEFAULTS.max_headers,
                  "max_header_line_bytes": _DEFAULTS.max_header_line_bytes}
"""The parser limits a node runs with by default (the settings of the same names)."""


def new_parser(**parser_args: Any) -> FrameParser:
    """A parser with the default limits, overridden by ``parser_args``."""
    return FrameParser(**{**DEFAULT_LIMITS, **parser_args})


def feed_chunks(chunks: Sequence[bytes], **parser_args: Any) -> tuple[list[Frame], FrameParser]:
    """Feed ``chunks`` one by one to a new parser; every frame produced, and the parser."""
    parser = new_parser(**parser_args)
    frames: list[Frame] = []
    for chunk in chunks:
        frames += parser.feed(chunk)
    return frames, parser


def every_split(data: bytes) -> Iterator[list[bytes]]:
    """``data`` whole, byte by byte, and cut in two at every inner point."""
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def parse_every_way(data: bytes, **parser_args: Any) -> list[Frame]:
    """Frames of ``data``; fails unless every way of splitting it gives the same frames, heart-beat count
    and leftover buffer."""
    expected, parser = feed_chunks([data], **parser_args)
    for chunks in every_split(data):
        frames, other = feed_chunks(chunks, **parser_args)
        assert frames == expected, f"split {[len(c) for c in chunks][:4]} changed the frames"
        assert other.heartbeats == parser.heartbeats
        assert other.buffered == parser.buffered
    return expected


def reject_every_way(data: bytes, error: type[ProtocolError], match: str | None = None,
                     **parser_args: Any) -> None:
    """Fails unless ``data`` raises ``error`` however it is split."""
    for chunks in every_split(data):
        with pytest.raises(error, match=match):
            feed_chunks(chunks, **parser_args)
