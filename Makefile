# The two set-up commands of the README: `make train` (the main job) and `make test`.
# Each creates .venv on first use and installs what it needs into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that lies on the project's machines (pip takes it from the local wheel
# folder instead of downloading a multi-GB CUDA build). On a GPU machine install torch yourself first.
TORCH ?= torch==2.13.0
# `make train` runs one process; accelerate's defaults passed explicitly (else it warns on every run), --quiet so a
# failed run shows the recipe's own error, not accelerate's CalledProcessError too. Several GPUs:
# make train ACCELERATE_ARGS="--multi_gpu --num_processes 4 --num_machines 1 --mixed_precision no --dynamo_backend no"
ACCELERATE_ARGS ?= --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: test train

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

train: $(VENV)/.installed
	$(VENV)/bin/accelerate launch --quiet $(ACCELERATE_ARGS) \
		recipes/train_ptb.py recipes/configs/ptb_basis_output.yaml $(ARGS)
