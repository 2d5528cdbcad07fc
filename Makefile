# Two entry points for newcomers and CI: `make demo` (set up + run the pipeline on synthetic data)
# and `make test` (set up + run the tests). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint lint-docker

setup: $(VENV)/.installed

# torch/torchvision are pinned in pyproject.toml: an open range would pull a newer multi-GB build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev,milvus]"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

# The static checks the tests also run: ruff on the code, hadolint on the Dockerfiles.
lint: lint-docker
	$(VENV)/bin/ruff check .

# Dockerfiles cannot be built here (no Docker engine); hadolint at least checks them.
lint-docker: setup
	$(VENV)/bin/hadolint Dockerfile.serve Dockerfile.train
