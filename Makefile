# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
# torch is pinned first: a bare `torch` requirement would pull a newer CUDA build. On Linux with a GPU the
# same pin installs the CUDA build from PyPI; override with e.g. `make test TORCH="torch==2.13.0+cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: install test test-all demo bench clean

$(BIN)/.facepipe-installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.facepipe-installed

test: install
	$(BIN)/python -m pytest -q -ra

test-all: install
	$(BIN)/python -m pytest -q -ra -m "slow or not slow"

demo: install
	$(BIN)/facepipe detect examples --out $(DEMO_OUT)/detections.jsonl --visualize $(DEMO_OUT)/visualized
	$(BIN)/facepipe align examples --out $(DEMO_OUT)/aligned
	@echo "Pictures with boxes and landmarks: $(DEMO_OUT)/visualized/  aligned crops: $(DEMO_OUT)/aligned/"

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
