"""Byte-level tests of gateway.stomp.codec: the incremental parser, its limits, escaping, the serializer
and MessageTemplate. Every parse is checked whole, byte by byte and split at every point.

Must not import asyncio or any transport.
"""

from __future__ import annotations

import pytest

from gateway.stomp.codec import FrameParser, MessageTemplate, escape, serialize, unescape
from gateway.stomp.frames import (
    ALL_COMMANDS,
    CLIENT_COMMANDS,
    SERVER_COMMANDS,
    Frame,
    FrameTooLarge,
    HeaderLineTooLong,
    InvalidEscape,
    ProtocolError,
    TooManyHeaders,
)
from tests.stomp import feed_chunks, new_parser, parse_every_way, reject_every_way

# -- commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(CLIENT_COMMANDS))
def test_every_client_command_parses(command: str) -> None:
    data = command.encode() + b"\nreceipt:r-1\n\n\x00"
    assert parse_every_way(data) == [Frame(command, (("receipt", "r-1"),), b"")]


def test_client_command_set_is_the_stomp_1_2_set() -> None:
    assert {"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT",
            "ABORT", "DISCONNECT"} == CLIENT_COMMANDS


@pytest.mark.parametrize("command", [b"FOO", b"send", b"SEND ", b" SEND", b"SENDX", b"\x00SEND", b"CONNECTED2"])
def test_unknown_command_is_a_protocol_error(command: bytes) -> None:
    reject_every_way(command + b"\n\n\x00", ProtocolError, match="Unknown STOMP command")


@pytest.mark.parametrize("command", sorted(SERVER_COMMANDS))
def test_server_commands_only_when_allowed(command: str) -> None:
    data = command.encode() + b"\nk:v\n\n\x00"
    reject_every_way(data, ProtocolError, match="Unknown STOMP command")
    expected = [Frame(command, (("k", "v"),), b"")]
    assert parse_every_way(data, commands=ALL_COMMANDS) == expected
    assert parse_every_way(data, commands=SERVER_COMMANDS) == expected


def test_commands_parameter_restricts_client_commands_too() -> None:
    assert parse_every_way(b"SEND\n\n\x00", commands={"SEND"}) == [Frame("SEND")]
    reject_every_way(b"CONNECT\n\n\x00", ProtocolError, commands={"SEND"})


def test_frame_without_headers() -> None:
    assert parse_every_way(b"DISCONNECT\n\n\x00") == [Frame("DISCONNECT")]


# -- escaping ---------------------------------------------------------------------------------


def test_every_escape_is_decoded_in_names_and_values() -> None:
    data = b"SEND\na\\cb\\\\c\\nd\\re:x\\c\\\\\\n\\ry\n\n\x00"
    assert parse_every_way(data) == [Frame("SEND", (("a:b\\c\nd\re", "x:\\\n\ry"),), b"")]


def test_escaped_backslash_followed_by_letter_is_not_an_escape() -> None:
    assert parse_every_way(b"SEND\nk:\\\\n\\\\c\n\n\x00")[0].get("k") == "\\n\\c"


@pytest.mark.parametrize("line", [
    b"k:a\\tb", b"k:\\", b"k:ab\\", b"k\\:v", b"k:\\C", b"k:\\0", b"k:\\x41", b"k:\\ ", b"k\\t:v",
    b"k:\\\\\\",  # an escaped backslash, then a lone one
])
def test_undefined_escape_is_rejected(line: bytes) -> None:
    reject_every_way(b"SEND\n" + line + b"\n\n\x00", InvalidEscape)


def test_invalid_escape_is_a_protocol_error() -> None:
    assert issubclass(InvalidEscape, ProtocolError)


@pytest.mark.parametrize("command", ["CONNECT", "STOMP", "CONNECTED"])
def test_connect_stomp_and_connected_headers_are_not_unescaped(command: str) -> None:
    data = command.encode() + b"\npasscode:a\\tb\\c\\\\\\\nlogin:x:y\\\n\n\x00"
    assert parse_every_way(data, commands=ALL_COMMANDS) == [
        Frame(command, (("passcode", "a\\tb\\c\\\\\\"), ("login", "x:y\\")), b"")]


