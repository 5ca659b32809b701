# Setup + run targets. `make demo` and `make test` are the README's two quickstart commands.
#
# TORCH_SPEC selects the torch build installed BEFORE rlflow (so pip never picks a CUDA build for you):
#   CPU machines of this project: torch==2.13.0 (a CPU wheel on local disk)
#   elsewhere, CPU only:          make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
#   GPU machines:                 install your CUDA torch into the venv first, then: make test TORCH_SPEC=
#
# Installs are per set of extras, each with its own stamp in the venv: `make demo` installs rlflow[mujoco]
# only, `make toy` the core only, `make test` / `make install` the extras in EXTRAS. A stamp newer than
# pyproject.toml that already covers the extras asked for (e.g. after `make test`) skips pip altogether.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,mujoco,manipulation,diffusers,deepspeed
DEMO_EXTRAS := mujoco
BIN := $(VENV)/bin

# Threads: torch threads x busy processes must not exceed the cores. Each target below runs one process
# at a time (pytest runs without xdist; its two-process distributed tests set OMP_NUM_THREADS=1 per
# process while pytest waits), so it gets min(cores, 2) threads: these small models gain nothing from
# more, and on a shared 2-core machine two threads per process is already the limit.
NPROC := $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
THREADS ?= $(shell n=$(NPROC); [ "$$n" -gt 2 ] 2>/dev/null && n=2; echo $$n)

.PHONY: demo toy test coverage install install-demo install-core lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# $* is a comma-separated list of extras ("core": none).
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	@for stamp in $(VENV)/.installed-*; do \
		[ -f "$$stamp" ] && [ "$$stamp" -nt pyproject.toml ] || continue; \
		have=",$${stamp##*/.installed-},"; covered=1; \
		for extra in $$(echo "$*" | tr , ' '); do \
			case "$$extra" in core) ;; *) case "$$have" in *",$$extra,"*) ;; *) covered=0 ;; esac ;; esac; \
		done; \
		if [ $$covered = 1 ]; then touch $@; exit 0; fi; \
	done; \
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install --disable-pip-version-check -q $(TORCH_SPEC) || exit 1; fi; \
	if [ "$*" = core ]; then spec="."; else spec=".[$*]"; fi; \
	echo "$(BIN)/pip install -q -e \"$$spec\""; \
	$(BIN)/pip install --disable-pip-version-check -q -e "$$spec" && touch $@

install: $(VENV)/.installed-$(EXTRAS)
install-demo: $(VENV)/.installed-$(DEMO_EXTRAS)
install-core: $(VENV)/.installed-core

# ReinFlow fine-tuning of the shipped Hopper base flow policy (~10 min on 2 CPU cores); the recipe runs
# one torch thread (its 8 environments step in the same process).
demo: install-demo
	MUJOCO_GL=egl OMP_NUM_THREADS=1 $(BIN)/rlflow ppo --config recipes/robotics/hopper_reinflow.yaml

# Flow matching on a 2-D toy mixture (~30 s).
toy: install-core
	OMP_NUM_THREADS=$(THREADS) $(BIN)/rlflow pretrain --config recipes/toy/flow_matching_2d.yaml --num_threads $(THREADS)

test: install
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q

# The suite with line coverage of rlflow, subprocesses included ([tool.coverage] in pyproject.toml; ~1.3x slower).
coverage: install
	rm -rf .coverage && mkdir -p .coverage
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q --cov --cov-report=term --cov-report=json:.coverage/coverage.json

lint: install
	$(BIN)/ruff check rlflow envs reward_models tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
