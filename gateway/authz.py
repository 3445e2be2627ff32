"""Destination authorization: who may subscribe to, send to, read, list and manage which room.

Owns:

- :class:`AccessRequest` (what is asked: an :class:`Action`, the user, the room, the destination) and
  the policies chosen by the ``authz_policy`` setting: :class:`OpenPolicy` (``open``: anyone, as the
  Spring reference), :class:`MembersPolicy` (``members``: only a room's members; the membership rows
  come from a :class:`MembershipStore`, the chat repository) and :class:`HookPolicy`
  (``package.module:function``: an async callable that gets the request and answers a bool);
- :class:`Authorizer`: the policy behind a per-session decision cache. A session's decisions live in
  its :class:`~gateway.hub.SessionInfo` attributes for ``authz_cache_ttl_s``; :meth:`Authorizer.cached`
  answers a hit without awaiting, so the pipelined SEND path costs a dictionary lookup, not a query,
  per message. A membership change made on this node drops the room's cached decisions of every
  local session at once (:meth:`Authorizer.forget_room`); another node's change is seen here when the
  cached decision expires (the bound is ``authz_cache_ttl_s``), and :meth:`Authorizer.recheck` re-asks
  in one batch for the rooms sessions are subscribed to, so a removed member also stops *receiving*
  within that bound;
- :func:`wildcard_may_match` (could a pattern subscription match a room destination?);
- REST identity: :func:`rest_user` reads the session cookie or ``Authorization`` header the way the
  auth mode says (:class:`RestAuthError`, a 401, when missing or invalid), and the session tokens
  ``/chat/login`` puts in the ``chat_session`` cookie (:func:`session_token`).

Refusals of :meth:`Authorizer.check` and :meth:`Authorizer.ask` are counted in
``chat_gateway_access_denied_total`` by action (:mod:`gateway.metrics`).

Must not import Starlette (requests are read through a small protocol), the transport layer or the
chat domain.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import importlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.broker.patterns import is_pattern
from gateway.hub import SessionInfo
from gateway.metrics import ACCESS_DENIED_BY_ACTION
from gateway.settings import Settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed, Authenticator

log = logging.getLogger(__name__)

CACHE_ATTR = "authz"               # the SessionInfo attribute holding a session's decisions
SESSION_COOKIE = "chat_session"    # the login cookie (set by gateway.pages at /chat/login)
SESSION_TTL_S = 3600               # a session token's life, as the reference's jjwt tokens


class Action(enum.StrEnum):
    """What a request wants to do."""

    SUBSCRIBE = "subscribe"   # SUBSCRIBE to a destination (room_id None: not a room destination)
    SEND = "send"             # SEND a ChatMessage to a room
    READ = "read"             # GET a room or its history over REST
    LIST = "list"             # see the room in GET /chat/rooms (asked once per room)
    CREATE = "create"         # POST /chat/room (room_id None)
    MANAGE = "manage"         # add or remove a room's members


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """One question to the policy. ``wildcard`` is true for a pattern subscription that may match
    room destinations (then ``room_id`` is None and ``destination`` is the pattern)."""

    action: Action
    user: str | None
    room_id: str | None = None
    destination: str | None = None
    wildcard: bool = False
    member: str | None = None   # MANAGE: the member being added or removed


class MembershipStore(Protocol):
    """Where the members policy reads memberships (implemented by gateway.chat.repository)."""

    async def is_member(self, room_id: str, user: str) -> bool: ...

    async def memberships(self, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]: ...


class Policy(Protocol):
    name: str

    async def allows(self, request: AccessRequest) -> bool: ...

    async def allows_many(self, requests: Sequence[AccessRequest]) -> list[bool]: ...


AuthorizeHook = Callable[[AccessRequest], Awaitable[bool]]


class _OneByOne:
    async def allows(self, request: AccessRequest) -> bool:
        raise NotImplementedError

    async def allows_many(self, requests: Sequence[AccessRequest]) -> list[bool]:
        return [await self.allows(request) for request in requests]


class OpenPolicy(_OneByOne):
    """``open``: everyone may do everything, as the Spring reference; pattern subscriptions that can
    match rooms only with ``authz_room_wildcards``."""

    name = "open"

    def __init__(self, *, room_wildcards: bool = False) -> None:
        self.room_wildcards = room_wildcards

    async def allows(self, request: AccessRequest) -> bool:
        return self.room_wildcards or not request.wildcard


class MembersPolicy(_OneByOne):
    """``members``: a room's members subscribe, send, read, see it listed and add or remove members;
    any signed-in user may create a room (and becomes its first member). Pattern subscriptions that
    can match rooms are refused; other destinations are not rooms and stay open."""

    name = "members"

    def __init__(self, store: MembershipStore) -> None:
        self.store = store

    async def allows(self, request: AccessRequest) -> bool:
        if request.wildcard or request.user is None:
            return False
        if request.room_id is None:
            return request.action in (Action.SUBSCRIBE, Action.CREATE, Action.LIST)
        return await self.store.is_member(request.room_id, request.user)

    async def allows_many(self, requests: Sequence[AccessRequest]) -> list[bool]:
        pairs = [(r.room_id, r.user) for r in requests
                 if r.room_id is not None and r.user is not None and not r.wildcard]
        found = await self.store.memberships(pairs) if pairs else set()
        out = []
        for r in requests:
            if r.room_id is not None and r.user is not None and not r.wildcard:
                out.append((r.room_id, r.user) in found)
            else:
                out.append(await self.allows(r))
        return out


class HookPolicy(_OneByOne):
    """``package.module:function``: an ``async def f(request: AccessRequest) -> bool``. A hook that
    raises counts as a refusal (logged with its traceback)."""

    def __init__(self, hook: AuthorizeHook, name: str) -> None:
        self.hook = hook
        self.name = name

    async def allows(self, request: AccessRequest) -> bool:
        try:
            return bool(await self.hook(request))
        except Exception:
            log.exception("authorization hook %s failed for %s; refused", self.name, request)
            return False


def load_hook(spec: str) -> AuthorizeHook:
    """Import ``package.module:function`` and check it is an async callable."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"authz_policy {spec!r}: cannot import {module_name!r} ({exc})") from None
    hook = getattr(module, attribute, None)
    if hook is None or not callable(hook):
        raise ValueError(f"authz_policy {spec!r}: {module_name} has no callable {attribute!r}")
    if not inspect.iscoroutinefunction(hook):
        raise ValueError(f"authz_policy {spec!r}: {attribute} must be an async function")
    return hook  # type: ignore[no-any-return]


