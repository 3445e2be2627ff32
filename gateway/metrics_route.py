"""``GET /metrics``: the Prometheus text exposition of :mod:`gateway.metrics`.

Owns: :func:`metrics_routes`, the Starlette route that serves :func:`gateway.metrics.exposition`
(``CONTENT_TYPE_LATEST``). Collecting reads files in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
``--workers N``), so it runs in a worker thread, never on the event loop. Whichever worker uvicorn
hands the scrape to answers for all of them.

Must not import the transport layer, the chat domain or the pages (a sibling of them in the layers).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.metrics import exposition

METRICS_PATH = "/metrics"


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = await run_in_threadpool(exposition)
    return Response(body, media_type=content_type)


def metrics_routes() -> list[BaseRoute]:
    """The ``/metrics`` route (GET and HEAD)."""
    return [Route(METRICS_PATH, metrics_endpoint, methods=["GET"])]
