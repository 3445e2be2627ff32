"""Loopback networking for the process launchers: free ports and plain HTTP requests.

Owns :func:`free_port` (the one way the suite, the benchmarks and ``deploy/local_cluster.py`` pick a
port for a child process), :func:`port_is_free`, and :func:`http_request` (GET or POST without any
``*_proxy`` variable in the way, error statuses returned rather than raised).

Only 127.0.0.1 by default. Imports nothing from the gateway.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (bind port 0 and ask the kernel). Another process may
    take it before the caller binds it: launchers retry on a new port when a child fails to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether ``port`` can be bound on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def http_request(url: str, data: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET (or POST form ``data``) ``url`` directly, ignoring *_proxy variables; (status, body).
    HTTP error statuses are returned, not raised; connection errors raise (OSError, URLError)."""
    try:
        with _OPENER.open(url, data=data, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
