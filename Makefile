# kie-extend: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test chaos browser prometheus compose bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kie-extend demo

test: $(STAMP)
	$(PY) -m pytest -q

chaos: $(STAMP)
	$(PY) -m pytest -q -m chaos -o addopts='-ra'

# The dashboard in headless Chromium (installs Debian's chromium + chromium-driver when missing, as root).
browser: $(STAMP)
	$(PY) -m pytest -q -m browser -o addopts='-ra'

# The alert rules in a real Prometheus scraping serve (installs Debian's prometheus when missing, as root).
prometheus: $(STAMP)
	$(PY) -m pytest -q -m prometheus -o addopts='-ra'

# docker-compose.yml under podman + podman-compose, as root (installs them and builds local stand-ins
# for python:3.11-slim and redis:7-alpine when missing; see README "Docker Compose").
compose: $(STAMP)
	$(PY) -m pytest -q -m compose -o addopts='-ra'

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .demo .pytest_cache
