# kubetune developer entry points. Every target bootstraps what it needs on a fresh
# machine: uv (from PyPI) and the locked virtual environment in .venv.
#
#   make demo    run the LoRA demo (tiny model, embedded S3, CPU, no network)
#   make test    lint + every CPU test tier (unit, integration, e2e); CI runs this
#   make unit    the fast unit tier only
#   make gpu-wheels  the wheel folder a GPU host without a registry installs from (.gpu-wheels)
#   make gpu-check   the GPU tier (pytest -m gpu) and the GPU benchmark; needs CUDA

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
UV := $(PYTHON) -m uv
VENV := .venv
SYNCED := $(VENV)/.synced
RUN := $(UV) run --frozen --no-sync
PYTEST := $(RUN) pytest

.PHONY: help venv demo test unit integration lint crd chart tools gpu-wheels gpu-check cluster-build cluster-up cluster-down cluster-status clean

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'

# The environment, exactly as uv.lock says; re-synced when the lock or pyproject changes.
# uv itself comes from PyPI when this Python does not have it yet.
$(SYNCED): pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check "uv>=0.5"
	$(UV) sync --frozen --all-extras
	@touch $@

venv: $(SYNCED)

# Test tools that come from Debian, each installed only when missing (one `apt-get update` for all):
# promtool (Prometheus) for metric and rule checks; Chromium for the report's browser test, without
# its desktop recommends (notification daemon, printer setup) but with a font for the page's text.
tools:
	@updated=; debian_install() { [ -n "$$updated" ] || { apt-get update -qq; updated=1; }; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$$@" >/dev/null; }; \
	command -v promtool >/dev/null || { echo "installing promtool (Debian prometheus)"; debian_install prometheus; }; \
	command -v chromium >/dev/null || { echo "installing chromium (Debian chromium)"; \
	  debian_install --no-install-recommends chromium fonts-liberation; }

demo: $(SYNCED)
	$(RUN) kubetune demo

lint: $(SYNCED)
	$(RUN) ruff check .
	$(RUN) hadolint Dockerfile
	$(RUN) kubetune validate --quiet examples/*.yaml

# Tools first, so the promtool checks run instead of skipping on a fresh machine.
unit: $(SYNCED) tools
	$(PYTEST)

# Integration and end-to-end tiers: real servers on loopback (kube-apiserver + etcd built
# from Kubernetes' Go modules and cached, moto's S3 server, Prometheus).
# The control plane is built (once; cached outside the checkout) before pytest starts, so
# a cold build never runs under a test's timeout.
integration: $(SYNCED) tools cluster-build
	$(PYTEST) -m "integration or e2e" -p no:cacheprovider || [ $$? -eq 5 ]

test: lint unit integration

# Regenerate everything that comes from the API model (tests fail when these drift).
crd: $(SYNCED)
	$(RUN) kubetune crd > manifests/crd/kubetune.io_finetunejobs.yaml
	$(RUN) kubetune crd --format markdown > docs/api.md

# Regenerate the chart's values.yaml, values.schema.json and crds/, and the plain install
# manifests/operator.yaml rendered from the chart (tests fail when these drift).
chart: crd
	$(RUN) python charts/generate.py

# The GPU tier runs where CUDA is: on a GPU host with its own Python 3.12 + torch and no registry
# (docs/development.md, GPU tier), from the working tree plus the wheels prepared here beforehand.
# Neither target needs .venv: gpu-wheels uses this Python's pip, gpu-check the host's Python.
gpu-wheels:
	$(PYTHON) bench/gpu_wheels.py

gpu-check:
	bash bench/gpu_check.sh

cluster-build: $(SYNCED)
	$(RUN) python tests/cluster/kubecluster.py build

cluster-up: $(SYNCED)
	$(RUN) python tests/cluster/kubecluster.py up

cluster-down: $(SYNCED)
	$(RUN) python tests/cluster/kubecluster.py down

cluster-status: $(SYNCED)
	$(RUN) python tests/cluster/kubecluster.py status

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
