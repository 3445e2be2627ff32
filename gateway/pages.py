"""The chat pages and the little HTTP API they need beyond the chat domain's REST routes.

Owns these routes (mounted by :func:`pages_component`):

| method | path | answer |
|---|---|---|
| GET  | ``/`` | 302 to ``/chat/room`` |
| GET  | ``/chat/room`` | the room list page (``static/rooms.html``) |
| GET  | ``/chat/room/enter/{roomId}`` | the room page (``static/room.html``) |
| GET  | ``/chat/user`` | LoginInfo ``{"name","token"}`` plus ``"auth"`` (the page's login mode), or 401 |
| POST | ``/chat/login`` | ``login``/``passcode`` form checked against the ``users`` setting -> LoginInfo |
| POST | ``/chat/logout`` | forgets the login cookie |
| GET  | ``/static/vendor/{file}`` | the browser libraries, straight from npm's ``node_modules`` |
| GET  | ``/static/...`` | the files of ``static/`` (JS, CSS) |

Where the files come from: the pages and ``/static/...`` from the ``static_dir`` setting, by default
the ``static/`` shipped with the gateway (package data of an installed wheel, the repository's
``static/`` in a checkout; see :func:`gateway.resource_dir`). The browser libraries from the
``node_modules_dir`` setting, by default the checkout's ``node_modules`` (``make node-deps``); an
installed wheel has no default: point ``node_modules_dir`` at the directory where ``npm ci`` installed
the repository's package.json / package-lock.json.

Login rules per ``auth`` setting (tokens are never minted for someone who did not log in):

- ``anonymous``: ``/chat/user`` names a guest (``guest-xxxxxxxx``), kept stable per browser by the
  ``chat_guest`` cookie; the token is empty. The page sends the name as the CONNECT ``login``.
- ``users``: ``/chat/user`` answers 401; the page asks login/passcode, may check them with
  ``/chat/login`` (answers LoginInfo with an empty token and sets the HttpOnly ``chat_session``
  cookie the REST routes need, see gateway.authz) and sends them in CONNECT.
- ``jwt``: ``/chat/login`` checks login/passcode against ``users`` and answers LoginInfo with a token
  from :func:`gateway.jwt_auth.mint_token`; the same token goes into the HttpOnly ``chat_session``
  cookie, so a later ``/chat/user`` (any node: they share ``jwt_secret``) verifies it and answers a
  fresh token. Without the cookie ``/chat/user`` answers 401 and the page shows its login form.

POSTs from another site are refused (Origin check, same rule as the WebSocket endpoint). Pages carry
a strict Content-Security-Policy (scripts only from this origin, no inline script).

Must not import the transport layer, the STOMP session internals or the chat domain.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import resource_dir, source_root
from gateway.auth import users_authenticator
from gateway.authz import session_token, user_name
from gateway.settings import Settings
from gateway.stomp.frames import Frame
from gateway.stomp.session import AuthenticationFailed
from gateway.transport.origin import origin_allowed

if TYPE_CHECKING:
    from gateway.host import Host

log = logging.getLogger(__name__)

GUEST_COOKIE = "chat_guest"
SESSION_COOKIE = "chat_session"
GUEST_MAX_AGE_S = 365 * 24 * 3600
TOKEN_TTL_S = 3600  # the reference's jjwt tokens live one hour
_GUEST_NAME = re.compile(r"guest-[0-9a-f]{8}")
MAX_LOGIN_CHARS = 100

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'self'")
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class VendorFile:
    """One browser library file served from node_modules."""

    package: str        # npm package name, as in package.json
    path: str           # the file inside the package


#: ``/static/vendor/<key>`` -> the file in node_modules. Versions are pinned in package.json.
VENDOR_FILES: dict[str, VendorFile] = {
    "stompjs/stomp.umd.min.js": VendorFile("@stomp/stompjs", "bundles/stomp.umd.min.js"),
    "sockjs-client/sockjs.min.js": VendorFile("sockjs-client", "dist/sockjs.min.js"),
}


def static_dir(settings: Settings) -> Path:
    """The chat pages: the ``static_dir`` setting, else the ``static/`` shipped with the gateway."""
    return Path(settings.static_dir) if settings.static_dir else resource_dir("static")


def node_modules_dir(settings: Settings) -> Path | None:
    """npm's node_modules: the setting, else the checkout's; None for an installed wheel without the setting."""
    if settings.node_modules_dir:
        return Path(settings.node_modules_dir)
    root = source_root()
    return root / "node_modules" if root is not None else None


#: Where the browser libraries come from when node_modules_dir is unset and there is no checkout.
NODE_MODULES_UNSET = ("the node_modules_dir setting (GATEWAY_NODE_MODULES_DIR) is not set; point it at the "
                      "node_modules of `npm ci` run with the repository's package.json and package-lock.json")


def installed_version(modules: Path, package: str) -> str | None:
    """The version npm installed for ``package`` (its package.json), or None when it is missing."""
    try:
        data = json.loads((modules / package / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def pinned_versions(package_json: Path | None = None) -> dict[str, str]:
    """The repository's pinned npm dependencies (``package.json``), or {} when it is unreadable (or
    there is no checkout: an installed wheel does not carry package.json)."""
    if package_json is None:
        root = source_root()
        if root is None:
            return {}
        package_json = root / "package.json"
    try:
        data = json.loads(package_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    deps = data.get("dependencies") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in deps.items()} if isinstance(deps, dict) else {}


def check_vendor(settings: Settings) -> list[str]:
    """Problems with the browser libraries (missing, or not the pinned version); logged at start."""
    modules = node_modules_dir(settings)
    if modules is None:
        return [f"/static/vendor/*: {NODE_MODULES_UNSET}"]
    pins = pinned_versions()
    problems = []
    for key, vendor in VENDOR_FILES.items():
        if not (modules / vendor.package / vendor.path).is_file():
            problems.append(f"/static/vendor/{key}: {vendor.package} is not installed in {modules} "
                            "(run `make node-deps`)")
            continue
        version, pin = installed_version(modules, vendor.package), pins.get(vendor.package)
        if pin is not None and version != pin:
            problems.append(f"{vendor.package} {version} is installed but package.json pins {pin}")
    return problems


# --- login ---------------------------------------------------------------------------------------

def login_info(name: str, token: str, auth: str) -> dict[str, str]:
    """Spring's LoginInfo (``name``, ``token``) with the added ``auth`` field telling the page the mode."""
    return {"name": name, "token": token, "auth": auth}


