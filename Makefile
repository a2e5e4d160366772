# `make demo` and `make test` each set up everything on a fresh machine (Python + pip only).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test setup lint bench bench-train clean

setup: $(STAMP)

# An editable install leaves lmc's modules uncompiled, and where PYTHONDONTWRITEBYTECODE is set
# (as on the dev machines) every process compiles them again at import: ~70 ms of each compile
# and load. Byte-compile them once, as pip does for a regular install (a stale .pyc is ignored).
BYTECODE := $(PY) -m compileall -q lmc backends frontends passes > /dev/null

# torch first, pinned: `pip install torch==2.13.0` takes the local CPU wheel; an unpinned torch
# (or a package asking for one before it is present) would pull the multi-GB CUDA build.
# An already-installed torch 2.13.0 makes this step a no-op.
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,cpu,train]'
	$(BYTECODE)
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmc demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=10

# Speed is measured, never asserted in tests: lmc vs torch eager, torch.compile, onnxruntime.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,cpu,bench]'
	$(BYTECODE)
	$(PY) bench/cpu.py --wait-quiet 120

# The tiny GPT's train step (forward + loss + backward + AdamW): lmc vs torch eager, torch.compile.
bench-train: $(STAMP)
	$(BYTECODE)
	$(PY) bench/train.py --wait-quiet 120

lint: $(STAMP)
	$(PY) -m ruff check lmc frontends passes backends tests

clean:
	rm -rf $(VENV) lmc-dumps .pytest_cache lmc-train-loss.png