def test_stomp_1_0_leaves_backslashes_alone() -> None:
    data = b"SEND\ndestination:/a\\c\\t\\\nk\\n:v\n\n\x00"
    assert parse_every_way(data, unescape_headers=False) == [
        Frame("SEND", (("destination", "/a\\c\\t\\"), ("k\\n", "v")), b"")]


def test_unescaping_can_be_switched_off_after_connect() -> None:
    parser = new_parser()
    assert parser.feed(b"CONNECT\naccept-version:1.0\n\n\x00") == [
        Frame("CONNECT", (("accept-version", "1.0"),), b"")]
    parser.unescape_headers = False
    assert parser.feed(b"SEND\ndestination:/a\\t\n\n\x00") == [
        Frame("SEND", (("destination", "/a\\t"),), b"")]


def test_escape_and_unescape_functions() -> None:
    assert escape("a:b\\c\nd\re") == "a\\cb\\\\c\\nd\\re"
    assert unescape("a\\cb\\\\c\\nd\\re") == "a:b\\c\nd\re"
    assert escape("plain 한글") == "plain 한글"
    assert unescape("plain") == "plain"
    for text in ["", "\\", "\\\\n", ":\\c", "\r\n\\r\\n", "끝\\"]:
        assert unescape(escape(text)) == text
    with pytest.raises(InvalidEscape):
        unescape("\\t")
    with pytest.raises(InvalidEscape):
        unescape("abc\\")


# -- EOLs and heart-beats -----------------------------------------------------------------------


def test_crlf_eols() -> None:
    data = b"SEND\r\ndestination:/a\r\nk:v\r\n\r\nbody\x00"
    assert parse_every_way(data) == [Frame("SEND", (("destination", "/a"), ("k", "v")), b"body")]


def test_mixed_eols() -> None:
    data = b"SEND\r\ndestination:/a\nk:v\r\n\nbody\r\n\x00"
    assert parse_every_way(data) == [Frame("SEND", (("destination", "/a"), ("k", "v")), b"body\r\n")]


def test_heartbeats_between_frames_are_counted() -> None:
    data = b"\n\r\n\nSEND\n\nA\x00\n\r\nSEND\n\nB\x00\r\n"
    frames, parser = feed_chunks([data])
    assert frames == [Frame("SEND", (), b"A"), Frame("SEND", (), b"B")]
    assert parser.heartbeats == 6
    assert parser.buffered == 0
    assert parse_every_way(data) == frames  # same count and frames however split


def test_heartbeats_alone() -> None:
    frames, parser = feed_chunks([b"\n"] * 3 + [b"\r\n\n"])
    assert frames == []
    assert parser.heartbeats == 5
    assert parser.buffered == 0


def test_carriage_return_waits_for_its_line_feed() -> None:
    parser = new_parser()
    assert parser.feed(b"SEND\n\n\x00\r") == [Frame("SEND")]
    assert parser.buffered == 1
    assert parser.heartbeats == 0
    assert parser.feed(b"\n") == []
    assert (parser.heartbeats, parser.buffered) == (1, 0)


@pytest.mark.parametrize("data", [b"\rSEND\n\n\x00", b"SEND\n\n\x00\rSEND\n\n\x00", b"\n\r\r\n", b"\r\x00"])
def test_stray_carriage_return_between_frames(data: bytes) -> None:
    reject_every_way(data, ProtocolError, match="carriage return")


# -- bodies and content-length ------------------------------------------------------------------


def test_content_length_body_may_contain_nul() -> None:
    data = b"SEND\ndestination:/a\ncontent-length:6\n\n\x00a\x00b\x00\xff\x00"
    assert parse_every_way(data) == [
        Frame("SEND", (("destination", "/a"), ("content-length", "6")), b"\x00a\x00b\x00\xff")]