def create_policy(settings: Settings, store: MembershipStore) -> Policy:
    if settings.authz_policy == "open":
        return OpenPolicy(room_wildcards=settings.authz_room_wildcards)
    if settings.authz_policy == "members":
        return MembersPolicy(store)
    return HookPolicy(load_hook(settings.authz_policy), settings.authz_policy)


def wildcard_may_match(pattern: str, room_prefix: str) -> bool:
    """Whether the pattern subscription ``pattern`` could match some room destination
    (``<room_prefix><roomId>``): its literal part before the first wildcard and the room prefix are
    prefixes one of the other (``/sub/**``, ``/sub/chat/room/*``, ``/sub/*/room/x`` yes;
    ``/sub/other/*`` no). Conservative: it may say yes for a pattern that never matches a room."""
    if not is_pattern(pattern):
        return False
    cut = min((i for i in (pattern.find(ch) for ch in "*?{") if i >= 0), default=len(pattern))
    literal = pattern[:cut]
    return literal.startswith(room_prefix) or room_prefix.startswith(literal)


def refusal(request: AccessRequest) -> str:
    """The one-line ERROR ``message`` (or REST error) for a refused request."""
    who = repr(request.user) if request.user is not None else "an anonymous user"
    if request.wildcard:
        return (f"Access denied: wildcard subscriptions to room destinations are not allowed "
                f"({request.destination!r}); subscribe to each room")
    if request.room_id is None:
        return f"Access denied: {who} may not {request.action.value} {request.destination or 'here'!s}"
    verbs = {Action.SUBSCRIBE: "subscribe to", Action.SEND: "send to", Action.READ: "read",
             Action.LIST: "see", Action.MANAGE: "manage the members of", Action.CREATE: "create"}
    return f"Access denied: {who} may not {verbs[request.action]} room {request.room_id!r}"


def _count_denied(action: Action) -> None:
    child = ACCESS_DENIED_BY_ACTION.get(action.value)
    if child is not None:
        child.inc()


@dataclass(slots=True)
class _Entry:
    allowed: bool
    expires: float


