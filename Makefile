# One command creates the environment from the repository alone and runs the tests: `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test gpu-check clean

# The environment is complete when this stamp exists: it is written only after the dev install, so a
# .venv made another way (the README's quickstart installs `.` without the dev extras) still gets them.
STAMP := $(VENV)/.dheads-dev-installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of exactly this torch is on every dev/CI machine; any other spec downloads CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(STAMP)

# The stamp may outlive what it vouches for (pytest uninstalled by hand): reinstall when pytest or the
# editable package does not import.
test: venv
	@$(BIN)/python -c "import pytest, dheads.engine" 2>/dev/null || { rm -f $(STAMP); $(MAKE) venv; }
	$(BIN)/python -m pytest -q

# On a GPU machine, one command: the GPU and TensorRT tests (they export a small bundle and build its plan),
# then PyTorch, ONNX Runtime (CUDA provider) and TensorRT side by side on the full-size model, into
# benchmarks/results/gpu_<date>.{json,md} (benchmarks/gpu_check.py). GPU_PY is a Python that has
# dheads[dev] installed over a CUDA build of torch (on CI/dev machines .venv holds the CPU wheel).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -m dheads.benchmarks.gpu_check --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
