"""SockJS 0.3.3 server transport: carries opaque STOMP bytes between SockJS clients and Connections.

Public API:

- :func:`create_sockjs_routes` (``routes.py``): Starlette routes to mount at ``/ws-stomp``; the list
  carries ``.registry``.
- :class:`SessionRegistry` (``registry.py``): the process's sessions; ``await close_all(code, reason)``
  closes every one of them (default ``c[3000,"Go away!"]``) and refuses new ones, for draining.
- :func:`greeting`: the ``Welcome to SockJS!`` ASGI endpoint, for ``Route("/ws-stomp", greeting)``.

Modules: ``protocol`` (sans-I/O framing), ``session`` (session state machine), ``registry``,
``http_transports`` and ``websocket`` (I/O per transport), ``headers`` (CORS/caching), ``assets``
(iframe page, sockjs-client script), ``routes`` (dispatch). Nothing here imports the STOMP layer.
"""

from gateway.transport.sockjs.registry import RegistryClosing, SessionRegistry
from gateway.transport.sockjs.routes import SockJSRoutes, create_sockjs_routes, greeting
from gateway.transport.sockjs.session import SockJSSession

__all__ = ["RegistryClosing", "SessionRegistry", "SockJSRoutes", "SockJSSession", "create_sockjs_routes",
           "greeting"]