def test_zero_content_length_and_leading_zeros() -> None:
    assert parse_every_way(b"SEND\ncontent-length:0\n\n\x00")[0].body == b""
    assert parse_every_way(b"SEND\ncontent-length:007\n\nabcdefg\x00")[0].body == b"abcdefg"
    zeros = b"SEND\ncontent-length:" + b"0" * 5000 + b"\n\n\x00"  # more digits than int() takes
    for chunks in ([zeros], [zeros[i:i + 1] for i in range(len(zeros))]):
        assert feed_chunks(chunks)[0] == [Frame("SEND", (("content-length", "0" * 5000),), b"")]


def test_body_without_content_length_ends_at_first_nul() -> None:
    data = b"SEND\n\nab\x00SEND\n\ncd\x00"
    assert parse_every_way(data) == [Frame("SEND", (), b"ab"), Frame("SEND", (), b"cd")]


def test_body_is_binary_and_never_decoded() -> None:
    body = bytes(range(1, 256))
    assert parse_every_way(b"SEND\n\n" + body + b"\x00") == [Frame("SEND", (), body)]


@pytest.mark.parametrize("value", [b"", b"-1", b"+1", b" 5", b"5 ", b"1.0", b"0x10", b"abc", b"1e3",
                                   "\u0661".encode(), "\uff15".encode()])
def test_bad_content_length_is_rejected(value: bytes) -> None:
    reject_every_way(b"SEND\ncontent-length:" + value + b"\n\n\x00", ProtocolError, match="content-length")


def test_content_length_with_absurdly_many_digits_is_too_large() -> None:
    # 5000 digits: int() alone would raise ValueError (Python's 4300-digit limit), not a ProtocolError.
    nines = b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\x00"
    for chunks in ([nines], [nines[i:i + 1] for i in range(len(nines))]):
        with pytest.raises(FrameTooLarge):
            feed_chunks(chunks)
    reject_every_way(b"SEND\ncontent-length:99999999999999999999\n\n", FrameTooLarge)


@pytest.mark.parametrize("data", [
    b"SEND\ncontent-length:2\n\nabc\x00",
    b"SEND\ncontent-length:0\n\nx\x00",
    b"SEND\ncontent-length:3\n\na\x00b\n",
])
def test_content_length_frame_not_followed_by_nul(data: bytes) -> None:
    reject_every_way(data, ProtocolError, match="not terminated by NUL")


def test_first_content_length_wins() -> None:
    data = b"SEND\ncontent-length:3\ncontent-length:1\n\na\x00c\x00"
    assert parse_every_way(data)[0].body == b"a\x00c"


def test_content_length_is_read_after_unescaping() -> None:
    assert parse_every_way(b"SEND\ncontent\\c-length:3\n\nab\x00")[0].body == b"ab"


# -- headers ----------------------------------------------------------------------------------


def test_repeated_headers_first_wins_all_kept_in_order() -> None:
    [frame] = parse_every_way(b"SEND\nfoo:1\nbar:x\nfoo:2\nfoo:3\n\n\x00")
    assert frame.headers == (("foo", "1"), ("bar", "x"), ("foo", "2"), ("foo", "3"))
    assert frame.get("foo") == "1"
    assert frame.get("missing") is None
    assert frame.header_dict() == {"foo": "1", "bar": "x"}


def test_header_value_edge_cases() -> None:
    [frame] = parse_every_way(b"SEND\nempty:\ncolons:a:b:c\nspace: padded \n\n\x00")
    assert frame.headers == (("empty", ""), ("colons", "a:b:c"), ("space", " padded "))


def test_utf8_headers() -> None:
    data = "SEND\ndestination:/sub/chat/room/방\nsender:행복아빠\n\n".encode() + b"\x00"
    assert parse_every_way(data)[0].header_dict() == {"destination": "/sub/chat/room/방", "sender": "행복아빠"}


@pytest.mark.parametrize("line", [b"novalue", b":value", b":"])
def test_malformed_header_line(line: bytes) -> None:
    reject_every_way(b"SEND\n" + line + b"\n\n\x00", ProtocolError, match="Malformed header")


