"""Builds the node's broker from settings (memory without redis_url, Redis with it)."""

from __future__ import annotations

from gateway.broker.base import Broker
from gateway.broker.memory import MemoryBroker
from gateway.settings import Settings


def create_broker(settings: Settings) -> Broker:
    if settings.redis_url is None:
        return MemoryBroker(settings.node_id)
    from gateway.broker.redis import create_redis_broker  # provided by the Redis broker module
    return create_redis_broker(settings)
