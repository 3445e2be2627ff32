"""Origin policy for WebSocket and SockJS sessions (cross-site WebSocket hijacking defence).

Owns: :func:`origin_allowed`. Shared by every transport so the rule lives in one place.
Must not import Starlette or anything outside the standard library.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Decide whether a browser at ``origin`` may open a session on the server reached as ``host``.

    - no ``Origin`` header (non-browser clients: stomp-py, Node) -> allowed;
    - ``allowed`` contains ``*`` -> allowed;
    - ``origin`` equals an entry of ``allowed`` (scheme://host[:port], case-insensitive) -> allowed;
    - ``allowed`` empty -> same origin only: the origin's host[:port] equals the ``Host`` header.
    """
    if origin is None or origin == "":
        return True
    if "*" in allowed:
        return True
    normalized = origin.rstrip("/").lower()
    if any(normalized == entry.rstrip("/").lower() for entry in allowed):
        return True
    if allowed:
        return False
    if origin == "null" or host is None:
        return False
    netloc = urlsplit(normalized).netloc
    return netloc == host.lower()
