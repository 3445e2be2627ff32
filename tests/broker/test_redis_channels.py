"""Channel naming shared with Spring servers: a mixed fleet on one redis-server.

A raw redis-py client plays the Spring server: it PUBLISHes ChatMessage JSON the way
``Jackson2JsonRedisSerializer`` does (per-room channel, or the single ``chatroom`` channel) and
subscribes to those channels to read what gateway nodes publish. Also unit tests of
:class:`SpringChannelMapper` and of Redis glob matching (checked against Redis's own matcher).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.broker.base import Publication
from gateway.broker.channels import (
    ROOM_ENVELOPE_MAGIC,
    RedisSubscription,
    SpringChannelMapper,
    glob_escape,
    glob_matches,
)
from gateway.broker.factory import create_broker
from gateway.broker.memory import MemoryBroker
from gateway.broker.redis import RedisBroker
from gateway.chat.payload import peek_seq
from gateway.settings import load_settings
from tests.broker.conftest import Bus, Node
from tests.support.redis_server import RedisServer

ROOM = "/sub/chat/room/"


def spring_json(room_id: str, text: str = "hi") -> bytes:
    """A ChatMessage exactly as Spring's Jackson writes it (declaration order, no spaces)."""
    return (f'{{"type":"TALK","roomId":"{room_id}","sender":"x","message":"{text}",'
            f'"userCount":0}}').encode()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def raw_subscriber(client: Redis, *channels: str) -> PubSub:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(*channels)
    return pubsub


async def next_message(pubsub: PubSub) -> tuple[str, bytes]:
    for _ in range(200):
        message = await pubsub.get_message(timeout=0.05)
        if message is not None and message["type"] == "message":
            return message["channel"].decode(), message["data"]
    raise AssertionError("no message on the raw subscriber within 10 s")


async def mixed_node(redis_server: RedisServer, mode: str, prefix: str) -> tuple[Bus, Node]:
    bus = Bus(f"redis-{mode}", redis_server)
    bus.prefix = prefix
    return bus, await bus.node()


PREFIXES = [pytest.param("", id="no-prefix"), pytest.param("chat:", id="prefix")]


# --- Spring -> gateway ---------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("prefix", PREFIXES)
async def test_spring_room_channel_reaches_the_room(redis_server: RedisServer, raw: Redis, prefix: str) -> None:
    bus, node = await mixed_node(redis_server, "room", prefix)
    try:
        room_id = str(uuid.uuid4())
        await node.broker.subscribe(ROOM + room_id)
        body = spring_json(room_id, "안녕")
        assert await raw.publish(prefix + room_id, body) == 1
        await node.wait_received(1)
        assert node.received == [Publication(ROOM + room_id, body, "application/json", (), "")]
    finally:
        await bus.close()


@pytest.mark.redis
@pytest.mark.parametrize("prefix", PREFIXES)
async def test_spring_single_channel_reaches_the_room_named_in_the_json(
        redis_server: RedisServer, raw: Redis, prefix: str) -> None:
    bus, node = await mixed_node(redis_server, "single", prefix + uuid.uuid4().hex[:6] + ":")
    channel = bus.prefix + "chatroom"
    try:
        mine, other = str(uuid.uuid4()), str(uuid.uuid4())
        await node.broker.subscribe(ROOM + mine)
        await raw.publish(channel, spring_json(other, "not for us"))
        await raw.publish(channel, b"{broken json")
        await raw.publish(channel, b'{"type":"TALK","message":"no room"}')
        await raw.publish(channel, spring_json(mine, "for us"))
        await node.wait_received(1)
        await bus.settle(node)
        assert node.received == [Publication(ROOM + mine, spring_json(mine, "for us"), "application/json")]
        broker = node.broker
        assert isinstance(broker, RedisBroker)
        assert broker.undecodable == 2
    finally:
        await bus.close()


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["room", "single"])
async def test_room_pattern_receives_spring_publications(redis_server: RedisServer, raw: Redis, mode: str) -> None:
    bus, node = await mixed_node(redis_server, mode, f"p{uuid.uuid4().hex[:6]}:")
    try:
        await node.broker.subscribe(ROOM + "*")
        rooms = [str(uuid.uuid4()) for _ in range(3)]
        for room_id in rooms:
            channel = bus.prefix + (room_id if mode == "room" else "chatroom")
            await raw.publish(channel, spring_json(room_id))
        await node.wait_received(3)
        await bus.settle(node)
        assert [(p.destination, p.body) for p in node.received] == [
            (ROOM + room_id, spring_json(room_id)) for room_id in rooms]
    finally:
        await bus.close()


