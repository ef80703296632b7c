# pyengine developer entry points.  `make setup` builds everything from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup build test test-llamacpp bench finetune clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: setup.py pyproject.toml CMakeLists.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q setuptools wheel pybind11 cmake ninja
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

# Rebuild the C++ extension in place (incremental, seconds) after editing csrc/.
build: setup
	$(PY) setup.py -q build_ext --inplace

test: setup build
	$(PY) -m pytest -q tests

# The llama.cpp round trip of our GGUF export (tests/test_export.py): llama-cpp-python
# compiles llama.cpp from source (minutes, once; pip caches the wheel). Portable build:
# a -march=native llama.cpp can die with SIGILL in VMs that hide AMX.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
test-llamacpp: setup build
	$(PY) -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q $(LLAMA_CPP_PYTHON) diskcache
	PYENGINE_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q tests/test_export.py -k llama_cpp

bench: setup build
	$(PY) -m pytest -q benchmarks --benchmark-columns=median,iqr,rounds --benchmark-sort=name

finetune: setup build
	$(PY) -m pyengine.finetune --overwrite  # the demo job re-runs into its own output dir

clean:
	rm -rf build *.egg-info pyengine/_C*.so
