# Two entry points for a fresh machine: `make chat` (the runtime only) and `make test` (runtime + test tools).
# Both create .venv; `pip install -e` compiles the native CPU kernels (src/mlxedge/cpu) from source.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard src/mlxedge/cpu/CMakeLists.txt src/mlxedge/cpu/kernels/* src/mlxedge/cpu/ext/*)

.PHONY: chat test install clean mac-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip

$(RUNTIME): $(NATIVE_SOURCES) | $(BIN)/python
	$(BIN)/pip install --progress-bar on -e .
	touch $@

$(TESTDEPS): $(NATIVE_SOURCES) | $(BIN)/python
	$(BIN)/pip install --progress-bar on -e '.[test]'
	touch $@ $(RUNTIME)

install: $(RUNTIME)

chat: $(RUNTIME)
	$(BIN)/mlxedge chat

# MLXEDGE_REQUIRE_NATIVE=1: the native kernels must have been built and must load (a test fails otherwise)
test: $(TESTDEPS)
	MLXEDGE_REQUIRE_NATIVE=1 $(BIN)/python -m pytest -q

# On a Mac: suite + Metal kernel benchmark + `mlxedge bench --compare mlx-lm`, one JSON report (docs/mac-check.md)
mac-check: $(TESTDEPS)
	$(BIN)/python scripts/mac_check.py --out mac-check.json

clean:
	rm -rf $(VENV)

# Native CPU kernels (src/mlxedge/cpu) built with AddressSanitizer + UBSan, then their tests against
# that build (the interpreter is not instrumented, so the ASan runtime is preloaded).
SAN_DIR := build/sanitize
CXX ?= g++
CMAKE ?= $(BIN)/cmake
NINJA ?= $(BIN)/ninja
.PHONY: test-sanitize
test-sanitize: $(TESTDEPS)
	$(CMAKE) -S src/mlxedge/cpu -B $(SAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(NINJA)) \
		-DMLXEDGE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=$(abspath $(BIN)/python) \
		-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$(abspath $(SAN_DIR))/out
	$(CMAKE) --build $(SAN_DIR)
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	MLXEDGE_CPU_EXT="$$(ls $(abspath $(SAN_DIR))/out/_ext*.so)" \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py tests/test_cpu_ops.py
