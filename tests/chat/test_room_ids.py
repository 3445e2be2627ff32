"""One rule for room ids: the chat layer, the sequencer and the Redis channel naming agree.

The rule is :func:`gateway.broker.channels.valid_room_id`; ``payload.room_id_of`` (and through it
``RoomSequencer.room_of`` and ``ChatService.room_of``), ``SpringChannelMapper.room_id`` and the
channel a room publication travels on must all follow it.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.broker.base import Publication
from gateway.broker.channels import (
    GENERIC_CHANNEL_MARKER,
    RESERVED_ROOM_PREFIX,
    SpringChannelMapper,
    valid_room_id,
)
from gateway.chat.payload import InvalidChatMessage, decode_inbound, peek_seq, room_id_of
from tests.chat.test_sequencer import PREFIX, World

MAPPERS = [SpringChannelMapper(mode=mode, prefix=prefix, payload=payload, room_reader=peek_seq, node_id="n1")
           for mode in ("room", "single") for prefix in ("", "p:") for payload in ("spring", "envelope")]

room_ids = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="ab-/*?{}:\x1f\n가", max_size=12),
    st.builds(lambda tail: RESERVED_ROOM_PREFIX + tail, st.text(alphabet="abdest:/", max_size=8)),
    st.uuids().map(str),
)


def chat_body(room_id: str, seq: int = 1) -> bytes:
    return json.dumps({"type": "TALK", "roomId": room_id, "sender": "s", "message": "m", "userCount": 0,
                       "seq": seq}, ensure_ascii=False).encode()


def rooms_seen(destination: str) -> set[str | None]:
    """The room every layer finds in ``destination`` (a set of one value when they agree)."""
    sequencer = World().sequencer
    return ({room_id_of(PREFIX, destination), sequencer.room_of(destination)}
            | {mapper.room_id(destination) for mapper in MAPPERS})


@pytest.mark.parametrize("room_id", ["gateway:x", "gateway:dest:/sub/x", "gateway:", RESERVED_ROOM_PREFIX + "r1"])
def test_a_gateway_prefixed_id_is_no_room_anywhere(room_id: str) -> None:
    assert not valid_room_id(room_id)
    assert rooms_seen(PREFIX + room_id) == {None}
    with pytest.raises(InvalidChatMessage, match="'roomId' is not a room id"):
        decode_inbound(chat_body(room_id), max_chars=1000)
    for mapper in MAPPERS:
        channel, _ = mapper.encode(Publication(PREFIX + room_id, chat_body(room_id), seq=1))
        assert channel == mapper.prefix + GENERIC_CHANNEL_MARKER + PREFIX + room_id
    room_mode = SpringChannelMapper(prefix="p:", room_reader=peek_seq)
    assert room_mode.decode("p:" + room_id, chat_body(room_id)) is None


@pytest.mark.parametrize("room_id", ["", "a/b", "*", "r?", "{id}", "a{b"])
def test_other_non_rooms_agree(room_id: str) -> None:
    assert rooms_seen(PREFIX + room_id) == {None}
    with pytest.raises(InvalidChatMessage):
        decode_inbound(chat_body(room_id), max_chars=1000)


def test_a_uuid_room_round_trips() -> None:
    room_id = "0b6f3a4e-7a53-4c55-9d0c-5e0b7f1a2c3d"
    assert rooms_seen(PREFIX + room_id) == {room_id}
    assert decode_inbound(chat_body(room_id), max_chars=1000).room_id == room_id
    room_mode = SpringChannelMapper(prefix="p:", room_reader=peek_seq)
    assert room_mode.room_channel(room_id) == "p:" + room_id


@given(room_ids)
def test_every_layer_applies_the_same_rule(room_id: str) -> None:
    destination = PREFIX + room_id
    assert rooms_seen(destination) == {room_id if valid_room_id(room_id) else None}
    try:
        accepted = decode_inbound(chat_body(room_id), max_chars=1000).room_id == room_id
    except InvalidChatMessage:
        accepted = False
    assert accepted == valid_room_id(room_id)


@given(room_ids, st.integers(min_value=1, max_value=2**40))
def test_destination_room_channel_room_round_trip(room_id: str, seq: int) -> None:
    """What one node publishes to a room destination, every other node decodes to the same room."""
    destination = PREFIX + room_id
    body = chat_body(room_id, seq)
    for mapper in MAPPERS:
        channel, payload = mapper.encode(Publication(destination, body, seq=seq, origin="n1"))
        decoded = mapper.decode(channel, payload)
        assert decoded is not None
        assert (decoded.destination, decoded.body, decoded.seq) == (destination, body, seq)
        is_room_channel = not channel.startswith(mapper.prefix + GENERIC_CHANNEL_MARKER)
        header_safe = "\x1f" not in room_id and "\n" not in room_id  # the envelope form's header line
        assert is_room_channel == (valid_room_id(room_id) and (mapper.payload == "spring" or header_safe))
        if is_room_channel:
            assert mapper.room_id(decoded.destination) == room_id
            if mapper.mode == "room":
                assert channel == mapper.room_channel(room_id)
                assert channel[len(mapper.prefix):] == room_id
