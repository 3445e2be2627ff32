"""redis_url forms: one server, Sentinel and Cluster (parsing only; the deployments are tested elsewhere)."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import SSLConnection

from gateway.broker.redis_urls import RedisUrlError, parse_redis_url, redact
from gateway.settings import SettingsError, load_settings


def test_single_server_urls_are_redis_pys() -> None:
    target = parse_redis_url("redis://:pw@example:6380/2")
    assert target.kind == "single"
    assert (target.options["host"], target.options["port"], target.options["db"]) == ("example", 6380, 2)
    assert target.options["password"] == "pw"
    assert parse_redis_url("unix:///run/redis.sock?db=1").options["path"] == "/run/redis.sock"


def test_sentinel_url_names_sentinels_service_and_db() -> None:
    target = parse_redis_url("redis+sentinel://user:pw@s1:26380,s2,[::1]:26381/mymaster/3"
                             "?sentinel_password=spw&socket_keepalive=true")
    assert target.kind == "sentinel"
    assert target.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert target.service == "mymaster"
    assert target.options["db"] == 3
    assert (target.options["username"], target.options["password"]) == ("user", "pw")
    assert target.sentinel_options == {"sentinel_password": "spw"}
    assert "host" not in target.options


def test_cluster_url_names_seeds() -> None:
    target = parse_redis_url("rediss+cluster://:pw@n1:7000,n2:7001")
    assert target.kind == "cluster"
    assert target.hosts == (("n1", 7000), ("n2", 7001))
    assert target.options["connection_class"] is SSLConnection
    assert parse_redis_url("redis+cluster://n1").hosts == (("n1", 6379),)


@pytest.mark.parametrize("url", [
    "redis+sentinel://s1:26379",            # no service
    "redis+sentinel://s1:26379/a/b/c",
    "redis+cluster://n1:7000/1",            # a cluster has only db 0
    "redis+cluster:///",                    # no host
    "redis+cluster://n1:notaport",
    "memcached://x",
])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(RedisUrlError):
        parse_redis_url(url)


def test_settings_accept_the_forms_and_refuse_a_sentinel_url_without_service() -> None:
    for url in ("redis://h:1/0", "redis+cluster://a:1,b:2", "redis+sentinel://a:1/mymaster"):
        assert load_settings(environ={}, redis_url=url).redis_url == url
    with pytest.raises(SettingsError, match="service"):
        load_settings(environ={}, redis_url="redis+sentinel://a:1,b:2")
    with pytest.raises(SettingsError, match="redis_url must start with"):
        load_settings(environ={}, redis_url="http://a")
    assert not load_settings(environ={}).redis_sharded_pubsub


def test_redact_hides_the_password() -> None:
    assert redact("redis+cluster://u:secret@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"
    assert redact("redis://a:1/0") == "redis://a:1/0"
