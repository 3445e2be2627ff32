"""Builds the node's broker from settings.

Owns: the choice of broker. Without ``redis_url`` the node runs the in-memory broker (one node);
with it, a :class:`~gateway.broker.redis.RedisBroker` named after ``node_id`` on the deployment the
URL names (one server, Sentinel or Redis Cluster: :mod:`gateway.broker.redis_urls`), whose channel
naming (:class:`~gateway.broker.channels.SpringChannelMapper`) follows ``redis_channel_mode``,
``redis_channel_prefix``, ``redis_single_channel``, ``chat_room_prefix`` and ``redis_sharded_pubsub``.

Must not import Starlette, the transport layer or the chat domain.
"""

from __future__ import annotations

from gateway.broker.base import Broker, RoomPayloadReader
from gateway.broker.memory import MemoryBroker
from gateway.settings import Settings


def create_broker(settings: Settings, room_reader: RoomPayloadReader | None = None) -> Broker:
    """MemoryBroker when ``settings.redis_url`` is None, else a RedisBroker (not yet started).

    ``room_reader`` reads ``(roomId, seq)`` from bare (Spring-form) room payloads received from Redis.
    """
    if settings.redis_url is None:
        return MemoryBroker(settings.node_id)
    from gateway.broker.redis import RedisBroker  # keeps redis-py out of single-node imports

    return RedisBroker.from_settings(settings, room_reader)
