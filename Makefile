# pyengine developer entry points.  `make setup` builds everything from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup build test test-llamacpp bench bench-infer bench-serve finetune clean

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

# The llama.cpp round trip of our GGUF export (tests/test_export.py) against the real
# llama.cpp. llama-cpp-python ships only as source: the first run compiles it (~15-25 min
# on 2 cores) into a wheel kept in LLAMA_WHEELS, later runs install that wheel. Portable
# build: a -march=native llama.cpp dies with SIGILL in VMs that hide AMX.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/pyengine/wheels
LLAMA_WHEEL := $(subst ==,-,$(subst -,_,$(LLAMA_CPP_PYTHON)))
test-llamacpp: setup build
	$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  { ls $(LLAMA_WHEELS)/$(LLAMA_WHEEL)-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) wheel -q --no-cache-dir --no-deps -w $(LLAMA_WHEELS) $(LLAMA_CPP_PYTHON); } && \
	  $(PIP) install -q diskcache jinja2 typing-extensions numpy && \
	  $(PIP) install -q --no-index --no-deps --find-links $(LLAMA_WHEELS) $(LLAMA_CPP_PYTHON); }
	PYENGINE_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q tests/test_export.py -k llama_cpp

bench: setup build
	$(PY) -m pytest -q benchmarks/bench_*.py --benchmark-columns=median,iqr,rounds --benchmark-sort=name

# The inference benchmark (benchmarks/bench_infer.py; every engine in its own process with a
# clean environment). The peer, llama-cpp-python, gets its own venv, installed as a user
# would get it from PyPI: a native build with the default CMAKE_ARGS, compiled once (~15-25
# min on 2 cores) into a wheel kept in LLAMA_NATIVE_WHEELS (apart from the portable one;
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a portable build).
# On VMs whose AMX does not work (this one: SIGILL at `tilezero` in ggml's AMX matmul as soon
# as a prompt has 2+ tokens), LLAMA_NO_AMX=1 builds the same native code without AMX, into
# its own wheel directory and venv.
LLAMA_NO_AMX ?=
NO_AMX_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_NATIVE_CMAKE_ARGS := $(if $(LLAMA_NO_AMX),-DCMAKE_C_FLAGS="$(NO_AMX_FLAGS)" -DCMAKE_CXX_FLAGS="$(NO_AMX_FLAGS)")
LLAMA_VENV ?= .venv-llamacpp$(if $(LLAMA_NO_AMX),-noamx)
LLAMA_NATIVE_WHEELS ?= $(HOME)/.cache/pyengine/wheels-native$(if $(LLAMA_NO_AMX),-noamx)
BENCH_INFER_ARGS ?= --shape 135m --shape 1b --threads 1 2

$(LLAMA_VENV)/.setup-done:
	test -x $(LLAMA_VENV)/bin/python || $(PY) -m venv $(LLAMA_VENV)
	ls $(LLAMA_NATIVE_WHEELS)/$(LLAMA_WHEEL)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS='$(LLAMA_NATIVE_CMAKE_ARGS)' $(LLAMA_VENV)/bin/python -m pip wheel -q --no-deps \
	    --no-cache-dir -w $(LLAMA_NATIVE_WHEELS) $(LLAMA_CPP_PYTHON)
	$(LLAMA_VENV)/bin/python -m pip install -q --only-binary llama-cpp-python \
	  --find-links $(LLAMA_NATIVE_WHEELS) $(LLAMA_CPP_PYTHON)
	touch $@

bench-infer: setup build $(LLAMA_VENV)/.setup-done
	$(PY) benchmarks/bench_infer.py $(BENCH_INFER_ARGS) --llama-python $(LLAMA_VENV)/bin/python

# The serving benchmark (benchmarks/bench_serve.py): python -m pyengine.serve vs
# llama-cpp-python's server (the peer venv above plus its [server] extras: fastapi, uvicorn,
# sse-starlette, starlette-context, pydantic-settings) vs pyengine.infer, N concurrent
# streaming clients.
BENCH_SERVE_ARGS ?= --shape 135m --shape 1b --threads 2 --json /tmp/pyengine_bench_serve/result.json

$(LLAMA_VENV)/.server-done: $(LLAMA_VENV)/.setup-done
	$(LLAMA_VENV)/bin/python -m pip install -q --only-binary llama-cpp-python \
	  --find-links $(LLAMA_NATIVE_WHEELS) '$(subst ==,[server]==,$(LLAMA_CPP_PYTHON))'
	touch $@

bench-serve: setup build $(LLAMA_VENV)/.server-done
	$(PY) benchmarks/bench_serve.py $(BENCH_SERVE_ARGS) --llama-python $(LLAMA_VENV)/bin/python

finetune: setup build
	$(PY) -m pyengine.finetune --overwrite  # the demo job re-runs into its own output dir

clean:
	rm -rf build *.egg-info pyengine/_C*.so