def test_headers_must_be_utf8() -> None:
    reject_every_way(b"SEND\nk:\xff\xfe\n\n\x00", ProtocolError, match="UTF-8")


# -- splitting and several frames ---------------------------------------------------------------

STREAMS = [
    b"CONNECT\naccept-version:1.2\nhost:h\n\n\x00\nSUBSCRIBE\nid:0\ndestination:/sub/a\n\n\x00",
    b"SEND\ndestination:/a\ncontent-length:5\n\n\x00\r\n\x00\n\x00\r\n\r\nSEND\r\n\r\nxyz\x00\n",
    b"\r\n\nSEND\nk\\c:\\\\v\\n\ncontent-length:0\n\n\x00ACK\nid:1\n\n\x00",
    "SEND\r\ndestination:/한\r\n\r\n{\"message\":\"안녕\"}\x00".encode(),
]


@pytest.mark.parametrize(("data", "count"), list(zip(STREAMS, [2, 2, 2, 1], strict=True)))
def test_split_anywhere_gives_the_same_frames(data: bytes, count: int) -> None:
    frames = parse_every_way(data)
    assert len(frames) == count
    assert all(f.command in CLIENT_COMMANDS for f in frames)


def test_several_frames_in_one_feed() -> None:
    one = b"SEND\ndestination:/a\n\nhello\x00"
    frames, parser = feed_chunks([one * 50 + b"\n" + one[:10]])
    assert frames == [Frame("SEND", (("destination", "/a"),), b"hello")] * 50
    assert parser.heartbeats == 1
    assert parser.buffered == 10


def test_parser_is_unusable_after_an_error() -> None:
    parser = new_parser()
    with pytest.raises(ProtocolError):
        parser.feed(b"NOPE\n\n\x00")
    with pytest.raises(ProtocolError, match="already failed"):
        parser.feed(b"SEND\n\n\x00")


def test_buffered_is_zero_after_complete_frames() -> None:
    parser = new_parser()
    parser.feed(b"SEND\n\nab")
    assert parser.buffered == 8
    parser.feed(b"c\x00")
    assert parser.buffered == 0


# -- limits -----------------------------------------------------------------------------------

LIMITS = {"max_frame_bytes": 64, "max_headers": 3, "max_header_line_bytes": 20}


def _frame_of_size(size: int, *, content_length: bool) -> bytes:
    if content_length:
        head = b"SEND\ncontent-length:%d\n\n"
        body_len = size - len(head % 10) - 1  # two-digit lengths
        data = (head % body_len) + b"x" * body_len + b"\x00"
    else:
        head = b"SEND\n\n"
        data = head + b"x" * (size - len(head) - 1) + b"\x00"
    assert len(data) == size
    return data


@pytest.mark.parametrize("content_length", [False, True])
def test_frame_exactly_at_the_size_limit_is_accepted(content_length: bool) -> None:
    data = _frame_of_size(64, content_length=content_length)
    [frame] = parse_every_way(data, **LIMITS)
    assert len(frame.body) == 64 - len(data.split(b"\n\n")[0]) - 3
    # a heart-beat after it does not count toward it
    assert len(parse_every_way(data + b"\n" + data, **LIMITS)) == 2


@pytest.mark.parametrize("content_length", [False, True])
def test_frame_one_byte_over_the_size_limit_is_rejected(content_length: bool) -> None:
    reject_every_way(_frame_of_size(65, content_length=content_length), FrameTooLarge, **LIMITS)


def _max_buffered_until_error(stream: bytes, error: type[ProtocolError], **limits: int) -> int:
    """Feed ``stream`` byte by byte until ``error``; the most that was ever buffered."""
    parser = FrameParser(**limits)
    most = 0
    with pytest.raises(error):
        for i in range(len(stream)):
            parser.feed(stream[i:i + 1])
            most = max(most, parser.buffered)
    return most


def test_body_that_never_ends_is_rejected_while_buffering() -> None:
    most = _max_buffered_until_error(b"SEND\n\n" + b"x" * 1000, FrameTooLarge, **LIMITS)
    assert most <= 64


