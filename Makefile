# Two entry points for a fresh machine: `make chat` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: chat test install clean mac-check

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

# On a Mac: suite + Metal kernel benchmark + `mlxedge bench --compare mlx-lm`, one JSON report (docs/mac-check.md)
mac-check: $(STAMP)
	$(BIN)/python scripts/mac_check.py --out mac-check.json

clean:
	rm -rf $(VENV)
