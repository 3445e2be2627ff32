"""ChatMessage / ChatRoom JSON, exactly as the Spring reference's Jackson writes it.

Owns: encoding stored messages to ChatMessage JSON (declaration order ``type, roomId, sender,
message, userCount`` then the added fields ``id, seq, createdAt``), decoding and validating what a
client SENDs to ``/pub/chat/message``, and reading ``seq``/``roomId`` from a payload received from
the bus (a Spring node's payload has no ``id``/``seq``).

What a room id may be and which destination is a room is not decided here: the one rule is
:func:`gateway.broker.channels.valid_room_id` / :func:`~gateway.broker.channels.room_id_of` (the
channel naming depends on it); a SEND's ``roomId`` is checked with it, and ``room_id_of`` is
re-exported for the chat modules that import it from here.

Must not import Starlette, the transport layer or the broker (except that room-id rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.broker.channels import room_id_of, valid_room_id
from gateway.chat.models import MessageType, Room, StoredMessage

__all__ = [
    "SYSTEM_SENDER", "UNKNOWN_SENDER", "InboundChatMessage", "InvalidChatMessage", "decode_inbound",
    "encode_json", "encode_message", "iso", "message_dict", "peek_seq", "room_dict", "room_id_of",
]

SYSTEM_SENDER = "[알림]"
UNKNOWN_SENDER = "UnknownUser"


class InvalidChatMessage(ValueError):
    """A client's ChatMessage is malformed; ``str(exc)`` is the ERROR frame's message."""


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_dict(stored: StoredMessage, user_count: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": str(stored.type), "roomId": stored.room_id, "sender": stored.sender,
        "message": stored.message, "userCount": user_count, "id": stored.id, "seq": stored.seq,
        "createdAt": iso(stored.created_at),
    }
    if stored.client_msg_id is not None:
        body["clientMsgId"] = stored.client_msg_id
    return body


def encode_message(stored: StoredMessage, user_count: int) -> bytes:
    return _dumps(message_dict(stored, user_count))


def encode_json(value: Any) -> bytes:
    return _dumps(value)


def room_dict(room: Room, user_count: int) -> dict[str, Any]:
    return {"roomId": room.room_id, "name": room.name, "userCount": user_count}


@dataclass(frozen=True, slots=True)
class InboundChatMessage:
    type: MessageType
    room_id: str
    sender: str | None
    message: str
    client_msg_id: str | None


def decode_inbound(body: bytes, *, max_chars: int) -> InboundChatMessage:
    """Validate a client's ChatMessage body. Raises :class:`InvalidChatMessage` with a clear reason."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidChatMessage("ChatMessage body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidChatMessage("ChatMessage body must be a JSON object")
    raw_type = data.get("type", "TALK")
    if not isinstance(raw_type, str) or raw_type not in ("TALK", "ENTER", "QUIT"):
        raise InvalidChatMessage("ChatMessage 'type' must be TALK or ENTER")
    if raw_type == "QUIT":
        raise InvalidChatMessage("ChatMessage type QUIT is sent by the server, not by clients")
    room_id = data.get("roomId")
    if not isinstance(room_id, str) or not room_id:
        raise InvalidChatMessage("ChatMessage 'roomId' is required")
    if not valid_room_id(room_id):
        raise InvalidChatMessage("ChatMessage 'roomId' is not a room id (no '/', '*', '?', '{', "
                                 "and not starting with 'gateway:')")
    message = data.get("message", "")
    if message is None:
        message = ""
    if not isinstance(message, str):
        raise InvalidChatMessage("ChatMessage 'message' must be a string")
    if raw_type == "TALK" and not message.strip():
        raise InvalidChatMessage("ChatMessage 'message' is required for TALK")
    if len(message) > max_chars:
        raise InvalidChatMessage(f"ChatMessage 'message' is longer than {max_chars} characters")
    sender = data.get("sender")
    if sender is not None and not isinstance(sender, str):
        raise InvalidChatMessage("ChatMessage 'sender' must be a string")
    if sender is not None and len(sender) > 100:
        raise InvalidChatMessage("ChatMessage 'sender' is longer than 100 characters")
    client_msg_id = data.get("clientMsgId")
    if client_msg_id is not None and (not isinstance(client_msg_id, str) or not 0 < len(client_msg_id) <= 64):
        raise InvalidChatMessage("ChatMessage 'clientMsgId' must be a string of 1 to 64 characters")
    return InboundChatMessage(MessageType(raw_type), room_id, sender or None, message, client_msg_id)


def peek_seq(body: bytes) -> tuple[str | None, int | None]:
    """(roomId, seq) of a ChatMessage from the bus; (None, None) when it is not one of ours."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    room_id = data.get("roomId")
    seq = data.get("seq")
    return (room_id if isinstance(room_id, str) else None,
            seq if isinstance(seq, int) and not isinstance(seq, bool) else None)
