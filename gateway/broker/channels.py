"""Redis channel naming, shared with the Spring chat servers of a mixed fleet.

Owns: which Redis channels and glob patterns a broker destination needs (:meth:`subscriptions`),
which channel and payload a :class:`Publication` travels as (:meth:`encode`), and turning a received
Redis message back into a :class:`Publication` (:meth:`decode`). Also Redis glob escaping and
matching for the patterns produced here.

Naming (``P`` = ``redis_channel_prefix``, rooms are destinations ``<chat_room_prefix><roomId>``):

- mode ``room`` (the seed's ``ChannelTopic.of(roomId)``): a room travels on channel ``P<roomId>``;
- mode ``single`` (the reference master): every room travels on channel ``P<redis_single_channel>``
  and the receiver takes the room from the ChatMessage JSON's ``roomId``;
- room payloads (``redis_payload``):
  - ``spring`` (default): the MESSAGE body as-is (ChatMessage JSON, what Spring's
    ``Jackson2JsonRedisSerializer`` writes and reads), so a mixed fleet shares the channels; such a
    payload carries no origin, and its ``seq`` (and in ``single`` mode its room) is read from the
    body by the application's :data:`~gateway.broker.base.RoomPayloadReader`;
  - ``envelope`` (gateway-only fleets): one header line ``GW2<US><seq><US><roomId><US><origin>\n``
    before the body, so receivers order by ``seq`` without reading the body. Spring servers cannot
    read it. Receivers accept both forms whatever their own setting, so the setting can be changed
    node by node;
- everything else (non-room destinations, and room publications a Spring server could not read:
  another content type, extra headers, or in ``single`` mode a body whose ``roomId`` is not the
  destination's) travels on the gateway-only channel ``P gateway:dest:<destination>`` as a JSON
  envelope ``{"v":1,"destination","content_type","headers","body" | "body_base64","origin"}``.

Sharded Pub/Sub (``redis_sharded_pubsub``, off by default): room channels (the names above, unchanged)
are then SSUBSCRIBEd and SPUBLISHed; gateway-only envelope channels and every pattern stay classic
Pub/Sub (Redis has no sharded pattern subscription). :attr:`RedisSubscription.sharded` says which.

Room ids (the one rule, :func:`valid_room_id`; the chat layer asks :func:`room_id_of` too) are
non-empty, contain no ``/`` and no Ant wildcard (``*``, ``?``, ``{``) and do not start with the
reserved ``gateway:`` (a room channel ``P<roomId>`` must never be a gateway-only channel
``P gateway:…``); other destinations under the room prefix are not rooms. In ``room`` mode a room's
channel name gives the room back: ``room_channel(r)[len(P):] == r``.

Must not import redis, asyncio, Starlette, the transport layer or the chat domain (the chat JSON is
read only through the injected reader).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from gateway.broker.base import Publication, RoomPayloadReader
from gateway.broker.patterns import WILDCARDS, is_pattern
from gateway.settings import default

if TYPE_CHECKING:
    from gateway.settings import Settings

GENERIC_CHANNEL_MARKER = "gateway:dest:"
"""Channel names ``<prefix>gateway:dest:<destination>`` carry gateway-only envelopes."""
RESERVED_ROOM_PREFIX = "gateway:"
"""No room id starts with this: gateway-only channels (:data:`GENERIC_CHANNEL_MARKER`) live under it."""
ROOM_CONTENT_TYPE = "application/json"
ENVELOPE_VERSION = 1
ROOM_ENVELOPE_MAGIC = b"GW2\x1f"
"""How a room payload in the ``envelope`` form starts (never the start of a JSON document)."""
_ROOM_ENVELOPE_SEP = b"\x1f"
PAYLOAD_FORMS = ("spring", "envelope")
_GLOB_SPECIAL = frozenset("*?[]\\")


@dataclass(frozen=True, slots=True, order=True)
class RedisSubscription:
    """One Redis-level subscription: a channel (SUBSCRIBE) or a glob pattern (PSUBSCRIBE)."""

    is_pattern: bool
    name: str
    sharded: bool = False
    """A sharded channel (SSUBSCRIBE/SPUBLISH, Redis 7): a room channel when ``redis_sharded_pubsub`` is on."""


class ChannelMapper(Protocol):
    """How broker destinations and publications map onto Redis channels and payloads."""

    def subscriptions(self, destination: str) -> frozenset[RedisSubscription]:
        """The Redis subscriptions that receive every publication to ``destination``.

        For an Ant pattern this may be a superset: the broker filters decoded publications against
        the destinations it subscribed to.
        """

    def encode(self, publication: Publication) -> tuple[str, bytes]:
        """The channel and payload ``publication`` is PUBLISHed as."""

    def decode(self, channel: str, payload: bytes) -> Publication | None:
        """The publication a message on ``channel`` carries, or None if it is not one of ours."""

    def is_sharded(self, channel: str) -> bool:
        """Whether ``channel`` (as returned by :meth:`encode`) is SPUBLISHed rather than PUBLISHed."""


def valid_room_id(room_id: str) -> bool:
    """Whether ``room_id`` may be a room: the one rule every layer applies (see the module docstring)."""
    return (bool(room_id) and "/" not in room_id and not is_pattern(room_id)
            and not room_id.startswith(RESERVED_ROOM_PREFIX))


@lru_cache(maxsize=65536)
def room_id_of(room_prefix: str, destination: str) -> str | None:
    """The room of an exact room destination ``<room_prefix><roomId>``; None for any other destination.

    Cached: the chat path asks it several times per message (validation, sequencer, service)."""
    if not destination.startswith(room_prefix):
        return None
    room_id = destination[len(room_prefix):]
    return room_id if valid_room_id(room_id) else None


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob matching exactly itself."""
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)