class Authorizer:
    """The policy behind a per-session decision cache (see the module docstring)."""

    def __init__(self, policy: Policy, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.ttl_s = ttl_s
        self.clock = clock
        self.queries = 0   # policy calls made (tests check that SENDs hit the cache)

    @staticmethod
    def _decisions(session: SessionInfo) -> dict[tuple[Action, str], _Entry]:
        cache = session.attributes.get(CACHE_ATTR)
        if not isinstance(cache, dict):
            cache = {}
            session.attributes[CACHE_ATTR] = cache
        return cache

    def cached(self, session: SessionInfo, action: Action, room_id: str) -> bool | None:
        """The session's unexpired decision for (action, room), or None: never awaits."""
        entry = self._decisions(session).get((action, room_id))
        if entry is None or entry.expires <= self.clock():
            return None
        return entry.allowed

    async def check(self, session: SessionInfo, action: Action, room_id: str) -> AccessRequest | None:
        """None when ``session`` may do ``action`` on the room, else the refused request."""
        allowed = self.cached(session, action, room_id)
        request = AccessRequest(action, session.user, room_id)
        if allowed is None:
            self.queries += 1
            allowed = await self.policy.allows(request)
            self._decisions(session)[(action, room_id)] = _Entry(allowed, self.clock() + self.ttl_s)
        if allowed:
            return None
        _count_denied(action)
        return request

    async def ask(self, request: AccessRequest) -> bool:
        """An uncached question (REST calls, which carry their own identity each time)."""
        self.queries += 1
        allowed = await self.policy.allows(request)
        if not allowed:
            _count_denied(request.action)
        return allowed

    async def ask_many(self, requests: Sequence[AccessRequest]) -> list[bool]:
        self.queries += 1
        return await self.policy.allows_many(requests)

    def forget_room(self, sessions: Iterable[SessionInfo], room_id: str) -> None:
        """Drop every cached decision about ``room_id`` (its membership changed on this node)."""
        for session in sessions:
            cache = session.attributes.get(CACHE_ATTR)
            if isinstance(cache, dict):
                for action in Action:
                    cache.pop((action, room_id), None)

    async def recheck(self, subscribed: Sequence[tuple[SessionInfo, str]]) -> list[tuple[SessionInfo, str]]:
        """Re-ask, in one batch, SUBSCRIBE for the (session, room) pairs whose cached decision expired;
        returns the pairs now refused (their sessions should lose the room)."""
        stale = [(session, room) for session, room in subscribed
                 if self.cached(session, Action.SUBSCRIBE, room) is None]
        if not stale:
            return []
        # One question per distinct (user, room), however many sessions share it.
        distinct = sorted({(session.user or "", session.user is None, room) for session, room in stale})
        requests = [AccessRequest(Action.SUBSCRIBE, None if anonymous else user, room)
                    for user, anonymous, room in distinct]
        answers = dict(zip(distinct, await self.ask_many(requests), strict=True))
        expires = self.clock() + self.ttl_s
        refused = []
        for session, room in stale:
            allowed = answers[(session.user or "", session.user is None, room)]
            self._decisions(session)[(Action.SUBSCRIBE, room)] = _Entry(allowed, expires)
            if not allowed:
                refused.append((session, room))
        return refused


# --- REST identity ---------------------------------------------------------------------------------

class HttpRequest(Protocol):
    """What :func:`rest_user` reads of a Starlette request."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def cookies(self) -> Mapping[str, str]: ...


def user_name(found: object) -> str | None:
    """The user name an authenticator returned (a name, or an object with a ``name``, or None)."""
    if found is None or isinstance(found, str):
        return found
    name = getattr(found, "name", None)
    return name if isinstance(name, str) else None


class RestAuthError(Exception):
    """No valid credentials on a REST call (401)."""


def users_session_key(settings: Settings) -> bytes:
    """The HMAC key of ``auth=users`` session tokens, the same on every node of a fleet: derived from
    ``jwt_secret`` when it is set, and from the ``users`` setting (every login and passcode), so a
    changed passcode ends every session and nobody can mint a token without knowing all of them."""
    material = "\0".join(sorted(settings.users)).encode("utf-8")
    return hmac.new(settings.jwt_secret.encode("utf-8") or b"chat-gateway",
                    b"chat-gateway users session\0" + material, hashlib.sha256).digest()


def session_token(user: str, settings: Settings, *, ttl_s: int = SESSION_TTL_S, now: float | None = None) -> str:
    """The token put in the ``chat_session`` cookie after a good ``/chat/login``."""
    if settings.auth == "jwt":
        from gateway.jwt_auth import key_from_secret, mint_token
        return mint_token(user, key_from_secret(settings.jwt_secret), ttl_s=ttl_s, now=now)
    from gateway.jwt_auth import mint_token
    return mint_token(user, users_session_key(settings), ttl_s=ttl_s, now=now)


def token_user(token: str, settings: Settings) -> str:
    """The user a session token names; raises :class:`AuthenticationFailed`."""
    from gateway.jwt_auth import key_from_secret, user_from_token
    key = key_from_secret(settings.jwt_secret) if settings.auth == "jwt" else users_session_key(settings)
    return user_from_token(token, key)


def rest_user(request: HttpRequest, settings: Settings, users: Authenticator | None) -> str | None:
    """Who makes a REST call. ``anonymous``: the guest named by the ``chat_guest`` cookie, if any (never
    refused). ``users`` and ``jwt``: the ``chat_session`` cookie, or ``Authorization: Bearer <token>``
    (``users`` also takes ``Basic login:passcode``); raises :class:`RestAuthError` when none is valid."""
    if settings.auth == "anonymous":
        guest = request.cookies.get("chat_guest")
        return guest or None
    authorization = request.headers.get("authorization", "").strip()
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "basic" and settings.auth == "users" and users is not None:
        try:
            login, _, passcode = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            raise RestAuthError("invalid Authorization header") from None
        try:
            user = user_name(users(Frame("CONNECT", (("login", login), ("passcode", passcode)))))
        except AuthenticationFailed:
            raise RestAuthError("bad login or passcode") from None
        if user is None:
            raise RestAuthError("bad login or passcode")
        return user
    token = value if scheme.lower() == "bearer" and value else request.cookies.get(SESSION_COOKIE)
    if not token:
        raise RestAuthError("login required")
    try:
        return token_user(token, settings)
    except AuthenticationFailed as exc:
        raise RestAuthError(str(exc).removeprefix("Authentication failed: ")) from None

