"""What a component sees of the node it is added to: :class:`Host`.

Owns the contract between the node (:class:`gateway.node.Gateway`, which implements it) and the
components it assembles (the chat domain, the pages, a test's echo handler). A component registers
its handlers on ``router``, its session listener on ``hub.listeners``, its ordering stages on
``receive_stages`` (composed in order by :func:`gateway.receive.compose`), its start and stop steps
and its readiness checks; it never reaches into the node for anything else.

Must not import Starlette, the transport layer, the chat domain or the app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.hub import Hub, MessageRouter
from gateway.receive import Stage
from gateway.settings import Settings

Step = Callable[[], Awaitable[None]]
"""A start or stop step: starts run in the order added, stops in the reverse order."""
HealthCheck = Callable[[], Awaitable[bool]]
"""A dependency's readiness for /readyz: answers within its own timeout and never raises."""


class Host(Protocol):
    """The parts of a node a component may use."""

    @property
    def settings(self) -> Settings: ...

    @property
    def hub(self) -> Hub: ...

    @property
    def router(self) -> MessageRouter: ...

    @property
    def receive_stages(self) -> list[Stage]: ...

    @property
    def startup(self) -> list[Step]: ...

    @property
    def shutdown(self) -> list[Step]: ...

    @property
    def health_checks(self) -> dict[str, HealthCheck]: ...
