"""Sans-I/O SockJS framing: frames, escaping of the unsafe Unicode ranges, payload parsing, formats."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.transport.sockjs import protocol

# The ranges a SockJS server must never send raw (sockjs-protocol 0.3.3 "escapable_by_server"),
# plus UTF-16 surrogates, which Spring escapes as well.
SERVER_UNSAFE = [*range(0x00, 0x20), *range(0x200C, 0x2010), *range(0x2028, 0x2030),
                 *range(0x2060, 0x2070), *range(0xFFF0, 0x10000)]
RAW_UNSAFE = re.compile("[\x00-\x1f\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufff0-\uffff\ud800-\udfff"
                        "\U00010000-\U0010ffff]")


def test_frame_letters() -> None:
    assert protocol.OPEN_FRAME == "o"
    assert protocol.HEARTBEAT_FRAME == "h"
    assert protocol.message_frame(["a"]) == 'a["a"]'
    assert protocol.message_frame(["a", "b c", ""]) == 'a["a","b c",""]'
    assert protocol.message_frame([]) == "a[]"
    assert protocol.close_frame(3000, "Go away!") == 'c[3000,"Go away!"]'
    assert protocol.close_frame(*protocol.CLOSE_ANOTHER_CONNECTION) == 'c[2010,"Another connection still open"]'
    assert protocol.close_frame(*protocol.CLOSE_INTERRUPTED) == 'c[1002,"Connection interrupted"]'
    assert protocol.close_frame(4000, 'say "hi"') == 'c[4000,"say \\"hi\\""]'


def test_stomp_frame_is_quoted_as_one_json_string() -> None:
    stomp = "MESSAGE\ndestination:/sub/chat/room/1\n\n{\"m\":\"hi\"}\x00"
    frame = protocol.message_frame([stomp])
    assert frame == 'a["MESSAGE\\ndestination:/sub/chat/room/1\\n\\n{\\"m\\":\\"hi\\"}\\u0000"]'
    assert json.loads(frame[1:]) == [stomp]


@pytest.mark.parametrize("code", SERVER_UNSAFE)
def test_every_unsafe_bmp_char_is_escaped(code: int) -> None:
    quoted = protocol.quote("x" + chr(code) + "y")
    assert RAW_UNSAFE.search(quoted) is None
    assert json.loads(quoted) == "x" + chr(code) + "y"
    if code >= 0x20:
        assert quoted == f'"x\\u{code:04x}y"'


def test_astral_characters_become_escaped_surrogate_pairs() -> None:
    assert protocol.quote("😀") == '"\\ud83d\\ude00"'
    assert protocol.quote("a\U0010ffffb") == '"a\\udbff\\udfffb"'
    assert json.loads(protocol.quote("😀 \U0001f680")) == "😀 \U0001f680"


def test_safe_non_ascii_is_sent_verbatim() -> None:
    assert protocol.quote("안녕 é ß ✓ \u00ad \u0600") == '"안녕 é ß ✓ \u00ad \u0600"'


def test_json_specials_are_escaped() -> None:
    assert protocol.quote('a"b\\c\n\r\t/') == '"a\\"b\\\\c\\n\\r\\t/"'


@given(st.text())
def test_quote_round_trips_and_never_sends_unsafe_chars(text: str) -> None:
    quoted = protocol.quote(text)
    assert RAW_UNSAFE.search(quoted) is None
    assert json.loads(quoted) == text


# --- client payloads ----------------------------------------------------------------------------------


def test_parse_array_of_strings() -> None:
    assert protocol.parse_messages('["a","b"]') == ["a", "b"]
    assert protocol.parse_messages("[]") == []
    assert protocol.parse_messages(' [ "x" ] ') == ["x"]


def test_parse_single_string() -> None:
    assert protocol.parse_messages('"a"') == ["a"]


def test_parse_decodes_escapes_the_client_uses() -> None:
    assert protocol.parse_messages('["\\u0000\\n\\u2028\\ud83d\\ude00"]') == ["\x00\n\u2028😀"]


def test_parse_replaces_lone_surrogates() -> None:
    assert protocol.parse_messages('["a\\ud800b", "\\udc00"]') == ["a\ufffdb", "\ufffd"]
    assert [m.encode("utf-8") for m in protocol.parse_messages('["\\udfff"]')] == ["\ufffd".encode()]


@pytest.mark.parametrize("payload", ['["a', "", " ", "[", '["a",]', "{}", '{"a":"b"}', "1", "null", "true",
                                     '["a", 1]', '[["a"]]', '[null]', '["a"] x', "[" * 100000 + "]" * 100000,
                                     "NaN"])
def test_parse_rejects_anything_else(payload: str) -> None:
    with pytest.raises(protocol.BrokenJSON):
        protocol.parse_messages(payload)


# --- transport formats -----------------------------------------------------------------------------


def test_xhr_and_eventsource_formats() -> None:
    assert protocol.format_xhr("o") == "o\n"
    assert protocol.format_xhr('a["x"]') == 'a["x"]\n'
    assert protocol.XHR_STREAMING_PRELUDE == "h" * 2048 + "\n"
    assert protocol.EVENTSOURCE_PRELUDE == "\r\n"
    assert protocol.format_eventsource("o") == "data: o\r\n\r\n"
    assert protocol.format_eventsource('c[3000,"Go away!"]') == 'data: c[3000,"Go away!"]\r\n\r\n'


def test_htmlfile_format() -> None:
    assert protocol.format_htmlfile("o") == '<script>\np("o");\n</script>\r\n'
    assert protocol.format_htmlfile('a["x"]') == '<script>\np("a[\\"x\\"]");\n</script>\r\n'


def test_htmlfile_format_cannot_close_its_script() -> None:
    frame = protocol.message_frame(["</script><script>alert(1)</script> & <!--"])
    wrapped = protocol.format_htmlfile(frame)
    body = wrapped[len("<script>\np("):-len(");\n</script>\r\n")]
    assert "<" not in body and ">" not in body and "&" not in body
    assert json.loads(body) == frame


def test_htmlfile_prelude() -> None:
    prelude = protocol.htmlfile_prelude("cb_1.x-y")
    assert len(prelude) > 1024
    assert prelude.endswith("\r\n")
    assert "var c = parent.cb_1.x-y;" in prelude
    assert prelude.startswith("<!doctype html>\n<html><head>")
    assert "function p(d) {c.message(d);};" in prelude
    with pytest.raises(ValueError):
        protocol.htmlfile_prelude("x;alert(1)")


@pytest.mark.parametrize(("callback", "valid"), [
    ("callback", True), ("a.b_c-1", True), ("", False), (" ", False), ("*", False), ("abc(", False),
    ("a;b", False), ("a b", False), ("é", False), ("a\nb", False)])
def test_callback_validation(callback: str, valid: bool) -> None:
    assert protocol.callback_valid(callback) is valid


@pytest.mark.parametrize(("code", "wire"), [(3000, 3000), (4999, 4999), (1000, 1000), (1002, 1002),
                                            (1007, 1007), (4500, 4500), (2010, 1000), (1005, 1000),
                                            (1006, 1000), (5000, 1000), (999, 1000)])
def test_websocket_close_code(code: int, wire: int) -> None:
    assert protocol.websocket_close_code(code) == wire