def test_header_block_that_never_ends_is_rejected_while_buffering() -> None:
    limits = {"max_frame_bytes": 64, "max_headers": 1000, "max_header_line_bytes": 16}
    most = _max_buffered_until_error(b"SEND\n" + b"k:v\n" * 1000, FrameTooLarge, **limits)
    assert most <= 64


def test_content_length_frame_missing_its_nul_is_bounded() -> None:
    parser = FrameParser(**LIMITS)
    assert parser.feed(b"SEND\ncontent-length:39\n\n" + b"x" * 39) == []  # 24 + 39 + 1 = 64
    assert parser.buffered <= 64
    with pytest.raises(ProtocolError, match="not terminated"):
        parser.feed(b"x")


def test_one_huge_feed_is_rejected_in_that_feed() -> None:
    parser = FrameParser(**LIMITS)
    with pytest.raises(FrameTooLarge):
        parser.feed(b"SEND\n\n" + b"x" * 1_000_000)


def test_complete_header_block_bigger_than_the_frame_limit() -> None:
    limits = {"max_frame_bytes": 64, "max_headers": 100, "max_header_line_bytes": 16}
    block = b"SEND\n" + b"key:value-00\n" * 5  # 5 + 5 * 13 = 70 bytes of headers
    reject_every_way(block + b"\n\x00", FrameTooLarge, **limits)
    # the size is checked before the block is decoded: a bad escape in it is never looked at
    reject_every_way(block + b"k:\\t\n\n\x00", FrameTooLarge, **limits)


def test_content_length_over_the_limit_is_rejected_at_header_time() -> None:
    parser = FrameParser(**LIMITS)
    with pytest.raises(FrameTooLarge):
        parser.feed(b"SEND\ncontent-length:44\n\n")  # 24 + 44 + 1 = 69 > 64, before any body byte
    head = b"SEND\ncontent-length:39\n\n"  # 24 + 39 + 1 = 64: waits for the body
    parser = FrameParser(**LIMITS)
    assert parser.feed(head) == []
    assert len(parser.feed(b"y" * 39 + b"\x00")) == 1
    with pytest.raises(FrameTooLarge):
        FrameParser(**LIMITS).feed(b"SEND\ncontent-length:40\n\n")


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_header_count_limit(eol: bytes) -> None:
    three = b"SEND" + eol + b"a:1" + eol + b"b:2" + eol + b"c:3" + eol
    assert len(parse_every_way(three + eol + b"\x00", **LIMITS)[0].headers) == 3
    reject_every_way(three + b"d:4" + eol + eol + b"\x00", TooManyHeaders, **LIMITS)


def test_header_count_is_checked_while_buffering() -> None:
    parser = FrameParser(**LIMITS)
    parser.feed(b"SEND\na:1\nb:2\nc:3\n")
    with pytest.raises(TooManyHeaders):
        parser.feed(b"d:4\n")  # no blank line yet


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_header_line_length_limit(eol: bytes) -> None:
    exactly = b"k:" + b"v" * 18  # 20 bytes
    assert parse_every_way(b"SEND" + eol + exactly + eol + eol + b"\x00", **LIMITS)[0].get("k") == "v" * 18
    reject_every_way(b"SEND" + eol + exactly + b"v" + eol + eol + b"\x00", HeaderLineTooLong, **LIMITS)


def test_command_line_length_limit() -> None:
    limits = {**LIMITS, "max_header_line_bytes": 9}
    assert parse_every_way(b"SUBSCRIBE\r\n\r\n\x00", **limits) == [Frame("SUBSCRIBE")]
    limits["max_header_line_bytes"] = 8
    reject_every_way(b"SUBSCRIBE\n\n\x00", HeaderLineTooLong, **limits)


