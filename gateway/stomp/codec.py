"""Sans-I/O STOMP codec: an incremental parser with limits, header escaping, and serializers.

Owns: bytes <-> :class:`~gateway.stomp.frames.Frame`. The parser is fed whatever the transport
received (a frame split over many WebSocket messages, or several frames in one) and returns every
complete frame. Limits are enforced *while buffering*, so a peer can never make us hold more than
``max_frame_bytes`` (plus one feed) of an unfinished frame.

Must not import asyncio or anything outside ``gateway.stomp``.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.stomp.frames import (
    CLIENT_COMMANDS,
    UNESCAPED_COMMANDS,
    Frame,
    FrameTooLarge,
    HeaderLineTooLong,
    InvalidEscape,
    ProtocolError,
    TooManyHeaders,
)

_ESCAPES = {ord("\\"): "\\\\", ord(":"): "\\c", ord("\n"): "\\n", ord("\r"): "\\r"}
_UNESCAPES = {"\\": "\\", "c": ":", "n": "\n", "r": "\r"}


def escape(text: str) -> str:
    """Escape a header name or value for STOMP 1.1/1.2 (``\\\\``, ``\\c``, ``\\n``, ``\\r``)."""
    return text.translate(_ESCAPES)


def unescape(text: str) -> str:
    """Undo :func:`escape`; any other backslash sequence raises :class:`InvalidEscape`."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                raise InvalidEscape("Header ends with a lone backslash")
            replacement = _UNESCAPES.get(text[i + 1])
            if replacement is None:
                raise InvalidEscape(f"Undefined escape sequence \\{text[i + 1]} in header")
            out.append(replacement)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _raw_receipt(lines: list[str]) -> str | None:
    """The first ``receipt`` header of a frame being rejected, for the ERROR's ``receipt-id``."""
    for line in lines:
        if line.startswith("receipt:"):
            value = line[len("receipt:"):].removesuffix("\r")
            try:
                return unescape(value)
            except InvalidEscape:
                return value
    return None


