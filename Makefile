# beitv2-ds: `make demo` (set up, then run the main job) and `make test` (set up, then run every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PYTHONPATH := $(CURDIR)
# Test files run side by side, one file per pytest-xdist worker (module fixtures stay shared within a file): on two
# cores the suite takes about 0.7x the time of one worker. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# System packages: Fashion-MNIST (demo data), OpenCV + libjpeg-turbo + pkg-config (FFCV builds against them),
# numactl (DeepSpeed's --bind_cores_to_rank), openssh-server + pdsh (the multi-node launch test), slurm-wlm + munge +
# openmpi-bin (the SLURM and mpirun launch tests: a one-machine SLURM the test starts, docs/launch.md).
APT_PACKAGES := dataset-fashion-mnist pkg-config libopencv-dev libturbojpeg0-dev numactl openssh-server pdsh \
	slurm-wlm munge openmpi-bin

.PHONY: setup lint test test-fast demo ablation bench clean constraints
setup: $(VENV)/.done

# setup.cfg states compatible ranges; constraints.txt the exact versions the tests ran with, which every install here
# is held to (pip install -c), so a fresh setup reproduces them.
$(VENV)/.done: setup.cfg setup.py constraints.txt
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# torch first, the pair in constraints.txt (one that works with timm's torchvision import).
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e ".[teachers,data,dev]"
	# DeepSpeed JIT-compiles its shared-memory comm op at the first init on CPU; do it once here.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

# After a deliberate upgrade in .venv: record its exact versions as the new constraints (the project itself left out).
constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(VENV)/.done

# The linter's settings are in ruff.toml; it runs first, so a test run also reports an unused import or a stray name.
lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PYTEST) -rs --durations=15 tests

test-fast: setup lint
	$(PYTEST) -m "not slow" tests

demo: setup
	bash scripts/demo.sh

# The paper's ablations (docs/demo.md): VQ-KD vs pixel targets, with vs without the aggregation head, ImageNet vs
# random teacher; MIM seeds x rows at one budget, one rank on both cores; runs/ablation/results.json + report.md.
# ABLATION_ARGS passes flags, e.g. ABLATION_ARGS="--seeds=1 --mim_steps=50". A rerun skips finished pieces.
ablation: setup
	OMP_NUM_THREADS=2 $(PY) scripts/ablation.py --out=runs/ablation $(ABLATION_ARGS)

# Loader, tokenizer and pretraining benchmarks at the device's sizes (CPU here, GPU on a CUDA host): one JSON and one
# Markdown table in bench/results (docs/bench.md).
bench: setup
	$(PY) -m bench.suite

clean:
	rm -rf runs .pytest_cache