@pytest.mark.parametrize("prefix", [b"", b"SEND\n", b"SEND\nk:v\n"])
def test_header_line_that_never_ends(prefix: bytes) -> None:
    limits = {"max_frame_bytes": 1000, "max_headers": 3, "max_header_line_bytes": 16}
    most = _max_buffered_until_error(prefix + b"z" * 1000, HeaderLineTooLong, **limits)
    assert most <= len(prefix) + 16 + 1  # the line, plus one byte that may be the CR of its CRLF


# -- serialize --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["MESSAGE", "ERROR", "SEND"])
def test_content_length_always_on_message_error_send(command: str) -> None:
    assert serialize(Frame(command, (("k", "v"),))) == command.encode() + b"\nk:v\ncontent-length:0\n\n\x00"


def test_content_length_only_with_a_body_on_other_frames() -> None:
    assert serialize(Frame("RECEIPT", (("receipt-id", "7"),))) == b"RECEIPT\nreceipt-id:7\n\n\x00"
    assert serialize(Frame("RECEIPT", (), b"ab")) == b"RECEIPT\ncontent-length:2\n\nab\x00"


def test_wrong_content_length_is_replaced_by_the_body_length() -> None:
    frame = Frame("SEND", (("content-length", "99"), ("destination", "/a"), ("content-length", "1")),
                  "é한\x00".encode())
    assert serialize(frame) == "SEND\ndestination:/a\ncontent-length:6\n\né한\x00\x00".encode()


def test_serialize_escapes_names_and_values() -> None:
    frame = Frame("MESSAGE", (("a:b", "x\ny\\z\r"),), b"")
    assert serialize(frame) == b"MESSAGE\na\\cb:x\\ny\\\\z\\r\ncontent-length:0\n\n\x00"


@pytest.mark.parametrize("command", ["CONNECTED", "CONNECT", "STOMP"])
def test_connect_and_connected_are_not_escaped(command: str) -> None:
    frame = Frame(command, (("version", "1.2"), ("user-name", "a:b\\c")))
    assert serialize(frame) == command.encode() + b"\nversion:1.2\nuser-name:a:b\\c\n\n\x00"


