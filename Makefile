# torch_pagedkv: `make run` (the main job), `make test`, `make build`, `make bench`.
# The environment (torch alone is 5.5 GB) lives in a cache folder keyed by the hash of
# the requirement files, created here when missing; .venv is a link to it.
SHELL := /bin/bash
PYTHON_BASE ?= python3.11
REQ_FILES := requirements.txt requirements-hf.txt
REQ_HASH := $(shell cat $(REQ_FILES) | sha256sum | cut -c1-16)
ENV_CACHE ?= $(HOME)/.cache/torch_pagedkv
ENV_DIR := $(ENV_CACHE)/venv-$(REQ_HASH)
PY := .venv/bin/python
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: env build run test bench clean

env: .venv/.ready-$(REQ_HASH)

.venv/.ready-$(REQ_HASH): $(REQ_FILES)
	@if [ ! -f $(ENV_DIR)/.complete ]; then \
	  echo "creating environment $(ENV_DIR) (first time only: a few minutes)"; \
	  rm -rf $(ENV_DIR) && mkdir -p $(ENV_CACHE) && \
	  $(PYTHON_BASE) -m venv $(ENV_DIR) && \
	  $(ENV_DIR)/bin/python -m pip install -q --progress-bar off $(addprefix -r ,$(REQ_FILES)) && \
	  touch $(ENV_DIR)/.complete; \
	fi
	@rm -rf .venv && ln -s $(ENV_DIR) .venv
	@mkdir -p .venv && touch .venv/.ready-$(REQ_HASH)

build: env torch_pagedkv/_C.stamp

torch_pagedkv/_C.stamp: $(SOURCES) .venv/.ready-$(REQ_HASH)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

run: build
	$(PY) -m torch_pagedkv.cli showcase

test: build
	$(PY) -m pytest -q tests

bench: build
	set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf build torch_pagedkv/*.so torch_pagedkv/_C.stamp