class FrameParser:
    """Incremental STOMP frame parser.

    ``feed(data)`` buffers ``data`` and returns the frames it completed (possibly none). After a
    :class:`ProtocolError` the parser is unusable: the connection must be closed.

    Parameters are the limits (required: their defaults are the settings of the same names, written
    once in ``gateway.settings``): the whole frame (command, headers and body) may not exceed
    ``max_frame_bytes``; no more than ``max_headers`` headers; no command or header line longer than
    ``max_header_line_bytes``. ``commands`` is the set of acceptable commands (client commands by
    default). ``unescape_headers`` is turned off for STOMP 1.0 sessions; CONNECT/STOMP frames are never
    unescaped.
    """

    def __init__(self, *, max_frame_bytes: int, max_headers: int, max_header_line_bytes: int,
                 commands: Iterable[str] = CLIENT_COMMANDS,
                 unescape_headers: bool = True) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_headers = max_headers
        self.max_header_line_bytes = max_header_line_bytes
        self.commands = frozenset(commands)
        self.unescape_headers = unescape_headers
        self._buf = bytearray()
        self._pos = 0            # start of the unparsed part of _buf
        self._scan = 0           # where the search for the end of the header block resumes
        self._lines = 0          # complete lines seen in the header block so far (command included)
        self._line_start = 0     # start of the current incomplete line
        # (command, headers, body offset from _pos, content-length) once the header block is parsed
        self._pending: tuple[str, tuple[tuple[str, str], ...], int, int | None] | None = None
        self._failed = False
        self.heartbeats = 0      # EOLs seen between frames (heart-beats)

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed:
            raise ProtocolError("Parser already failed")
        self._buf += data
        frames: list[Frame] = []
        try:
            while True:
                frame = self._next()
                if frame is None:
                    break
                frames.append(frame)
        except ProtocolError:
            self._failed = True
            raise
        self._compact()
        return frames

    # -- internals ---------------------------------------------------------------------------

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._line_start -= self._pos
            self._pos = 0

    def _reset_frame_state(self, pos: int) -> None:
        self._pos = pos
        self._scan = pos
        self._line_start = pos
        self._lines = 0
        self._pending = None

    def _next(self) -> Frame | None:
        buf = self._buf
        if self._pending is None:
            # Skip heart-beat EOLs between frames.
            while self._pos < len(buf) and self._scan == self._pos:
                byte = buf[self._pos]
                if byte == 0x0A:
                    self.heartbeats += 1
                    self._reset_frame_state(self._pos + 1)
                elif byte == 0x0D:
                    if self._pos + 1 >= len(buf):
                        return None  # wait: \r must be followed by \n
                    if buf[self._pos + 1] != 0x0A:
                        raise ProtocolError("Stray carriage return between frames")
                    self.heartbeats += 1
                    self._reset_frame_state(self._pos + 2)
                else:
                    break
            if self._pos >= len(buf):
                self._reset_frame_state(len(buf))
                return None
            if not self._scan_header_block():
                return None
        return self._take_body()

    def _scan_header_block(self) -> bool:
        """Advance the header scan; parse the block and set ``_pending`` when it is complete."""
        buf = self._buf
        end = len(buf)
        i = self._scan
        while i < end:
            nl = buf.find(b"\n", i)
            if nl < 0:
                i = end
                break
            line_len = nl - self._line_start
            if line_len and buf[nl - 1] == 0x0D:
                line_len -= 1  # the CR of a CRLF is part of the EOL, not of the line
            if line_len > self.max_header_line_bytes:
                raise HeaderLineTooLong(
                    f"Header line exceeds the limit of {self.max_header_line_bytes} bytes")
            if line_len == 0:
                header_end = nl + 1
                if header_end - self._pos + 1 > self.max_frame_bytes:  # headers + NUL alone too big
                    raise FrameTooLarge(f"The frame exceeds the limit of {self.max_frame_bytes} bytes")
                self._parse_header_block(bytes(buf[self._pos: self._line_start]), header_end)
                self._scan = header_end
                return True
            self._lines += 1
            if self._lines - 1 > self.max_headers:
                raise TooManyHeaders(f"Frame has more than {self.max_headers} headers")
            self._line_start = nl + 1
            i = nl + 1
        self._scan = i
        if end - self._line_start > self.max_header_line_bytes + 1:
            raise HeaderLineTooLong(f"Header line exceeds the limit of {self.max_header_line_bytes} bytes")
        if end - self._pos > self.max_frame_bytes:
            raise FrameTooLarge(f"The frame exceeds the limit of {self.max_frame_bytes} bytes")
        return False

    def _parse_header_block(self, block: bytes, header_end: int) -> None:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("Frame headers are not valid UTF-8") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        command = lines[0].removesuffix("\r") if lines else ""
        if command not in self.commands:
            shown = command if len(command) <= 32 else command[:32] + "..."
            raise ProtocolError(f"Unknown STOMP command {shown!r}", receipt_id=_raw_receipt(lines[1:]))
        # Whole-block checks let the common frame (no backslash, no CR) skip the per-header work.
        unescaping = self.unescape_headers and command not in UNESCAPED_COMMANDS and "\\" in text
        crlf = "\r" in text
        headers: list[tuple[str, str]] = []
        for index in range(1, len(lines)):
            line = lines[index].removesuffix("\r") if crlf else lines[index]
            name, colon, value = line.partition(":")
            if not colon or not name:
                raise ProtocolError("Malformed header line (expected name:value)")
            if unescaping:
                name, value = unescape(name), unescape(value)
            headers.append((name, value))
        content_length: int | None = None
        for name, value in headers:
            if name == "content-length":
                if not value.isascii() or not value.isdigit():
                    raise ProtocolError(f"Invalid content-length {value[:32]!r}")
                digits = value.lstrip("0")
                if len(digits) > 18:  # int() refuses > 4300 digits; anything this long is too big
                    raise FrameTooLarge(f"The frame exceeds the limit of {self.max_frame_bytes} bytes")
                content_length = int(digits or "0")
                break
        header_bytes = header_end - self._pos
        if content_length is not None and header_bytes + content_length + 1 > self.max_frame_bytes:
            raise FrameTooLarge(f"The frame exceeds the limit of {self.max_frame_bytes} bytes",
                                receipt_id=next((v for k, v in headers if k == "receipt"), None))
        self._pending = (command, tuple(headers), header_end - self._pos, content_length)

    def _take_body(self) -> Frame | None:
        assert self._pending is not None
        command, headers, body_offset, content_length = self._pending
        buf = self._buf
        body_start = self._pos + body_offset
        if content_length is not None:
            if len(buf) < body_start + content_length + 1:
                return None
            if buf[body_start + content_length] != 0:
                raise ProtocolError("Frame body is not terminated by NUL after content-length bytes")
            body = bytes(buf[body_start: body_start + content_length])
            next_pos = body_start + content_length + 1
        else:
            nul = buf.find(b"\x00", max(body_start, self._scan))
            if nul < 0:
                self._scan = len(buf)
                if len(buf) - self._pos > self.max_frame_bytes:
                    raise FrameTooLarge(f"The frame exceeds the limit of {self.max_frame_bytes} bytes")
                return None
            if nul + 1 - self._pos > self.max_frame_bytes:
                raise FrameTooLarge(f"The frame exceeds the limit of {self.max_frame_bytes} bytes")
            body = bytes(buf[body_start:nul])
            next_pos = nul + 1
        self._reset_frame_state(next_pos)
        return Frame(command, headers, body)


