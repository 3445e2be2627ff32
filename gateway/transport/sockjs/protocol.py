"""Sans-I/O SockJS 0.3.3 framing: frames, transport formats, JSON escaping, client payload parsing.

Owns: the frame letters (``o``, ``h``, ``a[...]``, ``c[code,"reason"]``), the escaping of the
Unicode ranges SockJS clients cannot receive verbatim, how each HTTP transport wraps a frame
(xhr, xhr_streaming, eventsource, htmlfile), the transport preludes, and turning a client's
payload (a JSON array of strings, or one JSON string) into messages.

Every function is pure: text in, text out. Must not import asyncio, Starlette or the STOMP layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from gateway.close_codes import CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, sendable

# --- frames ---------------------------------------------------------------------------------------

OPEN_FRAME = "o"
HEARTBEAT_FRAME = "h"

# Close codes and reasons the SockJS protocol itself defines (3000 and 2010 are SockJS's own; its
# "interrupted" is the WebSocket protocol-error code).
CLOSE_GO_AWAY = (3000, "Go away!")
CLOSE_ANOTHER_CONNECTION = (2010, "Another connection still open")
CLOSE_INTERRUPTED = (CLOSE_PROTOCOL_ERROR, "Connection interrupted")

# SockJS servers escape these ranges so browsers never mangle them (sockjs-protocol's
# ``escapable_by_server``, plus UTF-16 surrogates as Spring does). Characters outside the Basic
# Multilingual Plane are written as an escaped surrogate pair, as Spring (UTF-16 chars) does.
_UNSAFE = re.compile("[\x00-\x1f\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufff0-\uffff\ud800-\udfff"
                     "\U00010000-\U0010ffff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def quote(text: str) -> str:
    """JSON-quote ``text`` as a SockJS server must: JSON escaping, then the unsafe ranges as ``\\uXXXX``."""
    return _UNSAFE.sub(_escape_char, json.dumps(text, ensure_ascii=False))


def message_frame(messages: Sequence[str]) -> str:
    """``a[...]``: one JSON string per message (here: one STOMP frame per element)."""
    return "a[" + ",".join(quote(message) for message in messages) + "]"


def close_frame(code: int, reason: str) -> str:
    """``c[code,"reason"]``."""
    return f"c[{int(code)},{quote(reason)}]"


# --- client payloads ------------------------------------------------------------------------------


class BrokenJSON(ValueError):
    """The client's payload is not a JSON string nor a JSON array of strings."""


def parse_messages(payload: str) -> list[str]:
    """Decode what a client sent: a JSON array of strings, or a single JSON string.

    An empty array is valid (clients use it as a no-op). Anything else (bad JSON, numbers, nested
    arrays, objects) raises :class:`BrokenJSON`. Lone UTF-16 surrogates (``"\\ud800"``), which cannot
    be encoded to UTF-8, become U+FFFD; escaped surrogate pairs decode to their code point.
    """
    try:
        decoded = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise BrokenJSON(str(exc)[:100]) from None
    items = [decoded] if isinstance(decoded, str) else decoded
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise BrokenJSON("expected a JSON string or an array of strings")
    return [_LONE_SURROGATE.sub("\ufffd", item) for item in items]


# --- HTTP transport formats -----------------------------------------------------------------------

XHR_STREAMING_PRELUDE = "h" * 2048 + "\n"
EVENTSOURCE_PRELUDE = "\r\n"

_HTMLFILE_HEAD = (
    "<!doctype html>\n"
    "<html><head>\n"
    '  <meta http-equiv="X-UA-Compatible" content="IE=edge" />\n'
    '  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />\n'
    "</head><body><h2>Don't panic!</h2>\n"
    "  <script>\n"
    "    document.domain = document.domain;\n"
    "    var c = parent.{callback};\n"
    "    c.start();\n"
    "    function p(d) {{c.message(d);}};\n"
    "    window.onload = function() {{c.stop();}};\n"
    "  </script>"
)
_CALLBACK = re.compile(r"[A-Za-z0-9_.\-]+")


def callback_valid(callback: str) -> bool:
    """The htmlfile ``c`` parameter may only hold ``[A-Za-z0-9_.-]`` (it is written into a script)."""
    return _CALLBACK.fullmatch(callback) is not None


def htmlfile_prelude(callback: str) -> str:
    """The htmlfile page head, padded past 1 KiB so browsers start rendering; ``callback`` must be valid."""
    if not callback_valid(callback):
        raise ValueError("invalid callback")
    return _HTMLFILE_HEAD.format(callback=callback).ljust(1024) + "\r\n"


def format_xhr(frame: str) -> str:
    """xhr polling and xhr_streaming: the frame then a newline."""
    return frame + "\n"


def format_eventsource(frame: str) -> str:
    """EventSource: one ``data:`` event per frame (frames never hold a raw newline)."""
    return "data: " + frame + "\r\n\r\n"


def format_htmlfile(frame: str) -> str:
    """htmlfile: a script calling ``p()`` with the frame as a JS string.

    ``<``, ``>`` and ``&`` are escaped too, so a message holding ``</script>`` cannot end the script.
    """
    literal = json.dumps(frame).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return "<script>\np(" + literal + ");\n</script>\r\n"


# --- websocket close codes ------------------------------------------------------------------------


def websocket_close_code(code: int) -> int:
    """The WebSocket close code to end a SockJS websocket with after ``c[code,...]``.

    SockJS codes that are not valid on the WebSocket wire (2010, or 1005/1006) become 1000.
    """
    return code if sendable(code) else CLOSE_NORMAL