@lru_cache(maxsize=1024)
def _glob_regex(glob: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    n = len(glob)
    while i < n:
        ch = glob[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            end = glob.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = glob[i + 1:end]
                negate = body.startswith("^")
                if negate:
                    body = body[1:]
                parts = []
                j = 0
                while j < len(body):
                    if body[j] == "\\" and j + 1 < len(body):
                        parts.append(re.escape(body[j + 1]))
                        j += 2
                        continue
                    if j + 2 < len(body) and body[j + 1] == "-":
                        low, high = sorted((body[j], body[j + 2]))
                        parts.append(f"{re.escape(low)}-{re.escape(high)}")
                        j += 3
                        continue
                    parts.append(re.escape(body[j]))
                    j += 1
                out.append(f"[{'^' if negate else ''}{''.join(parts)}]" if parts else ("." if negate else "(?!)"))
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def glob_matches(glob: str, channel: str) -> bool:
    """Whether the Redis glob ``glob`` matches ``channel`` (``*``, ``?``, ``[...]``, ``\\`` escapes).

    Redis matches bytes; this matches characters. They agree for every pattern this module
    produces (literal text followed by ``*``).
    """
    return _glob_regex(glob).match(channel) is not None


def _literal_head(pattern: str) -> str:
    """The literal text of an Ant pattern before its first wildcard.

    Every destination the pattern matches starts with the head (a trailing ``/`` before ``**`` is
    dropped, since ``/a/**`` also matches ``/a``).
    """
    cut = min((i for i in (pattern.find(w) for w in WILDCARDS) if i >= 0), default=len(pattern))
    head = pattern[:cut]
    if pattern.startswith("**", cut) and head.endswith("/"):
        head = head[:-1]
    return head


class SpringChannelMapper:
    """The :class:`ChannelMapper` of a fleet shared with Spring chat servers (see module docstring)."""

    def __init__(self, *, mode: str = default("redis_channel_mode"), prefix: str = default("redis_channel_prefix"),
                 room_prefix: str = default("chat_room_prefix"),
                 single_channel: str = default("redis_single_channel"), node_id: str = "",
                 payload: str = default("redis_payload"), room_reader: RoomPayloadReader | None = None,
                 sharded: bool = default("redis_sharded_pubsub")) -> None:
        if mode not in {"room", "single"}:
            raise ValueError(f"channel mode must be 'room' or 'single', not {mode!r}")
        if payload not in PAYLOAD_FORMS:
            raise ValueError(f"room payload form must be one of {PAYLOAD_FORMS}, not {payload!r}")
        if not room_prefix:
            raise ValueError("room_prefix must not be empty")
        if mode == "single" and not single_channel:
            raise ValueError("single_channel must not be empty in single mode")
        self.mode = mode
        self.prefix = prefix
        self.room_prefix = room_prefix
        self.single_channel = single_channel
        self.node_id = node_id
        self.payload = payload
        self.room_reader = room_reader
        self.sharded = sharded
        self._generic_prefix = prefix + GENERIC_CHANNEL_MARKER

    @classmethod
    def from_settings(cls, settings: Settings, room_reader: RoomPayloadReader | None = None) -> SpringChannelMapper:
        return cls(mode=settings.redis_channel_mode, prefix=settings.redis_channel_prefix,
                   room_prefix=settings.chat_room_prefix, single_channel=settings.redis_single_channel,
                   node_id=settings.node_id, payload=settings.redis_payload, room_reader=room_reader,
                   sharded=settings.redis_sharded_pubsub)

    # --- naming ----------------------------------------------------------------------------------

    def room_id(self, destination: str) -> str | None:
        """The room id of a room destination, else None (:func:`room_id_of` with this room prefix)."""
        return room_id_of(self.room_prefix, destination)

    def room_channel(self, room_id: str) -> str:
        """The channel a room's ChatMessages travel on (Spring's topic for it)."""
        return self.prefix + (room_id if self.mode == "room" else self.single_channel)

    def generic_channel(self, destination: str) -> str:
        return self._generic_prefix + destination

    # --- ChannelMapper -----------------------------------------------------------------------------

    def subscriptions(self, destination: str) -> frozenset[RedisSubscription]:
        if not is_pattern(destination):
            subs = {RedisSubscription(False, self.generic_channel(destination))}
            room_id = self.room_id(destination)
            if room_id is not None:
                subs.add(RedisSubscription(False, self.room_channel(room_id), self.sharded))
            return frozenset(subs)
        head = _literal_head(destination)
        subs = {RedisSubscription(True, glob_escape(self._generic_prefix + head) + "*")}
        room_sub = self._room_subscription_for_head(head)
        if room_sub is not None:
            subs.add(room_sub)
        return frozenset(subs)

    def _room_subscription_for_head(self, head: str) -> RedisSubscription | None:
        """What covers every room whose destination starts with ``head`` (None: no room can)."""
        if head.startswith(self.room_prefix):
            partial_id = head[len(self.room_prefix):]
            if "/" in partial_id or partial_id.startswith(RESERVED_ROOM_PREFIX):
                return None
        elif self.room_prefix.startswith(head):
            partial_id = ""
        else:
            return None
        if self.mode == "single":
            return RedisSubscription(False, self.prefix + self.single_channel, self.sharded)
        return RedisSubscription(True, glob_escape(self.prefix + partial_id) + "*")

    def is_sharded(self, channel: str) -> bool:
        return self.sharded and not channel.startswith(self._generic_prefix)

    def encode(self, publication: Publication) -> tuple[str, bytes]:
        room_id = self.room_id(publication.destination)
        if room_id is not None and publication.content_type == ROOM_CONTENT_TYPE and not publication.headers:
            if self.payload == "envelope":
                if publication.seq is not None and "\x1f" not in room_id and "\n" not in room_id:
                    head = f"{publication.seq}\x1f{room_id}\x1f{publication.origin or self.node_id}\n"
                    return self.room_channel(room_id), ROOM_ENVELOPE_MAGIC + head.encode("utf-8") + publication.body
            elif self.mode == "room" or self._read_body(publication.body)[0] == room_id:
                return self.room_channel(room_id), publication.body
        return self.generic_channel(publication.destination), self._envelope(publication)

    def _read_body(self, body: bytes) -> tuple[str | None, int | None]:
        reader = self.room_reader
        return (None, None) if reader is None else reader(body)

    def _envelope(self, publication: Publication) -> bytes:
        envelope: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "destination": publication.destination,
            "content_type": publication.content_type,
            "headers": [list(pair) for pair in publication.headers],
            "origin": publication.origin or self.node_id,
        }
        if publication.seq is not None:
            envelope["seq"] = publication.seq
        try:
            envelope["body"] = publication.body.decode("utf-8")
        except UnicodeDecodeError:
            envelope["body_base64"] = base64.b64encode(publication.body).decode("ascii")
        return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def decode(self, channel: str, payload: bytes) -> Publication | None:
        if channel.startswith(self._generic_prefix):
            return self._open_envelope(channel[len(self._generic_prefix):], payload)
        if self.mode == "room":
            if not channel.startswith(self.prefix):
                return None
            channel_room: str | None = channel[len(self.prefix):]
        elif channel != self.prefix + self.single_channel:
            return None
        else:
            channel_room = None
        if payload.startswith(ROOM_ENVELOPE_MAGIC):
            return self._open_room_envelope(channel_room, payload)
        body_room, seq = self._read_body(payload)
        room_id = channel_room if self.mode == "room" else body_room
        if room_id is None or not valid_room_id(room_id):
            return None
        return Publication(self.room_prefix + room_id, payload, ROOM_CONTENT_TYPE, seq=seq)

    def _open_room_envelope(self, channel_room: str | None, payload: bytes) -> Publication | None:
        head, newline, body = payload[len(ROOM_ENVELOPE_MAGIC):].partition(b"\n")
        parts = head.split(_ROOM_ENVELOPE_SEP)
        if not newline or len(parts) != 3 or not parts[0].isdigit():
            return None
        try:
            room_id = parts[1].decode("utf-8")
            origin = parts[2].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if (channel_room is not None and room_id != channel_room) or not valid_room_id(room_id):
            return None
        return Publication(self.room_prefix + room_id, body, ROOM_CONTENT_TYPE, origin=origin, seq=int(parts[0]))

    @staticmethod
    def _open_envelope(destination: str, payload: bytes) -> Publication | None:
        try:
            envelope = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE_VERSION:
            return None
        if envelope.get("destination") != destination:
            return None
        content_type = envelope.get("content_type")
        origin = envelope.get("origin", "")
        raw_headers = envelope.get("headers", [])
        if not (content_type is None or isinstance(content_type, str)) or not isinstance(origin, str):
            return None
        if not isinstance(raw_headers, list) or not all(
                isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in raw_headers):
            return None
        headers = tuple((h[0], h[1]) for h in raw_headers)
        seq = envelope.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            return None
        if isinstance(envelope.get("body"), str):
            body = envelope["body"].encode("utf-8")
        elif isinstance(envelope.get("body_base64"), str):
            try:
                body = base64.b64decode(envelope["body_base64"], validate=True)
            except (binascii.Error, ValueError):
                return None
        else:
            return None
        return Publication(destination, body, content_type, headers, origin, seq)
