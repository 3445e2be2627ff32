"""Hypothesis properties of gateway.stomp.codec: serialize -> parse is the identity however the bytes are
split, MessageTemplate agrees with serialize, and arbitrary bytes never raise anything but
ProtocolError nor grow the parser's buffer past its frame limit.

Must not import asyncio or any transport. Example counts are kept small: the suite must stay fast.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.stomp.codec import FrameParser, MessageTemplate, escape, serialize, unescape
from gateway.stomp.frames import ALL_COMMANDS, UNESCAPED_COMMANDS, Frame, ProtocolError
from tests.stomp import new_parser

SETTINGS = settings(max_examples=60, deadline=None)

ALWAYS_LENGTH = {"MESSAGE", "ERROR", "SEND"}
ESCAPED_COMMANDS = sorted(ALL_COMMANDS - UNESCAPED_COMMANDS)

# Any text, with the characters STOMP escapes (and a few near misses) drawn often.
_chars = st.one_of(st.sampled_from(list(":\n\r\\ctnr\x00")), st.characters(codec="utf-8"))
any_text = st.text(_chars, max_size=12)
any_name = st.text(_chars, min_size=1, max_size=12)
# What CONNECT/CONNECTED and STOMP 1.0 can carry unescaped.
raw_value = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
raw_name = st.text(st.characters(codec="utf-8", exclude_characters="\r\n:"), min_size=1, max_size=12)

bodies = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\x00\x00\n", b"a\x00b"]))
heartbeat_runs = st.sampled_from([b"", b"\n", b"\r\n", b"\n\r\n\n"])


def _headers(names: st.SearchStrategy[str], values: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    pair = st.tuples(names, values)
    given_length = st.tuples(st.just("content-length"), st.sampled_from(["0", "7", "999999", "x"]))
    return st.lists(st.one_of(pair, pair, pair, given_length), max_size=8).map(tuple)


escaped_frames = st.builds(Frame, st.sampled_from(ESCAPED_COMMANDS), _headers(any_name, any_text), bodies)
unescaped_frames = st.builds(Frame, st.sampled_from(sorted(UNESCAPED_COMMANDS)),
                             _headers(raw_name, raw_value), bodies)
raw_frames = st.builds(Frame, st.sampled_from(sorted(ALL_COMMANDS)), _headers(raw_name, raw_value), bodies)


def expected_after_parse(frame: Frame) -> Frame:
    """What the parser yields for ``serialize(frame)``: content-length replaced by the real one, at the end."""
    headers = tuple(h for h in frame.headers if h[0] != "content-length")
    if frame.body or frame.command in ALWAYS_LENGTH:
        headers += (("content-length", str(len(frame.body))),)
    return Frame(frame.command, headers, frame.body)


def random_chunks(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(chunks: list[bytes], **parser_args: Any) -> tuple[list[Frame], FrameParser]:
    parser = new_parser(**parser_args)
    frames: list[Frame] = []
    for chunk in chunks:
        frames += parser.feed(chunk)
    return frames, parser


def _round_trip(frames: list[Frame], beats: list[bytes], data: st.DataObject, *, escaping: bool) -> None:
    stream = b"".join(beat + serialize(frame, escape_headers=escaping)
                      for frame, beat in zip(frames, beats, strict=False))
    parsed, parser = feed_all(random_chunks(data, stream), commands=ALL_COMMANDS, unescape_headers=escaping)
    assert parsed == [expected_after_parse(f) for f in frames]
    assert parser.heartbeats == sum(beat.count(b"\n") for beat in beats[:len(frames)])
    assert parser.buffered == 0


@SETTINGS
@given(frames=st.lists(escaped_frames, min_size=1, max_size=4),
       beats=st.lists(heartbeat_runs, min_size=4, max_size=4), data=st.data())
def test_serialize_then_parse_is_identity(frames: list[Frame], beats: list[bytes], data: st.DataObject) -> None:
    _round_trip(frames, beats, data, escaping=True)


@SETTINGS
@given(frames=st.lists(unescaped_frames, min_size=1, max_size=3),
       beats=st.lists(heartbeat_runs, min_size=3, max_size=3), data=st.data())
def test_connect_and_connected_round_trip_unescaped(frames: list[Frame], beats: list[bytes],
                                                    data: st.DataObject) -> None:
    _round_trip(frames, beats, data, escaping=True)


@SETTINGS
@given(frames=st.lists(raw_frames, min_size=1, max_size=3),
       beats=st.lists(heartbeat_runs, min_size=3, max_size=3), data=st.data())
def test_stomp_1_0_round_trip(frames: list[Frame], beats: list[bytes], data: st.DataObject) -> None:
    _round_trip(frames, beats, data, escaping=False)


@SETTINGS
@given(text=any_text)
def test_unescape_undoes_escape(text: str) -> None:
    escaped = escape(text)
    assert not any(c in escaped for c in ":\n\r")
    assert unescape(escaped) == text


@SETTINGS
@given(destination=any_text, body=bodies, subscription=any_text, message_id=any_text,
       content_type=st.none() | any_text, ack=st.none() | any_text,
       extra=_headers(any_name, any_text), data=st.data())
def test_message_template_matches_serialize(destination: str, body: bytes, subscription: str,
                                            message_id: str, content_type: str | None, ack: str | None,
                                            extra: tuple[tuple[str, str], ...], data: st.DataObject) -> None:
    headers = [("destination", destination)]
    if content_type is not None:
        headers.append(("content-type", content_type))
    headers += [("subscription", subscription), ("message-id", message_id)]
    if ack is not None:
        headers.append(("ack", ack))
    frame = Frame("MESSAGE", (*headers, *extra), body)
    rendered = MessageTemplate(destination, body, content_type=content_type, extra_headers=extra).render(
        subscription, message_id, ack=ack)
    assert rendered == serialize(frame)
    assert feed_all(random_chunks(data, rendered), commands=ALL_COMMANDS)[0] == [expected_after_parse(frame)]


# -- arbitrary input -------------------------------------------------------------------------

LIMITS = {"max_frame_bytes": 96, "max_headers": 4, "max_header_line_bytes": 24}
TOKENS = [b"SEND", b"CONNECT", b"STOMP", b"MESSAGE", b"ACK", b"\n", b"\n", b"\r\n", b"\r", b"\x00", b":",
          b"\\", b"\\c", b"\\n", b"\\t", b"content-length:", b"0", b"5", b"99", b"-", b"k", b"v" * 10,
          b"\xff", "한".encode(), b"\n\n",
          # whole frames, so that garbage often contains some good frames before (or after) the bad bytes
          b"SEND\n\n\x00", b"SEND\ncontent-length:3\n\na\x00c\x00", b"ACK\nid:1\r\n\r\n\x00",
          b"MESSAGE\nk:v\n\n\x00", b"CONNECT\nlogin:a\\t\n\nbody\x00", b"SEND\nk:\\c\n\n\x00"]
garbage = st.one_of(st.binary(max_size=300),
                    st.lists(st.sampled_from(TOKENS), max_size=80).map(b"".join),
                    st.lists(st.sampled_from(TOKENS[-6:] * 4 + TOKENS), max_size=12).map(b"".join))


@settings(max_examples=200, deadline=None)
@given(stream=garbage, unescaping=st.booleans(), commands=st.sampled_from([ALL_COMMANDS, None]),
       data=st.data())
def test_arbitrary_bytes_raise_only_protocol_errors_and_stay_bounded(
        stream: bytes, unescaping: bool, commands: frozenset[str] | None, data: st.DataObject) -> None:
    args: dict[str, Any] = {**LIMITS, "unescape_headers": unescaping}
    if commands is not None:
        args["commands"] = commands
    parser = FrameParser(**args)
    frames: list[Frame] = []
    failed = False
    for chunk in random_chunks(data, stream):
        try:
            frames += parser.feed(chunk)
        except ProtocolError:  # subclasses included; anything else fails the test
            failed = True
            break
        assert parser.buffered <= LIMITS["max_frame_bytes"]
    event(f"failed={failed} frames={min(len(frames), 2)}")
    # The outcome does not depend on how the bytes were split.
    try:
        whole = FrameParser(**args).feed(stream)
    except ProtocolError:
        assert failed
    else:
        assert not failed
        assert frames == whole
