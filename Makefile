# chat-gateway: the two commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test install install-test node-deps system-deps lint typecheck migrate bench dashboard clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime dependencies at the versions pinned in constraints.txt (regenerating it: see its header).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Browser libraries (sockjs-client, @stomp/stompjs, ...) come from npm at the versions pinned in
# package-lock.json; the gateway serves them from node_modules. Skipped with a warning without npm.
node_modules/.package-lock.json: package.json package-lock.json
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error; \
	else echo "warning: npm not found; the chat page's client libraries will be missing" >&2; fi

node-deps: node_modules/.package-lock.json

# Services and tools the test suite drives for real: redis-server (tests start their own on free
# ports; also Sentinels and a Redis Cluster, which redis-cli from redis-tools creates), nginx (load-balancer tests), Debian's chromium (browser tests). Installed with apt-get when
# missing (CI runs as root). PostgreSQL is expected at 127.0.0.1:5432.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

migrate: install
	$(BIN)/chat-gateway migrate

run: install node-deps
	$(BIN)/chat-gateway migrate
	$(BIN)/chat-gateway serve --host $(HOST) --port $(PORT)

test: install-test node-deps system-deps
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install-test node-deps
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# docs/grafana-dashboard.png: deploy/grafana-dashboard.json's panels rendered from /metrics scraped during
# a short scripted run of two real nodes (needs redis-server; see bench/metrics_dashboard.py).
dashboard: install-test
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.metrics_dashboard $(DASHBOARD_ARGS)

clean:
	rm -rf $(VENV) node_modules chat-gateway.db .pytest_cache .mypy_cache .ruff_cache
