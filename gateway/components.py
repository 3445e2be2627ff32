"""The list of optional layers mounted by the default app (SockJS, chat domain, pages).

Owns: the order in which layers are wired. Each entry is a callable taking the Gateway and
returning its routes; a layer registers its handlers, hooks and startup/shutdown steps on the
Gateway as it is wired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from gateway.app import Gateway


def discover() -> list[Callable[[Gateway], Sequence[BaseRoute]]]:
    from gateway.chat.component import chat_component

    components: list[Callable[[Gateway], Sequence[BaseRoute]]] = [chat_component]
    from gateway.pages import pages_component
    components.append(pages_component)
    return components
