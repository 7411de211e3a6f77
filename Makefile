# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Editable installs hide twisted/plugins from the plugin system; the source
# tree on PYTHONPATH makes `twistd rtunnel…` find the dropin (see docs/development.md).
RUN    := PYTHONPATH=$(CURDIR) $(PY)

.PHONY: all venv test test-packages test-stock-io demo bench bench-fleet check clean

all: test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Real clients the tests drive, installed from Debian's packages when missing:
# curl (the front door's end-to-end tests), chromium and chromedriver (the
# status page, in a real browser), promtool of the prometheus package (checks
# the /metrics output); haproxy, the load balancer in front of the replicas in
# tests/test_e2e_replicas.py (in /usr/sbin, not on every user's PATH: checked
# there too; the tests run their own in a temporary directory, so the
# package's service is stopped and disabled where systemd started it); and
# PostgreSQL's server, for the state store's tests on a throwaway cluster (its
# initdb is not on PATH: checked by its path).
TEST_PACKAGES := curl:curl chromium:chromium chromedriver:chromium-driver promtool:prometheus
test: $(STAMP) test-packages
	$(RUN) -m pytest -q $(PYTEST_ARGS)

test-packages:
	@missing=""; for pair in $(TEST_PACKAGES); do \
	    command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	    echo "installing the test tools from Debian's packages:$$missing"; \
	    apt-get update -q && apt-get install -y -q --no-install-recommends $$missing && \
	    case "$$missing" in *haproxy*) [ ! -d /run/systemd/system ] || systemctl disable --now haproxy;; esac; fi

# The end-to-end tests once more on stock Twisted I/O (no eager TCP writes,
# Twisted's own TLS protocol): the fallback rtunnel takes when a Twisted
# internal it relies on is missing (rtunnel/adapter/fence.py). The twistd
# processes the tests start inherit RTUNNEL_STOCK_IO. .ci/run runs it.
test-stock-io: $(STAMP) test-packages
	RTUNNEL_STOCK_IO=1 $(RUN) -m pytest -q -m e2e $(PYTEST_ARGS)

demo: $(STAMP)
	$(RUN) -m tools.demo

bench: $(STAMP)
	$(RUN) bench/run.py $(BENCH_ARGS)

# One twistd rtunnel-server, 1,000 and 10,000 sites from 4 driver processes
# (docs/performance.md, "Fleet"); FLEET_ARGS=--quick for a 500-site smoke run.
bench-fleet: $(STAMP)
	$(RUN) bench/fleet.py $(FLEET_ARGS)

# Static checks: ruff (lint rules and formatting, configured in pyproject.toml)
# and strict mypy with the zope plugin; the checkers are pinned in the `dev`
# extra, so a new release cannot turn CI red overnight. .ci/run runs it.
CHECKED := rtunnel twisted tools tests bench
check: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(VENV)/bin/ruff check $(CHECKED)
	$(VENV)/bin/ruff format --check $(CHECKED)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis _demo _bench twisted/plugins/dropin.cache
	find . -name __pycache__ -prune -exec rm -rf {} +