# --- gateway -> Spring ---------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("mode", ["room", "single"])
async def test_gateway_room_publications_are_plain_chat_json_on_spring_channels(
        redis_server: RedisServer, raw: Redis, mode: str, prefix: str) -> None:
    if mode == "single":
        prefix += uuid.uuid4().hex[:6] + ":"  # the single channel is shared by every room
    bus, node = await mixed_node(redis_server, mode, prefix)
    room_id = str(uuid.uuid4())
    channel = prefix + (room_id if mode == "room" else "chatroom")
    pubsub = await raw_subscriber(raw, channel)
    try:
        gateway_body = json.dumps({"type": "ENTER", "roomId": room_id, "sender": "[알림]",
                                   "message": "x님이 방에 입장했습니다.", "userCount": 1, "seq": 5},
                                  ensure_ascii=False).encode()
        # a publication Spring could not read travels elsewhere, so it never reaches Spring's channel
        await node.broker.publish(Publication(ROOM + room_id, spring_json(room_id), "application/json",
                                              (("x-extra", "1"),)))
        await node.broker.publish(Publication(ROOM + room_id, gateway_body))
        assert await next_message(pubsub) == (channel, gateway_body)
        json.loads(gateway_body)  # what Jackson reads: a JSON object with the ChatMessage fields
    finally:
        await pubsub.aclose()
        await bus.close()


@pytest.mark.redis
async def test_generic_destinations_use_a_gateway_envelope_channel(redis_server: RedisServer, raw: Redis) -> None:
    bus, node = await mixed_node(redis_server, "room", f"g{uuid.uuid4().hex[:6]}:")
    channel = bus.prefix + "gateway:dest:/sub/other/x"
    pubsub = await raw_subscriber(raw, channel)
    try:
        await node.broker.publish(Publication("/sub/other/x", b"\xff\x00", None, (("k", "v"),)))
        await node.broker.publish(Publication("/sub/other/x", "ü".encode(), "text/plain"))
        got_channel, first = await next_message(pubsub)
        _, second = await next_message(pubsub)
        assert got_channel == channel
        assert json.loads(first) == {"v": 1, "destination": "/sub/other/x", "content_type": None,
                                     "headers": [["k", "v"]], "origin": "n0", "body_base64": "/wA="}
        assert json.loads(second) == {"v": 1, "destination": "/sub/other/x", "content_type": "text/plain",
                                      "headers": [], "origin": "n0", "body": "ü"}
    finally:
        await pubsub.aclose()
        await bus.close()


@pytest.mark.redis
async def test_gateway_and_spring_share_a_room(redis_server: RedisServer, raw: Redis) -> None:
    """Both directions on one room: Spring's and the gateway's messages interleave in one stream."""
    bus, node = await mixed_node(redis_server, "room", f"m{uuid.uuid4().hex[:6]}:")
    room_id = str(uuid.uuid4())
    pubsub = await raw_subscriber(raw, bus.prefix + room_id)
    try:
        await node.broker.subscribe(ROOM + room_id)
        await raw.publish(bus.prefix + room_id, spring_json(room_id, "from spring"))
        await node.broker.publish(Publication(ROOM + room_id, spring_json(room_id, "from gateway")))
        await node.wait_received(2)
        assert node.bodies() == [spring_json(room_id, "from spring"), spring_json(room_id, "from gateway")]
        assert [(await next_message(pubsub))[1] for _ in range(2)] == node.bodies()
    finally:
        await pubsub.aclose()
        await bus.close()


# --- settings -> broker ----------------------------------------------------------------------------


