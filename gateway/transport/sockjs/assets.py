"""Static SockJS assets: the ``iframe.html`` page and the sockjs-client script it loads.

Owns: the iframe page's text (pointing at our own copy of sockjs-client, never a CDN), finding
``sockjs-client/dist/sockjs.min.js`` in node_modules, and their ETags.

Must not import Starlette, asyncio or the STOMP layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import Settings

SCRIPT_PATH = "/sockjs.min.js"          # served under the SockJS prefix
_REPO_ROOT = Path(__file__).resolve().parents[3]

_IFRAME_PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
  <script src="{script_url}"></script>
  <script>
    document.domain = document.domain;
    SockJS.bootstrap_iframe();
  </script>
</head>
<body>
  <h2>Don't panic!</h2>
  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>
</body>
</html>"""


def etag_of(body: bytes) -> str:
    """A strong ETag for ``body`` (quoted, as HTTP wants it)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    etag: str


def iframe_page(script_url: str) -> Asset:
    """The iframe page loading sockjs-client from ``script_url`` (an absolute path on this server)."""
    if any(ch in script_url for ch in '"<>\n\r'):
        raise ValueError("unsafe script url")
    body = _IFRAME_PAGE.format(script_url=script_url).encode()
    return Asset(body, etag_of(body))


def sockjs_script_file(settings: Settings) -> Path:
    """Where sockjs-client's minified browser build lives (settings.node_modules_dir or the repo's)."""
    base = Path(settings.node_modules_dir) if settings.node_modules_dir else _REPO_ROOT / "node_modules"
    return base / "sockjs-client" / "dist" / "sockjs.min.js"


def load_sockjs_script(settings: Settings) -> Asset | None:
    """The script's bytes and ETag, or None when node_modules has no sockjs-client."""
    try:
        body = sockjs_script_file(settings).read_bytes()
    except OSError:
        return None
    return Asset(body, etag_of(body))