def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


def _error(message: str, status: int, auth: str) -> Response:
    return _no_store(JSONResponse({"error": message, "auth": auth}, status_code=status))


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


class Pages:
    """The handlers; one per node, built from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.static = static_dir(settings)
        self.modules = node_modules_dir(settings)
        self._check_users = users_authenticator(settings.users) if settings.users else None
        self._jwt_key: bytes | None = None
        if settings.auth == "jwt":
            from gateway.jwt_auth import key_from_secret
            self._jwt_key = key_from_secret(settings.jwt_secret)

    # pages

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/chat/room", status_code=302)

    def _page(self, name: str) -> Response:
        path = self.static / name
        if not path.is_file():
            return Response(f"page {name} is missing from {self.static}\n", status_code=500,
                            media_type="text/plain")
        return FileResponse(path, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def room_list(self, request: Request) -> Response:
        return self._page("rooms.html")

    async def room(self, request: Request) -> Response:
        return self._page("room.html")

    async def vendor(self, request: Request) -> Response:
        vendor = VENDOR_FILES.get(request.path_params["file"])
        if vendor is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        if self.modules is None:
            return Response(f"{vendor.package} is not installed: {NODE_MODULES_UNSET}\n", status_code=404,
                            media_type="text/plain")
        path = self.modules / vendor.package / vendor.path
        if not path.is_file():
            return Response(f"{vendor.package} is not installed (run `make node-deps`)\n", status_code=404,
                            media_type="text/plain")
        return FileResponse(path, media_type="application/javascript; charset=utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    # login

    def _same_site(self, request: Request) -> bool:
        return origin_allowed(request.headers.get("origin"), request.headers.get("host"),
                              self.settings.allowed_origins)

    def _check(self, login: str, passcode: str) -> str | None:
        if self._check_users is None:
            return None
        try:
            return user_name(self._check_users(Frame("CONNECT", (("login", login), ("passcode", passcode)))))
        except AuthenticationFailed:
            return None

    async def user(self, request: Request) -> Response:
        auth = self.settings.auth
        if auth == "anonymous":
            name = request.cookies.get(GUEST_COOKIE, "")
            fresh = _GUEST_NAME.fullmatch(name) is None
            if fresh:
                name = f"guest-{secrets.token_hex(4)}"
            response = _no_store(JSONResponse(login_info(name, "", auth)))
            if fresh:
                response.set_cookie(GUEST_COOKIE, name, max_age=GUEST_MAX_AGE_S, path="/", httponly=True,
                                    samesite="lax", secure=_secure(request))
            return response
        if auth == "jwt" and self._jwt_key is not None:
            from gateway.jwt_auth import mint_token, user_from_token
            cookie = request.cookies.get(SESSION_COOKIE)
            if cookie:
                try:
                    name = user_from_token(cookie, self._jwt_key)
                except AuthenticationFailed:
                    pass
                else:
                    token = mint_token(name, self._jwt_key, ttl_s=TOKEN_TTL_S)
                    response = _no_store(JSONResponse(login_info(name, token, auth)))
                    self._set_session(request, response, token)
                    return response
        return _error("login required", 401, auth)

    def _set_session(self, request: Request, response: Response, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, max_age=TOKEN_TTL_S, path="/chat", httponly=True,
                            samesite="strict", secure=_secure(request))

    async def login(self, request: Request) -> Response:
        auth = self.settings.auth
        if not self._same_site(request):
            return _error("cross-site login refused", 403, auth)
        if auth == "anonymous":
            return _error("this server runs without login (auth=anonymous)", 400, auth)
        if self._check_users is None:
            return _error("no login is configured on this server (the users setting is empty)", 403, auth)
        form = await request.form()
        login, passcode = form.get("login"), form.get("passcode")
        if not isinstance(login, str) or not isinstance(passcode, str) or not login:
            return _error("'login' and 'passcode' are required", 400, auth)
        if len(login) > MAX_LOGIN_CHARS or len(passcode) > MAX_LOGIN_CHARS:
            return _error("bad login or passcode", 401, auth)
        name = self._check(login, passcode)
        if name is None:
            return _error("bad login or passcode", 401, auth)
        if auth == "jwt" and self._jwt_key is not None:
            from gateway.jwt_auth import mint_token
            token = mint_token(name, self._jwt_key, ttl_s=TOKEN_TTL_S)
            response = _no_store(JSONResponse(login_info(name, token, auth)))
            self._set_session(request, response, token)
            return response
        # users: no token for CONNECT (the page sends login/passcode), but the REST calls need the
        # session cookie (gateway.authz.rest_user), signed with the users-mode session key.
        response = _no_store(JSONResponse(login_info(name, "", auth)))
        self._set_session(request, response, session_token(name, self.settings, ttl_s=TOKEN_TTL_S))
        return response

    async def logout(self, request: Request) -> Response:
        if not self._same_site(request):
            return _error("cross-site logout refused", 403, self.settings.auth)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/chat")
        return response

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/chat/room", self.room_list, methods=["GET"]),
            Route("/chat/room/enter/{room_id}", self.room, methods=["GET"]),
            Route("/chat/user", self.user, methods=["GET"]),
            Route("/chat/login", self.login, methods=["POST"]),
            Route("/chat/logout", self.logout, methods=["POST"]),
            Route("/static/vendor/{file:path}", self.vendor, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=self.static, check_dir=False), name="static"),
        ]


def pages_component(host: Host) -> Sequence[BaseRoute]:
    """The pages' routes for the default app (gateway.app.create_app)."""
    for problem in check_vendor(host.settings):
        log.warning("chat page: %s", problem)
    return Pages(host.settings).routes()

