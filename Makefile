# Setup + run targets. `make demo` and `make test` are the README's two quickstart commands.
#
# TORCH_SPEC selects the torch build installed BEFORE rlflow (so pip never picks a CUDA build for you):
#   CPU machines of this project: torch==2.13.0 (a CPU wheel on local disk)
#   elsewhere, CPU only:          make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
#   GPU machines:                 install your CUDA torch into the venv first, then: make test TORCH_SPEC=
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,mujoco,diffusers,deepspeed
BIN := $(VENV)/bin

.PHONY: demo toy test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install --disable-pip-version-check -q $(TORCH_SPEC); fi
	$(BIN)/pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	@touch $@

install: $(VENV)/.installed-$(EXTRAS)

# ReinFlow fine-tuning of the shipped Hopper base flow policy (~10 min on 2 CPU cores).
demo: install
	MUJOCO_GL=egl OMP_NUM_THREADS=1 $(BIN)/rlflow ppo --config recipes/robotics/hopper_reinflow.yaml

# Flow matching on a 2-D toy mixture (~30 s).
toy: install
	OMP_NUM_THREADS=2 $(BIN)/rlflow pretrain --config recipes/toy/flow_matching_2d.yaml

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check rlflow envs reward_models tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