def test_create_broker_from_settings() -> None:
    memory = create_broker(load_settings({}, node_id="solo"))
    assert isinstance(memory, MemoryBroker)
    settings = load_settings({"GATEWAY_REDIS_URL": "redis://127.0.0.1:1/2",
                              "GATEWAY_REDIS_CHANNEL_MODE": "single",
                              "GATEWAY_REDIS_CHANNEL_PREFIX": "spring:",
                              "GATEWAY_REDIS_SINGLE_CHANNEL": "rooms",
                              "GATEWAY_REDIS_TIMEOUT_S": "1.5",
                              "GATEWAY_REDIS_POOL_SIZE": "3"}, node_id="node-a")
    broker = create_broker(settings, room_reader=peek_seq)
    assert isinstance(broker, RedisBroker)
    assert (broker.node_id, broker.timeout_s, broker.pool_size, broker.reconnect_max_s) == ("node-a", 1.5, 3, 30.0)
    mapper = broker.mapper
    assert isinstance(mapper, SpringChannelMapper)
    assert (mapper.mode, mapper.prefix, mapper.single_channel, mapper.room_prefix) == (
        "single", "spring:", "rooms", "/sub/chat/room/")
    assert mapper.encode(Publication(ROOM + "r1", spring_json("r1"))) == ("spring:rooms", spring_json("r1"))


# --- the mapper alone ----------------------------------------------------------------------------


def sub(name: str) -> RedisSubscription:
    return RedisSubscription(False, name)


def psub(name: str) -> RedisSubscription:
    return RedisSubscription(True, name)


def test_exact_destinations_map_to_channels() -> None:
    room = SpringChannelMapper(prefix="p:")
    single = SpringChannelMapper(mode="single", prefix="p:", room_reader=peek_seq)
    assert room.subscriptions(ROOM + "r1") == {sub("p:r1"), sub("p:gateway:dest:/sub/chat/room/r1")}
    assert single.subscriptions(ROOM + "r1") == {sub("p:chatroom"), sub("p:gateway:dest:/sub/chat/room/r1")}
    assert room.subscriptions("/sub/other/x") == {sub("p:gateway:dest:/sub/other/x")}


@pytest.mark.parametrize("destination", [ROOM, ROOM + "a/b", ROOM + "gateway:x", "/sub/chat/roomX", "/sub/x"])
def test_non_room_destinations(destination: str) -> None:
    mapper = SpringChannelMapper()
    assert mapper.room_id(destination) is None
    assert mapper.subscriptions(destination) == {sub("gateway:dest:" + destination)}
    assert mapper.encode(Publication(destination, b"{}"))[0] == "gateway:dest:" + destination


def test_patterns_map_to_psubscribe_or_the_single_channel() -> None:
    room = SpringChannelMapper(prefix="p:")
    single = SpringChannelMapper(mode="single", prefix="p:", room_reader=peek_seq)
    envelope_all = psub("p:gateway:dest:/sub*")
    assert room.subscriptions("/sub/chat/room/*") == {psub("p:*"), psub("p:gateway:dest:/sub/chat/room/*")}
    assert room.subscriptions("/sub/chat/room/ab*") == {psub("p:ab*"), psub("p:gateway:dest:/sub/chat/room/ab*")}
    assert room.subscriptions("/sub/**") == {psub("p:*"), envelope_all}
    assert room.subscriptions("/sub/chat/room/r1/**") == {psub("p:r1*"),
                                                         psub("p:gateway:dest:/sub/chat/room/r1*")}
    assert room.subscriptions("/sub/chat/room/a/*") == {psub("p:gateway:dest:/sub/chat/room/a/*")}
    assert room.subscriptions("/sub/other/*") == {psub("p:gateway:dest:/sub/other/*")}
    assert single.subscriptions("/sub/**") == {sub("p:chatroom"), envelope_all}
    assert single.subscriptions("/sub/chat/room/{id}") == {sub("p:chatroom"),
                                                          psub("p:gateway:dest:/sub/chat/room/*")}


def test_glob_special_characters_in_names_are_escaped() -> None:
    mapper = SpringChannelMapper(prefix="a*b?[c]\\:")
    (pattern,) = [s.name for s in mapper.subscriptions("/sub/chat/room/*") if not s.name.endswith("room/*")]
    assert pattern == "a\\*b\\?\\[c\\]\\\\:*"
    assert glob_matches(pattern, "a*b?[c]\\:room-1")
    assert not glob_matches(pattern, "axxb?[c]\\:room-1")


