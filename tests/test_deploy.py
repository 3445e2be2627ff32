"""The deployment files: docker-compose.yml (parsed, Docker cannot run here), nginx.conf (checked by the
real nginx), and the local cluster (real nginx + redis-server + gateway processes) as module and CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.local_cluster import ClusterError, LocalCluster, find_executable, http_get, local_nginx_conf
from tests.support.ci import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NGINX_CONF = (DEPLOY / "nginx.conf").read_text()


def _require(tool: str) -> str:
    try:
        return find_executable(tool)
    except ClusterError as exc:
        skip_or_fail(str(exc), tests="the deployment tests")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _readyz(url: str) -> dict[str, Any]:
    status, body = http_get(url + "/readyz")
    assert status == 200, (status, body)
    result: dict[str, Any] = json.loads(body)
    return result


# --- docker-compose.yml -----------------------------------------------------------------------------

def test_compose_has_the_seed_topology() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "gateway1", "gateway2", "nginx"}
    assert services["migrate"]["command"] == ["chat-gateway", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_gateways_migrate_first_and_share_one_database_and_redis() -> None:
    services = _compose()["services"]
    database = services["migrate"]["environment"]["GATEWAY_DATABASE_URL"]
    assert database.startswith("postgresql+asyncpg://") and "@postgres:5432/" in database
    node_ids = []
    for name in ("gateway1", "gateway2"):
        gateway = services[name]
        assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        assert gateway["environment"]["GATEWAY_DATABASE_URL"] == database
        assert gateway["environment"]["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
        command = gateway["command"]
        assert command[:2] == ["chat-gateway", "serve"]
        assert command[command.index("--port") + 1] == "8080"
        node_ids.append(command[command.index("--node-id") + 1])
        assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
        assert gateway["stop_grace_period"] == "20s"
    assert len(set(node_ids)) == 2


def test_compose_nginx_runs_deploy_nginx_conf_in_front_of_both_gateways() -> None:
    services = _compose()["services"]
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == {"gateway1", "gateway2"}
    upstream = re.search(r"upstream chat_gateway \{(.*?)\}", NGINX_CONF, re.S)
    assert upstream is not None
    servers = re.findall(r"^\s*server\s+(\S+)", upstream.group(1), re.M)
    assert servers == ["gateway1:8080", "gateway2:8080"]


def test_dockerfile_copies_what_the_gateway_needs() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for needed in ("COPY package.json package-lock.json", "npm ci", "COPY gateway", "COPY alembic",
                   "COPY static", "pip wheel --no-deps", "-c constraints.txt", "node_modules ./node_modules",
                   "GATEWAY_NODE_MODULES_DIR=/app/node_modules", "/readyz"):
        assert needed in dockerfile, needed
    # The image runs the wheel (migrations and pages as package data), not an editable checkout.
    assert "pip install -e" not in dockerfile
    assert "pip install /wheels/chat_gateway-" in dockerfile
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for kept in ("!gateway/**", "!alembic/**", "!static/**", "!package-lock.json"):
        assert kept in ignore


def test_nginx_conf_has_the_websocket_and_sticky_routing_settings() -> None:
    assert "proxy_set_header Upgrade $http_upgrade;" in NGINX_CONF
    assert "proxy_set_header Connection $connection_upgrade;" in NGINX_CONF
    assert "hash $sockjs_session consistent;" in NGINX_CONF
    assert "proxy_buffering off;" in NGINX_CONF
    timeout = re.search(r"location /ws-stomp \{[^}]*proxy_read_timeout (\d+)s;", NGINX_CONF)
    assert timeout is not None and int(timeout.group(1)) > 25  # above SockJS's 25 s heart-beat
    assert NGINX_CONF.count("proxy_set_header Host $http_host;") == 2


# --- local_nginx_conf ---------------------------------------------------------------------------------

def test_local_conf_rewrites_only_the_machine_specific_directives(tmp_path: Path) -> None:
    conf = local_nginx_conf(NGINX_CONF, listen="127.0.0.1:1234", upstreams=["127.0.0.1:1", "127.0.0.1:2",
                                                                           "127.0.0.1:3"], prefix=tmp_path)
    assert "listen 127.0.0.1:1234;" in conf and "listen 80;" not in conf
    assert "server 127.0.0.1:1 max_fails=1 fail_timeout=10s;" in conf
    assert "server 127.0.0.1:3 max_fails=1 fail_timeout=10s;" in conf
    assert "gateway1" not in conf.split("upstream chat_gateway")[1]
    assert f"pid {tmp_path}/nginx.pid;" in conf
    assert f"proxy_temp_path {tmp_path}/temp/proxy;" in conf
    kept = [line for line in NGINX_CONF.splitlines()
            if line.strip().startswith(("proxy_", "map ", "hash ", "location ", "keepalive"))]
    for line in kept:
        assert line in conf.splitlines(), line


def test_local_conf_refuses_a_template_it_cannot_follow(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="listen"):
        local_nginx_conf(NGINX_CONF.replace("listen 80;", ""), listen="x", upstreams=["y"], prefix=tmp_path)
    with pytest.raises(ValueError, match="upstream"):
        local_nginx_conf(NGINX_CONF.replace("upstream chat_gateway", "upstream other"), listen="x",
                         upstreams=["y"], prefix=tmp_path)


def test_real_nginx_accepts_the_local_conf(tmp_path: Path) -> None:
    nginx = _require("nginx")
    (tmp_path / "logs").mkdir()
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(local_nginx_conf(NGINX_CONF, listen="127.0.0.1:1", upstreams=["127.0.0.1:2", "127.0.0.1:3"],
                                     prefix=tmp_path))
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "logs" / "error.log"),
                             "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- the local cluster -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Any:
    _require("nginx")
    _require("redis-server")
    with LocalCluster(nodes_count=2, inherit_gateway_env=False) as running:
        yield running


@pytest.mark.cluster
@pytest.mark.redis
def test_nginx_spreads_plain_requests_over_every_node(cluster: LocalCluster) -> None:
    seen = Counter(_readyz(cluster.url)["node"] for _ in range(8))
    assert set(seen) == {"node1", "node2"}
    status, body = http_get(cluster.url + "/chat/room")
    assert status == 200 and b"<title>Chat rooms</title>" in body


def _post(url: str, body: bytes = b"") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status), bytes(response.read())


@pytest.mark.cluster
@pytest.mark.redis
def test_nginx_keeps_a_sockjs_session_on_one_node(cluster: LocalCluster) -> None:
    """Every HTTP request of one SockJS session reaches the node holding it; sessions spread out.

    Each session opens with ``xhr``, sends CONNECT with ``xhr_send`` (404 on a node that does not hold
    the session) and polls the CONNECTED frame; nginx's access log says which node served what.
    """
    sessions = [f"sticky{n:03d}" for n in range(16)]
    for session in sessions:
        base = f"{cluster.url}/ws-stomp/000/{session}"
        assert _post(base + "/xhr") == (200, b"o\n")
        frame = b'["CONNECT\\naccept-version:1.2\\nhost:x\\n\\n\\u0000"]'
        assert _post(base + "/xhr_send", frame)[0] == 204
        status, reply = _post(base + "/xhr")
        assert status == 200 and reply.startswith(b'a["CONNECTED'), reply
    upstreams: dict[str, set[str]] = {}
    for line in cluster.access_log.read_text().splitlines():
        match = re.search(r"upstream=(\S+) sockjs=(sticky\d+)$", line)
        if match:
            upstreams.setdefault(match.group(2), set()).add(match.group(1))
    assert set(upstreams) == set(sessions)
    assert all(len(nodes) == 1 for nodes in upstreams.values()), upstreams
    used = set().union(*upstreams.values())
    assert used == {f"127.0.0.1:{node.port}" for node in cluster.nodes}


@pytest.mark.cluster
@pytest.mark.redis
def test_a_killed_node_is_routed_around_and_comes_back(cluster: LocalCluster) -> None:
    cluster.kill_node(0)
    try:
        assert not cluster.nodes[0].running
        seen = Counter(_readyz(cluster.url)["node"] for _ in range(6))
        assert seen == Counter({"node2": 6})
    finally:
        cluster.start_node(0)
    assert _readyz(cluster.nodes[0].url)["node"] == "node1"


def test_stop_leaves_no_process_and_no_files() -> None:
    _require("nginx")
    _require("redis-server")
    cluster = LocalCluster(nodes_count=1, inherit_gateway_env=False).start()
    assert cluster.workdir is not None
    processes = [node.process for node in cluster.nodes] + [cluster._nginx]
    redis = cluster._redis
    workdir, url = cluster.workdir, cluster.url
    assert _readyz(url)["node"] == "node1"
    assert redis is not None and redis.running
    cluster.stop()
    assert all(p is not None and p.poll() is not None for p in processes)
    assert not redis.running
    assert not workdir.exists()
    assert http_get(url + "/healthz", timeout_s=1.0)[0] == 0


def test_cli_starts_detached_reports_status_and_stops(tmp_path: Path) -> None:
    _require("nginx")
    _require("redis-server")
    state = tmp_path / "state.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base = [str(DEPLOY / "local-cluster"), "--state-file", str(state)]
    env["PYTHON"] = sys.executable
    started = subprocess.run([*base, "start", "--detach", "--nodes", "2"], capture_output=True, text=True,
                             timeout=120, env=env)
    try:
        assert started.returncode == 0, started.stderr
        url = re.search(r"chat cluster ready: (http://127\.0\.0\.1:\d+)/chat/room", started.stdout)
        assert url is not None, started.stdout
        assert _readyz(url.group(1))["ready"] is True
        recorded = json.loads(state.read_text())
        assert [n["node_id"] for n in recorded["nodes"]] == ["node1", "node2"]
        again = subprocess.run([*base, "start", "--detach"], capture_output=True, text=True, timeout=60, env=env)
        assert again.returncode == 1 and "already running" in again.stderr
        status = subprocess.run([*base, "status"], capture_output=True, text=True, timeout=30, env=env)
        assert status.returncode == 0 and url.group(1) in status.stdout
    finally:
        stopped = subprocess.run([*base, "stop"], capture_output=True, text=True, timeout=90, env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not state.exists()
    assert http_get(url.group(1) + "/healthz", timeout_s=1.0)[0] == 0
    assert not Path(recorded["workdir"]).exists()
    status = subprocess.run([*base, "status"], capture_output=True, text=True, timeout=30, env=env)
    assert status.returncode == 1
