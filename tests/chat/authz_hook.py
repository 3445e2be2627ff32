"""An ``authz_policy`` hook for the authorization tests (``tests.chat.authz_hook:decide``).

``mute`` may do everything but SEND; ``admin`` may also subscribe with wildcards; everyone else may
do what the ``open`` policy allows. Every request is recorded in :data:`ASKED` (same process only).
"""

from __future__ import annotations

from gateway.authz import AccessRequest, Action

ASKED: list[AccessRequest] = []


async def decide(request: AccessRequest) -> bool:
    ASKED.append(request)
    if request.wildcard:
        return request.user == "admin"
    return not (request.user == "mute" and request.action is Action.SEND)