@pytest.mark.parametrize("header", [("k", "a\nb"), ("k", "a\r"), ("k:", "v"), ("k\n", "v"), ("k\r", "v")])
def test_unescapable_headers_raise_when_escaping_is_off(header: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        serialize(Frame("CONNECTED", (header,)))
    with pytest.raises(ValueError):
        serialize(Frame("MESSAGE", (header,)), escape_headers=False)


def test_stomp_1_0_serialize_leaves_values_raw() -> None:
    frame = Frame("MESSAGE", (("destination", "/a:b\\c"),), b"x")
    assert serialize(frame, escape_headers=False) == b"MESSAGE\ndestination:/a:b\\c\ncontent-length:1\n\nx\x00"


def test_empty_header_name_cannot_be_serialized() -> None:
    with pytest.raises(ValueError):
        serialize(Frame("SEND", (("", "v"),)))


def test_utf8_multibyte_header_values() -> None:
    frame = Frame("MESSAGE", (("sender", "[알림]"), ("emoji", "🙂")), "방".encode())
    data = serialize(frame)
    assert data == "MESSAGE\nsender:[알림]\nemoji:🙂\ncontent-length:3\n\n방\x00".encode()
    assert parse_every_way(data, commands=ALL_COMMANDS) == [
        Frame("MESSAGE", (*frame.headers, ("content-length", "3")), frame.body)]


def test_serialized_frames_parse_back() -> None:
    frame = Frame("SEND", (("destination", "/pub/chat/message"), ("token", "a:b\nc\\")), b"{}\x00{}")
    assert parse_every_way(serialize(frame)) == [Frame("SEND", (*frame.headers, ("content-length", "5")),
                                                       frame.body)]


# -- MessageTemplate --------------------------------------------------------------------------


def _equivalent(destination: str, body: bytes, subscription: str, message_id: str, *,
                content_type: str | None = "application/json", extra: tuple[tuple[str, str], ...] = (),
                ack: str | None = None) -> Frame:
    headers = [("destination", destination)]
    if content_type is not None:
        headers.append(("content-type", content_type))
    headers += [("subscription", subscription), ("message-id", message_id)]
    if ack is not None:
        headers.append(("ack", ack))
    return Frame("MESSAGE", (*headers, *extra), body)


def test_message_template_spring_bytes() -> None:
    template = MessageTemplate("/sub/chat/room/1", b'{"type":"TALK"}')
    assert template.render("sub-0", "s1-0") == (
        b"MESSAGE\ndestination:/sub/chat/room/1\ncontent-type:application/json\nsubscription:sub-0\n"
        b'message-id:s1-0\ncontent-length:15\n\n{"type":"TALK"}\x00')


@pytest.mark.parametrize("escape_headers", [True, False])
@pytest.mark.parametrize(("destination", "body", "subscription", "message_id", "content_type", "extra"), [
    ("/sub/chat/room/1", b"{}", "sub-0", "s-0", "application/json", ()),
    ("/sub/a", b"", "0", "1", None, ()),
    ("/sub/방", "한글 body\x00 with NUL".encode(), "구독", "메시지-1", "text/plain;charset=UTF-8",
     (("x-seq", "42"), ("x-seq", "43"))),
])
def test_message_template_equals_serialize(escape_headers: bool, destination: str, body: bytes,
                                           subscription: str, message_id: str, content_type: str | None,
                                           extra: tuple[tuple[str, str], ...]) -> None:
    template = MessageTemplate(destination, body, content_type=content_type, extra_headers=extra)
    for _ in range(2):  # the second render comes from the cache
        expected = serialize(_equivalent(destination, body, subscription, message_id,
                                         content_type=content_type, extra=extra),
                             escape_headers=escape_headers)
        assert template.render(subscription, message_id, escape_headers=escape_headers) == expected


def test_message_template_escapes_every_header() -> None:
    template = MessageTemplate("/a:b", b"x", content_type="t\\y", extra_headers=(("k:1", "v\n"),))
    got = template.render("s\r", "m:1")
    assert got == serialize(_equivalent("/a:b", b"x", "s\r", "m:1", content_type="t\\y",
                                        extra=(("k:1", "v\n"),)))
    assert b"destination:/a\\cb\ncontent-type:t\\\\y\nsubscription:s\\r\nmessage-id:m\\c1\nk\\c1:v\\n\n" in got
    # the escaping and raw variants are cached separately
    assert template.render("s", "m", escape_headers=False).startswith(b"MESSAGE\ndestination:/a:b\n")
    assert template.render("s", "m").startswith(b"MESSAGE\ndestination:/a\\cb\n")


def test_message_template_ack_header() -> None:
    template = MessageTemplate("/sub/a", b"{}")
    assert template.render("0", "s-1", ack="s-1:x") == serialize(
        _equivalent("/sub/a", b"{}", "0", "s-1", ack="s-1:x"))
    assert template.render("0", "s-1", ack="a:b", escape_headers=False) == serialize(
        _equivalent("/sub/a", b"{}", "0", "s-1", ack="a:b"), escape_headers=False)


def test_message_template_ignores_a_given_content_length() -> None:
    template = MessageTemplate("/sub/a", b"abc", extra_headers=(("content-length", "1"), ("k", "v")))
    assert template.render("0", "1") == serialize(_equivalent("/sub/a", b"abc", "0", "1", extra=(("k", "v"),)))


def test_message_template_parses_back() -> None:
    template = MessageTemplate("/sub/x", b"a\x00b", extra_headers=(("k", "v:\\"),))
    stream = template.render("s:1", "m-1") + b"\n" + template.render("s:2", "m-2")
    frames = parse_every_way(stream, commands=SERVER_COMMANDS)
    assert [f.get("subscription") for f in frames] == ["s:1", "s:2"]
    assert frames[0] == Frame("MESSAGE", (
        ("destination", "/sub/x"), ("content-type", "application/json"), ("subscription", "s:1"),
        ("message-id", "m-1"), ("k", "v:\\"), ("content-length", "3")), b"a\x00b")
