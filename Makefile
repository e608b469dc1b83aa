# Two commands do everything on a fresh machine: `make demo` and `make test`.
# `make install` is idempotent: a second run with an unchanged pyproject.toml is a no-op.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
EXTRAS ?= libero,convert,dev
PY_DIRS := ript_ds launch tools tests
STAMP := $(VENV)/.installed-$(shell md5sum pyproject.toml | cut -c1-12)-$(EXTRAS)
# openpi's own client for tests/test_serving.py, in a venv of its own: openpi-client 0.1.2 pins numpy<2
# and imports typing_extensions without declaring it.
OPENPI_CLIENT_VENV := $(VENV)/openpi-client
OPENPI_CLIENT := $(OPENPI_CLIENT_VENV)/.installed

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::DeprecationWarning
export TOKENIZERS_PARALLELISM ?= false
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint bench bench-libero clean

install: $(STAMP) $(OPENPI_CLIENT)

$(OPENPI_CLIENT):
	@test -x $(OPENPI_CLIENT_VENV)/bin/python || $(PYTHON) -m venv $(OPENPI_CLIENT_VENV)
	$(OPENPI_CLIENT_VENV)/bin/pip install -q openpi-client==0.1.2 typing_extensions
	@touch $@

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned, so that nothing pulls a multi-GB CUDA build onto a CPU machine.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@bash tools/install_system_deps.sh
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: install
	$(PY) launch/demo.py

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	$(PY) -m compileall -q ript_ds launch tools tests

bench: install
	cd tools/bench && ../../$(PY) sample_latency.py
	cd tools/bench && ../../$(PY) rollout_throughput.py
	cd tools/bench && ../../$(PY) learning_curve.py
	cd tools/bench && ../../$(PY) inline_pool.py
	cd tools/bench && ../../$(PY) memory_check.py
	cd tools/bench && ../../$(PY) serve_throughput.py
	cd tools/bench && ../../$(PY) lerobot_export_size.py
	cd tools/bench && ../../$(PY) pi05_vs_pi0.py
	cd tools/bench && ../../$(PY) pipelined_rollout.py
	cd tools/bench && ../../$(PY) shared_prefix.py

# RIPT on real LIBERO on this CPU (~1.5 h on 2 cores): scripted demos -> BC -> RIPT -> launch/eval.py;
# writes docs/benchmarks.md "RIPT on real LIBERO". Not CI: tests/test_libero_ript.py is its short version.
bench-libero: install
	cd tools/bench && ../../$(PY) libero_ript.py

clean:
	rm -rf $(VENV) .torch_extensions .pytest_cache .ruff_cache runs
