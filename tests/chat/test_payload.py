"""ChatMessage JSON: Jackson's field order, added fields, and validation of client SENDs."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.chat.models import MessageType, Room, StoredMessage
from gateway.chat.payload import (
    InvalidChatMessage,
    decode_inbound,
    encode_message,
    peek_seq,
    room_dict,
)

STORED = StoredMessage(id=7, room_id="r-1", seq=3, type=MessageType.TALK, sender="happydaddy", message="hi",
                       created_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), client_msg_id=None)


def test_encode_keeps_spring_field_order_then_added_fields() -> None:
    body = encode_message(STORED, 2)
    assert body == (b'{"type":"TALK","roomId":"r-1","sender":"happydaddy","message":"hi","userCount":2,'
                    b'"id":7,"seq":3,"createdAt":"2026-01-02T03:04:05.678Z"}')


def test_encode_writes_unicode_as_utf8_not_escapes() -> None:
    stored = StoredMessage(1, "r", 1, MessageType.ENTER, "[알림]", "a님이 방에 입장했습니다.",
                           STORED.created_at, "c-1")
    body = encode_message(stored, 0)
    assert "[알림]".encode() in body
    assert json.loads(body)["clientMsgId"] == "c-1"


def test_room_dict_is_spring_chatroom() -> None:
    room = Room("r-1", "lobby", STORED.created_at)
    assert json.dumps(room_dict(room, 4)) == '{"roomId": "r-1", "name": "lobby", "userCount": 4}'


def test_decode_minimal_talk() -> None:
    chat = decode_inbound(b'{"type":"TALK","roomId":"r","message":"hello","sender":"x"}', max_chars=10)
    assert (chat.type, chat.room_id, chat.message, chat.sender) == (MessageType.TALK, "r", "hello", "x")


def test_decode_defaults_type_to_talk_and_reads_client_msg_id() -> None:
    chat = decode_inbound(b'{"roomId":"r","message":"m","clientMsgId":"abc"}', max_chars=10)
    assert chat.type is MessageType.TALK and chat.client_msg_id == "abc" and chat.sender is None


@pytest.mark.parametrize(("body", "reason"), [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1,2]", "JSON object"),
    (b'{"type":"SHOUT","roomId":"r","message":"m"}', "'type'"),
    (b'{"type":"QUIT","roomId":"r"}', "sent by the server"),
    (b'{"type":"TALK","message":"m"}', "'roomId' is required"),
    (b'{"type":"TALK","roomId":"","message":"m"}', "'roomId' is required"),
    (b'{"type":"TALK","roomId":"r"}', "'message' is required"),
    (b'{"type":"TALK","roomId":"r","message":"   "}', "'message' is required"),
    (b'{"type":"TALK","roomId":"r","message":42}', "must be a string"),
    (b'{"type":"TALK","roomId":"r","message":"' + b"x" * 11 + b'"}', "longer than 10"),
    (b'{"type":"TALK","roomId":"r","message":"m","sender":5}', "'sender'"),
    (b'{"type":"TALK","roomId":"r","message":"m","clientMsgId":""}', "clientMsgId"),
])
def test_decode_rejects_with_a_clear_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidChatMessage, match=reason):
        decode_inbound(body, max_chars=10)


def test_message_limit_is_inclusive() -> None:
    assert decode_inbound(b'{"roomId":"r","message":"' + b"x" * 10 + b'"}', max_chars=10).message == "x" * 10


def test_enter_without_message_is_valid() -> None:
    chat = decode_inbound(b'{"type":"ENTER","roomId":"r","sender":"old"}', max_chars=10)
    assert chat.type is MessageType.ENTER and chat.sender == "old"


def test_peek_seq_reads_ours_and_ignores_spring_payloads() -> None:
    assert peek_seq(encode_message(STORED, 0)) == ("r-1", 3)
    assert peek_seq(b'{"type":"TALK","roomId":"r","sender":"s","message":"m","userCount":0}') == ("r", None)
    assert peek_seq(b"garbage") == (None, None)
    assert peek_seq(b'{"roomId":"r","seq":true}') == ("r", None)
