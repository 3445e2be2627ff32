"""REST routes of the chat domain (Spring parity, plus history and members).

| method | path | answer |
|---|---|---|
| GET  | ``/chat/rooms`` | ChatRoom array, live ``userCount`` (only the rooms the policy lets the caller see) |
| POST | ``/chat/room`` | ChatRoom; ``name`` as form field or query parameter; the creator becomes a member |
| GET  | ``/chat/room/{roomId}`` | ChatRoom plus ``lastSeq`` (where a page opening the room starts), or 404 JSON |
| GET  | ``/chat/room/{roomId}/messages?after=&limit=`` | ChatMessage array (``id``, ``seq``, ``createdAt``) in seq order |
| GET  | ``/chat/room/{roomId}/members`` | ``{"roomId", "members": [names]}`` |
| POST | ``/chat/room/{roomId}/members`` | adds ``user`` (form field or query parameter); answers the members |
| DELETE | ``/chat/room/{roomId}/members/{user}`` | removes a member; 204 |

Authentication and authorization (docs/security.md): in ``users`` and ``jwt`` modes every route needs
the ``chat_session`` cookie or an ``Authorization`` header (401 ``login required`` / ``invalid
token`` otherwise); the ``authz_policy`` decides (403 ``Access denied: ...``). State-changing calls
(POST, DELETE) from another site are refused with 403 (the Origin rule of ``/chat/login``). The
policy is asked before the room is looked up: under ``members`` an unknown room answers 403 like a
room of others (no probing which rooms exist), under ``open`` 404.

Errors are JSON ``{"error": "..."}`` with a 4xx status. Must not import the transport layer (except the
standard-library-only ``gateway.transport.origin``, the one Origin rule of every endpoint).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.auth import users_authenticator
from gateway.authz import AccessRequest, Action, RestAuthError, refusal, rest_user
from gateway.chat.payload import encode_json, message_dict, room_dict
from gateway.chat.repository import UnknownRoomError
from gateway.chat.service import ChatService
from gateway.transport.origin import origin_allowed

JSON_TYPE = "application/json;charset=UTF-8"
MAX_MEMBER_CHARS = 100


def _json(value: Any, status: int = 200) -> Response:
    return Response(encode_json(value), status_code=status, media_type=JSON_TYPE)


def _error(message: str, status: int) -> Response:
    response = JSONResponse({"error": message}, status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="chat-gateway"'
    return response


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


Endpoint = Callable[[Request, str | None], Awaitable[Response]]


def chat_routes(service: ChatService) -> list[BaseRoute]:
    settings = service.settings
    authz = service.authz
    users = users_authenticator(settings.users) if settings.users else None

    def endpoint(handler: Endpoint, *, changes_state: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            if changes_state and not origin_allowed(request.headers.get("origin"), request.headers.get("host"),
                                                    settings.allowed_origins):
                return _error("cross-site request refused", 403)
            try:
                user = rest_user(request, settings, users)
            except RestAuthError as exc:
                return _error(str(exc), 401)
            try:
                return await handler(request, user)
            except _Refused as refused:
                return refused.response
        return run

    async def require(request: AccessRequest) -> None:
        if not await authz.ask(request):
            raise _Refused(_error(refusal(request), 403))

    async def list_rooms(request: Request, user: str | None) -> Response:
        if settings.authz_policy == "members":
            rooms = await service.repository.rooms_of(user) if user is not None else []
        else:
            rooms = await service.repository.list_rooms()
            if settings.authz_policy != "open":
                answers = await authz.ask_many([AccessRequest(Action.LIST, user, room.room_id) for room in rooms])
                rooms = [room for room, allowed in zip(rooms, answers, strict=True) if allowed]
        counts = await service.presence.counts(room.room_id for room in rooms)
        return _json([room_dict(room, counts.get(room.room_id, 0)) for room in rooms])

    async def create_room(request: Request, user: str | None) -> Response:
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
        await require(AccessRequest(Action.CREATE, user))
        room = await service.repository.create_room(name, creator=user)
        return _json(room_dict(room, 0))

    async def get_room(request: Request, user: str | None) -> Response:
        room_id = request.path_params["room_id"]
        await require(AccessRequest(Action.READ, user, room_id))
        room = await service.repository.get_room(room_id)
        if room is None:
            return _error(f"No room {room_id!r}", 404)
        body = room_dict(room, await service.presence.count(room_id))
        body["lastSeq"] = await service.repository.last_seq(room_id) or 0
        return _json(body)

    async def history(request: Request, user: str | None) -> Response:
        room_id = request.path_params["room_id"]
        try:
            after = int(request.query_params.get("after", "0"))
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return _error("'after' and 'limit' must be integers", 400)
        if after < 0 or limit < 1:
            return _error("'after' must be >= 0 and 'limit' >= 1", 400)
        limit = min(limit, settings.history_max_limit)
        await require(AccessRequest(Action.READ, user, room_id))
        if not await service.room_exists(room_id):
            return _error(f"No room {room_id!r}", 404)
        stored = await service.repository.history(room_id, after, limit)
        count = await service.presence.count(room_id)
        return _json([message_dict(message, count) for message in stored])

    async def members(request: Request, user: str | None) -> Response:
        room_id = request.path_params["room_id"]
        await require(AccessRequest(Action.READ, user, room_id))
        if not await service.room_exists(room_id):
            return _error(f"No room {room_id!r}", 404)
        return _json({"roomId": room_id, "members": await service.repository.members(room_id)})

    async def add_member(request: Request, user: str | None) -> Response:
        room_id = request.path_params["room_id"]
        member = request.query_params.get("user")
        if member is None:
            form = await request.form()
            value = form.get("user")
            member = value if isinstance(value, str) else None
        if member is None or not member.strip() or len(member.strip()) > MAX_MEMBER_CHARS:
            return _error(f"'user' is required (form field or query parameter, at most {MAX_MEMBER_CHARS} "
                          "characters)", 400)
        member = member.strip()
        await require(AccessRequest(Action.MANAGE, user, room_id, member=member))
        try:
            await service.repository.add_member(room_id, member)
        except UnknownRoomError:
            return _error(f"No room {room_id!r}", 404)
        service.membership_changed(room_id, member, added=True)
        return _json({"roomId": room_id, "members": await service.repository.members(room_id)})

    async def remove_member(request: Request, user: str | None) -> Response:
        room_id = request.path_params["room_id"]
        member = request.path_params["user"]
        await require(AccessRequest(Action.MANAGE, user, room_id, member=member))
        if not await service.repository.remove_member(room_id, member):
            return _error(f"{member!r} is not a member of room {room_id!r}", 404)
        service.membership_changed(room_id, member, added=False)
        return Response(status_code=204)

    return [
        Route("/chat/rooms", endpoint(list_rooms), methods=["GET"]),
        Route("/chat/room", endpoint(create_room, changes_state=True), methods=["POST"]),
        Route("/chat/room/{room_id}/messages", endpoint(history), methods=["GET"]),
        Route("/chat/room/{room_id}/members", endpoint(members), methods=["GET"]),
        Route("/chat/room/{room_id}/members", endpoint(add_member, changes_state=True), methods=["POST"]),
        Route("/chat/room/{room_id}/members/{user}", endpoint(remove_member, changes_state=True),
              methods=["DELETE"]),
        Route("/chat/room/{room_id}", endpoint(get_room), methods=["GET"]),
    ]
