# `make demo` and `make test` each set up everything on a fresh machine (Python + pip only).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test setup lint bench bench-train clean

setup: $(STAMP)

# torch first, pinned: `pip install torch==2.13.0` takes the local CPU wheel; an unpinned torch
# (or a package asking for one before it is present) would pull the multi-GB CUDA build.
# An already-installed torch 2.13.0 makes this step a no-op.
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,cpu,train]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmc demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10

# Speed is measured, never asserted in tests: lmc vs torch eager, torch.compile, onnxruntime.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,cpu,bench]'
	$(PY) bench/cpu.py --wait-quiet 120

# The tiny GPT's train step (forward + loss + backward + AdamW): lmc vs torch eager, torch.compile.
bench-train: $(STAMP)
	$(PY) bench/train.py --wait-quiet 120

lint: $(STAMP)
	$(PY) -m ruff check lmc frontends passes backends tests

clean:
	rm -rf $(VENV) lmc-dumps .pytest_cache lmc-train-loss.png
