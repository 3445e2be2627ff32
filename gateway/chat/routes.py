"""REST routes of the chat domain (Spring parity, plus history).

| method | path | answer |
|---|---|---|
| GET  | ``/chat/rooms`` | ChatRoom array, live ``userCount`` |
| POST | ``/chat/room`` | ChatRoom; ``name`` as form field or query parameter |
| GET  | ``/chat/room/{roomId}`` | ChatRoom plus ``lastSeq`` (where a page opening the room starts), or 404 JSON |
| GET  | ``/chat/room/{roomId}/messages?after=&limit=`` | ChatMessage array (``id``, ``seq``, ``createdAt``) in seq order |

Errors are JSON ``{"error": "..."}`` with a 4xx status. Must not import the transport layer.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.chat.payload import encode_json, message_dict, room_dict
from gateway.chat.service import ChatService

JSON_TYPE = "application/json;charset=UTF-8"


def _json(value: Any, status: int = 200) -> Response:
    return Response(encode_json(value), status_code=status, media_type=JSON_TYPE)


def _error(message: str, status: int) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def chat_routes(service: ChatService) -> list[BaseRoute]:
    settings = service.settings

    async def list_rooms(request: Request) -> Response:
        rooms = await service.repository.list_rooms()
        counts = await service.presence.counts(room.room_id for room in rooms)
        return _json([room_dict(room, counts.get(room.room_id, 0)) for room in rooms])

    async def create_room(request: Request) -> Response:
        name = request.query_params.get("name")
        if name is None:
            form = await request.form()
            value = form.get("name")
            name = value if isinstance(value, str) else None
        if name is None or not name.strip():
            return _error("'name' is required (form field or query parameter)", 400)
        name = name.strip()
        if len(name) > settings.max_room_name_chars:
            return _error(f"'name' is longer than {settings.max_room_name_chars} characters", 400)
        room = await service.repository.create_room(name)
        return _json(room_dict(room, 0))

    async def get_room(request: Request) -> Response:
        room_id = request.path_params["room_id"]
        room = await service.repository.get_room(room_id)
        if room is None:
            return _error(f"No room {room_id!r}", 404)
        body = room_dict(room, await service.presence.count(room_id))
        body["lastSeq"] = await service.repository.last_seq(room_id) or 0
        return _json(body)

    async def history(request: Request) -> Response:
        room_id = request.path_params["room_id"]
        try:
            after = int(request.query_params.get("after", "0"))
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return _error("'after' and 'limit' must be integers", 400)
        if after < 0 or limit < 1:
            return _error("'after' must be >= 0 and 'limit' >= 1", 400)
        limit = min(limit, settings.history_max_limit)
        if not await service.room_exists(room_id):
            return _error(f"No room {room_id!r}", 404)
        stored = await service.repository.history(room_id, after, limit)
        count = await service.presence.count(room_id)
        return _json([message_dict(message, count) for message in stored])

    return [
        Route("/chat/rooms", list_rooms, methods=["GET"]),
        Route("/chat/room", create_room, methods=["POST"]),
        Route("/chat/room/{room_id}/messages", history, methods=["GET"]),
        Route("/chat/room/{room_id}", get_room, methods=["GET"]),
    ]