# Frames that always carry content-length (even when the body is empty), as Spring's encoder does.
_ALWAYS_LENGTH = frozenset({"MESSAGE", "ERROR", "SEND"})


def serialize(frame: Frame, *, escape_headers: bool = True) -> bytes:
    """Encode a frame. ``content-length`` is computed from the body (any given value is replaced) and
    written on MESSAGE, ERROR and SEND frames always, on other frames when they have a body.
    Headers are escaped unless ``escape_headers`` is false (STOMP 1.0) or the frame is CONNECT/STOMP/
    CONNECTED. Raises ``ValueError`` for a header that cannot be written (an empty name; unescaped, a
    name with ``:`` or a name or value with CR or LF).
    """
    escaping = escape_headers and frame.command not in UNESCAPED_COMMANDS
    parts = [frame.command, "\n"]
    for name, value in frame.headers:
        if name == "content-length":
            continue
        if not name:
            raise ValueError("header names cannot be empty")
        if escaping:
            name, value = escape(name), escape(value)
        elif ":" in name or "\n" in name or "\r" in name or "\n" in value or "\r" in value:
            raise ValueError(f"header {name!r} cannot be sent unescaped")
        parts += (name, ":", value, "\n")
    if frame.body or frame.command in _ALWAYS_LENGTH:
        parts += ("content-length:", str(len(frame.body)), "\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8") + frame.body + b"\x00"


class MessageTemplate:
    """A MESSAGE serialized once per destination; only ``subscription`` and ``message-id`` vary.

    Header order is Spring's: destination, content-type, subscription, message-id, [ack],
    [extra headers], content-length. ``render`` costs two small string encodes and one join per receiver.
    """

    __slots__ = ("_extra", "_heads", "body", "content_type", "destination", "seq")

    def __init__(self, destination: str, body: bytes, *, content_type: str | None = "application/json",
                 extra_headers: tuple[tuple[str, str], ...] = (), seq: int | None = None) -> None:
        self.destination = destination
        self.seq = seq  # the message's place in its destination's order, when it has one
        self.body = body
        self.content_type = content_type
        # content-length is always computed from the body (as serialize does), never taken from here
        self._extra = tuple((k, v) for k, v in extra_headers if k != "content-length")
        self._heads: dict[bool, tuple[bytes, bytes]] = {}

    def _parts(self, escaping: bool) -> tuple[bytes, bytes]:
        cached = self._heads.get(escaping)
        if cached is None:
            def enc(text: str) -> str:
                return escape(text) if escaping else text
            head = "MESSAGE\ndestination:" + enc(self.destination) + "\n"
            if self.content_type is not None:
                head += "content-type:" + enc(self.content_type) + "\n"
            tail = "".join(f"{enc(k)}:{enc(v)}\n" for k, v in self._extra)
            tail += f"content-length:{len(self.body)}\n\n"
            cached = (head.encode("utf-8"), tail.encode("utf-8") + self.body + b"\x00")
            self._heads[escaping] = cached
        return cached

    def render(self, subscription: str, message_id: str, *, escape_headers: bool = True,
               ack: str | None = None) -> bytes:
        """The MESSAGE for one receiver. ``ack`` adds STOMP 1.2's ``ack`` header (client ack modes)."""
        if escape_headers:
            subscription, message_id = escape(subscription), escape(message_id)
        middle = f"subscription:{subscription}\nmessage-id:{message_id}\n"
        if ack is not None:
            middle += f"ack:{escape(ack) if escape_headers else ack}\n"
        return self.render_with(middle.encode("utf-8"), escape_headers=escape_headers)

    def render_with(self, receiver_headers: bytes, *, escape_headers: bool = True) -> bytes:
        """The MESSAGE with ``receiver_headers`` (already encoded ``subscription``/``message-id``/``ack``
        lines, each ending in ``\\n``) between the shared head and tail: the per-delivery hot path."""
        head, tail = self._parts(escape_headers)
        return b"".join((head, receiver_headers, tail))