def test_decode_rejects_what_is_not_ours() -> None:
    room = SpringChannelMapper(prefix="p:")
    single = SpringChannelMapper(mode="single", prefix="p:", room_reader=peek_seq)
    assert room.decode("other:r1", b"{}") is None
    assert room.decode("p:a/b", b"{}") is None
    assert room.decode("p:gateway:other", b"{}") is None
    assert room.decode("p:", b"{}") is None
    assert single.decode("p:r1", spring_json("r1")) is None
    assert single.decode("p:chatroom", b'{"roomId": 5}') is None
    assert single.decode("p:chatroom", b'["roomId"]') is None
    assert single.decode("p:chatroom", spring_json("a/b")) is None
    envelope = b'{"v":1,"destination":"/sub/x","content_type":null,"headers":[],"body":"b"}'
    assert room.decode("p:gateway:dest:/sub/x", envelope) == Publication("/sub/x", b"b", None)
    assert room.decode("p:gateway:dest:/sub/y", envelope) is None
    for bad in (b'{"v":2,"destination":"/sub/x","body":"b"}', b'{"v":1,"destination":"/sub/x"}',
                b'{"v":1,"destination":"/sub/x","headers":[["a"]],"body":""}',
                b'{"v":1,"destination":"/sub/x","body_base64":"***"}', b"\xff"):
        assert room.decode("p:gateway:dest:/sub/x", bad) is None, bad


def test_invalid_mapper_options() -> None:
    with pytest.raises(ValueError):
        SpringChannelMapper(mode="both")
    with pytest.raises(ValueError):
        SpringChannelMapper(mode="single", single_channel="")


segment = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/*?{"), min_size=1, max_size=8)
destinations = st.one_of(
    st.builds(lambda s: ROOM + s, segment),
    st.builds(lambda parts: "/sub/" + "/".join(parts), st.lists(segment, min_size=1, max_size=4)),
)
publications = st.builds(
    Publication, destinations, st.binary(max_size=64),
    st.one_of(st.none(), st.just("application/json"), st.just("text/plain")),
    st.lists(st.tuples(segment, st.text(max_size=8)), max_size=3).map(tuple),
    st.just("origin-node"), st.one_of(st.none(), st.integers(min_value=1, max_value=2**53)))


@given(publications, st.sampled_from(["room", "single"]), st.sampled_from(["", "p:", "*x["]),
       st.sampled_from(["spring", "envelope"]))
def test_encode_then_decode_round_trips(publication: Publication, mode: str, prefix: str, payload_form: str) -> None:
    mapper = SpringChannelMapper(mode=mode, prefix=prefix, payload=payload_form, room_reader=peek_seq)
    channel, payload = mapper.encode(publication)
    decoded = mapper.decode(channel, payload)
    assert decoded is not None
    bare = not channel.startswith(prefix + "gateway:dest:") and not payload.startswith(ROOM_ENVELOPE_MAGIC)
    # A bare (Spring-form) payload carries no origin, and its seq only inside the body.
    expected = (Publication(publication.destination, publication.body, publication.content_type,
                            publication.headers, "", peek_seq(publication.body)[1]) if bare else publication)
    assert decoded == expected
    # the channel is one the destination subscribes to
    assert any(s.name == channel for s in mapper.subscriptions(publication.destination))


@pytest.mark.redis
async def test_glob_matching_agrees_with_redis(private_redis: RedisServer) -> None:
    """Redis's KEYS uses the same matcher as PSUBSCRIBE: compare ours with it on real names."""
    names = ["p:r1", "p:r2", "p:", "p:gateway:dest:/sub/a", "p:gateway:dest:/sub/a/b", "q:r1",
             "a*b?[c]\\:x", "a*b?[c]\\:", "ab", "p:é", "p:日本", "pp:r1", "p:r1/x", "x[y]"]
    client = Redis.from_url(private_redis.url)
    try:
        for name in names:
            await client.set(name, b"1")
        globs = ["p:*", "*", glob_escape("a*b?[c]\\:") + "*", "p:gateway:dest:/sub*", "p:r?",
                 "p:[rq]1", "p:[^r]*", "x\\[y\\]", "p:?", glob_escape("p:r1/") + "*", "p:[a-z]*"]
        for glob in globs:
            by_redis = sorted(k.decode() for k in await client.keys(glob))
            ours = sorted(n for n in names if glob_matches(glob, n))
            if glob == "p:?":
                by_redis = [n for n in by_redis if len(n.encode()) == len(n)]  # Redis' ? is one byte
                ours = [n for n in ours if len(n.encode()) == len(n)]
            assert ours == by_redis, glob
    finally:
        await client.aclose()

