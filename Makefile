# torch_pagedkv: `make run` (the main job), `make test`, `make build`, `make bench`.
# The environment (torch alone is 5.5 GB) lives in a cache folder keyed by the hash of
# the requirement files, created here when missing and shared by every checkout. .venv is
# the checkout's own small environment over it (scripts/checkout_venv.py): the shared
# packages, this checkout's root on the path, and the `pagedkv` command in .venv/bin.
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
export PAGEDKV_CUDA ?= auto
# The SIMT-emulated CUDA kernels (torch_pagedkv._simt, tests only): built by `make test`.
export PAGEDKV_SIMT ?= 0
# A machine without a GPU runs the demo on the CPU kernels alone: `make run` then skips
# compiling CUDA objects it cannot use (`make test` and CI still build and run them).
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
# The CPU kernels' ISA: AVX-512 where this CPU has it (16-float vectors), else AVX2.
PAGEDKV_CPU_ISA ?= $(shell grep -qw avx512bw /proc/cpuinfo 2>/dev/null && grep -qw avx512vl /proc/cpuinfo && grep -qw avx512_bf16 /proc/cpuinfo && echo avx512 || echo avx2)
export PAGEDKV_CPU_ISA := $(PAGEDKV_CPU_ISA)
SOURCES := $(sort $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')) setup.py
# Build cache: a built library is kept under ENV_CACHE keyed by the hash of every source,
# the environment and the build settings, so a fresh clone of an unchanged tree starts in
# seconds. PAGEDKV_BUILD_CACHE=0 (CI) always compiles.
PAGEDKV_BUILD_CACHE ?= 1
space := $(subst ,, )
BUILD_KEY := $(shell cat $(SOURCES) | sha256sum | cut -c1-16)-$(REQ_HASH)-$(PAGEDKV_CUDA)-simt$(PAGEDKV_SIMT)-$(PAGEDKV_CPU_ISA)-$(subst ;,_,$(subst $(space),_,$(TORCH_CUDA_ARCH_LIST)))
LIB_CACHE := $(ENV_CACHE)/lib-$(BUILD_KEY)

.PHONY: env build build-test run test bench clean

env: .venv/.checkout-ready-$(REQ_HASH)

.venv/.checkout-ready-$(REQ_HASH): $(REQ_FILES) scripts/checkout_venv.py
	@if [ ! -f $(ENV_DIR)/.complete ]; then \
	  echo "creating environment $(ENV_DIR) (first time only: a few minutes)"; \
	  rm -rf $(ENV_DIR) && mkdir -p $(ENV_CACHE) && \
	  $(PYTHON_BASE) -m venv $(ENV_DIR) && \
	  $(ENV_DIR)/bin/python -m pip install -q --progress-bar off $(addprefix -r ,$(REQ_FILES)) && \
	  touch $(ENV_DIR)/.complete; \
	fi
	@rm -rf .venv && $(ENV_DIR)/bin/python scripts/checkout_venv.py .venv $(ENV_DIR) $(CURDIR)
	@touch $@
	@echo "environment ready: .venv (the pagedkv command is .venv/bin/pagedkv)"

# The stamp's name carries the build key, so changing a build setting (PAGEDKV_CUDA=0, the
# ISA, the arch list) rebuilds or reuses the matching library, never keeps the last one.
STAMP := torch_pagedkv/_C-$(BUILD_KEY).stamp

build: env $(STAMP)

$(STAMP): $(SOURCES) .venv/.checkout-ready-$(REQ_HASH)
	@rm -f torch_pagedkv/_C*.stamp
	@if [ "$(PAGEDKV_BUILD_CACHE)" != 0 ] && [ -f $(LIB_CACHE)/.complete ]; then \
	  echo "reusing the library built from these exact sources ($(LIB_CACHE))"; \
	  rm -f torch_pagedkv/_C*.so torch_pagedkv/_simt*.so && cp $(LIB_CACHE)/_* torch_pagedkv/; \
	else \
	  echo "building torch_pagedkv._C (CUDA: $(PAGEDKV_CUDA), CPU ISA: $(PAGEDKV_CPU_ISA))" && \
	  $(PY) scripts/quiet_build.py $(PY) setup.py -q build_ext --inplace && \
	  if [ "$(PAGEDKV_SIMT)" = 0 ]; then rm -f torch_pagedkv/_simt*.so; fi && \
	  rm -rf $(LIB_CACHE) && mkdir -p $(LIB_CACHE) && cp torch_pagedkv/_C*.so torch_pagedkv/_C.isa torch_pagedkv/_C.torch $(LIB_CACHE)/ && \
	  if [ "$(PAGEDKV_SIMT)" != 0 ]; then cp torch_pagedkv/_simt*.so $(LIB_CACHE)/; fi && \
	  touch $(LIB_CACHE)/.complete; \
	fi
	@touch $@

run:
	@$(MAKE) --no-print-directory build PAGEDKV_SIMT=0 $(if $(filter 0,$(HAVE_GPU)),PAGEDKV_CUDA=0)
	.venv/bin/pagedkv demo

# The tests build the CUDA kernels (compile-checked here) and their SIMT-emulated twin.
build-test:
	@$(MAKE) --no-print-directory build PAGEDKV_SIMT=1

test: build-test
	$(PY) -m pytest -q tests

bench: build-test
	set -e; for b in benchmarks/bench_*.py; do m=benchmarks.$$(basename $$b .py); echo "== $$m"; $(PY) -m $$m; done

clean:
	rm -rf build torch_pagedkv/*.so torch_pagedkv/_C*.stamp
