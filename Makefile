# Two entry points for a fresh machine: `make chat` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: chat test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

chat: $(STAMP)
	$(BIN)/mlxedge chat

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)

# Native CPU kernels (src/mlxedge/cpu) built with AddressSanitizer + UBSan, then their tests against
# that build (the interpreter is not instrumented, so the ASan runtime is preloaded).
SAN_DIR := build/sanitize
CXX ?= g++
CMAKE ?= $(BIN)/cmake
NINJA ?= $(BIN)/ninja
.PHONY: test-sanitize
test-sanitize: $(STAMP)
	$(CMAKE) -S src/mlxedge/cpu -B $(SAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(NINJA)) \
		-DMLXEDGE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=$(abspath $(BIN)/python) \
		-DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$(abspath $(SAN_DIR))/out
	$(CMAKE) --build $(SAN_DIR)
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	MLXEDGE_CPU_EXT="$$(ls $(abspath $(SAN_DIR))/out/_ext*.so)" \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py
