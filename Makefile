# The two commands of the README: `make run` and `make test`. Each creates .venv only when missing
# (or when pyproject.toml changed), so a second run starts at once.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# On this project's CPU machines these two wheels come from local disk; on a GPU cluster, set
# TORCH_SPEC to the build that fits its CUDA (or leave torch already installed in the venv).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CORES ?= 2
# Test processes (pytest-xdist, one module per process): one more than the cores, as the Slurm tests
# spend most of their time waiting on the scheduler.
TEST_WORKERS ?= 3
# Rules call `qv`; make the venv's commands visible to them.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test setup clean docs
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/snakemake --cores $(CORES)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The README's demo figure and verdict block from the last `make run` (or a multi-seed run): the run's
# summary and heatmap copied to docs/, then the README's verdict block rewritten from that summary.
DEMO := results/default/vit_demo/w2-channel
docs: setup
	cp $(DEMO)/summary.md docs/demo-summary.md
	cp $(DEMO)/heatmap_gain.png docs/heatmap_gain_default.png
	$(BIN)/qv readme --summary docs/demo-summary.md --readme README.md

# Every config's reports, logs and Snakemake's records, and the shared store where configs keep it by
# default (results/store; a `store` elsewhere is left alone).
clean:
	rm -rf results logs .snakemake
