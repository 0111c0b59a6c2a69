# The verbs people use. Everything runs inside .venv in this folder; `make install` creates it.
#   make train   set up if needed, then train the default config on the built-in shapes dataset
#   make test    set up if needed, then run the whole test suite (what CI runs)
#   make test-fast  the unit tests and one 2-rank test (under 3 minutes): the edit-test loop
#   make lint    ruff
#   make bench   the training-step benchmark (figures, not a pass/fail test)
#   make gpu-check  on a machine with a GPU: what only a GPU can show, in a few minutes, one table
#   make bench-gpu  on a machine with a GPU: `distgan bench gpu`, the fast path measured (docs/performance.md)
#   make docs    regenerate docs/config-reference.md from the config dataclasses (a test fails when it is stale)

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
# torch/torchvision must be a matching pair from the same index: the CPU-only torch wheel some machines carry
# locally cannot load the registry's torchvision (see README, "Installing"). DeepSpeed installs without
# compiling its ops (DS_BUILD_OPS=0): distgan uses torch's Adam and torch.distributed's collectives, so none
# is needed (distgan/distributed/zero.py).
TORCH   := torch==2.14.1 torchvision==0.29.2
CONFIG  ?= configs/default.yaml
RUN_DIR ?=
STAMP   := $(VENV)/.installed

.PHONY: install train test test-fast lint bench gpu-check bench-gpu docs clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -e ".[dev,deepspeed]"
	@touch $(STAMP)
	@echo "installed distgan into $(VENV)"

# The built-in dataset, prepared once into WebDataset shards that the default config streams.
SHAPES  := data/shapes-32

$(SHAPES)/manifest.json: | $(STAMP)
	$(VENV)/bin/distgan prepare shapes --out $(SHAPES) --size 32 --num 20000

train: install $(SHAPES)/manifest.json
	$(VENV)/bin/distgan train --config $(CONFIG) $(if $(RUN_DIR),--run-dir $(RUN_DIR))

test: install
	$(PY) -m pytest

# The unit tests (one process, and the few 2-process checks among them) and the core 2-rank DDP equivalence.
FAST    := tests/unit tests/distributed/test_ddp.py::test_two_ranks_batch_b_equal_one_rank_batch_2b

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(FAST)

lint: install
	$(VENV)/bin/ruff check distgan tests
	$(VENV)/bin/ruff format --check distgan tests

bench: install
	$(VENV)/bin/distgan bench train --config $(CONFIG)

gpu-check: install
	$(VENV)/bin/distgan gpu-check

bench-gpu: install
	$(VENV)/bin/distgan bench gpu

docs: install
	$(VENV)/bin/distgan config-reference --out docs/config-reference.md

clean:
	rm -rf $(VENV) build *.egg-info
