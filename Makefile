# The README's commands. `make demo` and `make test` each work as the first command after `git clone`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.msov-setup
# torch is installed first, pinned, so nothing resolves a bare `torch` to the CUDA build.
TORCH  := torch==2.13.0

.PHONY: setup demo test lint bench bench-profile bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/msov demo

# Two workers on CI's two cores, one test file each at a time (a file's module fixtures are built once); more on a
# bigger machine, capped: every worker trains tiny models with torch's own threads.
test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=25

# The TRL arms run only where trl imports: BENCH_PY=/path/to/a/venv-with-trl/bin/python (see bench/throughput.py).
BENCH_PY ?= $(BIN)/python

bench: setup
	$(BENCH_PY) bench/throughput.py

# Where one msov training step spends its time (torch.profiler, CPU), by op family.
bench-profile: setup
	$(BIN)/python bench/profile_step.py

# On a machine with a CUDA GPU: builds its own venv, results in $$OUT (default ./gpu-results).
bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
