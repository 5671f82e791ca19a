# The two set-up commands of this project: `make demo` and `make test`.
# Both install everything into .venv first; nothing else is needed on a fresh
# Debian machine with Python 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SYSTEM_STAMP := $(VENV)/.test-system
FMNIST_DIR := /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/demo

.PHONY: install demo test tensorboard clean gpu-suite-prep

install: $(STAMP)

# What the stages need (no torch, no transformers): all `make demo` installs.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@if [ ! -d $(FMNIST_DIR) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || \
	     (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; \
	  else \
	    echo "note: $(FMNIST_DIR) missing and apt not usable; Fashion-MNIST tests will be skipped"; \
	  fi; \
	fi
	touch $(STAMP)

# The test extra on top: libtpu, pytest, torch + transformers (Hugging Face round trips), ...
# torch first, as PyTorch's CPU build: PyPI's Linux wheel is the CUDA one (several GB). Where
# PyTorch's index cannot be reached pip says so and goes on with the other indexes (a local
# CPU wheel, or PyPI's). The pin is setup.py's (TORCH_PIN there).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_PIN = $(shell sed -n 's/^TORCH_PIN = "\(.*\)".*/\1/p' setup.py)
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --retries 1 --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

demo: install
	$(PY) -m igpt_jax.main --config=configs/demo.py --config.stage=all --workdir=$(WORKDIR)

# The tests start a real SLURM on localhost (slurm-wlm + munge from Debian, as root).
$(SYSTEM_STAMP): Makefile $(STAMP)
	@if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/munged ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge || \
	     (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge)) >/dev/null \
	    || echo "note: could not install slurm-wlm and munge; the SLURM test will be skipped"; \
	  else \
	    echo "note: slurm-wlm/munge missing and apt not usable as root; the SLURM test will be skipped"; \
	  fi; \
	fi
	touch $(SYSTEM_STAMP)

# Two pytest runs: tests that load libtpu or the CUDA plugin (marker own_process) run apart
# from the rest, whose CPU runtime never shares a process with theirs. Both always run. The rest
# runs on TEST_WORKERS pytest-xdist workers, a test file each (its module fixtures built once):
# most tests wait on processes they start, so two workers keep two cores busy.
TEST_WORKERS ?= 2
test: $(TEST_STAMP) $(SYSTEM_STAMP)
	status=0; \
	$(PY) -m pytest -q -m "not own_process" -n $(TEST_WORKERS) --dist loadfile tests || status=$$?; \
	$(PY) -m pytest -q -m own_process tests || status=$$?; \
	exit $$status

tensorboard: install
	$(VENV)/bin/tensorboard --logdir $(WORKDIR) --port $${PORT:-6006}

clean:
	rm -rf $(VENV) runs

# What benchmarks/gpu_suite.py needs on a GPU machine that has JAX with CUDA and little else:
# real images as a prepared set, and pure-Python packages for --site (see the script's doc).
gpu-suite-prep: install
	$(PY) benchmarks/gpu_suite.py --prepare_images benchmarks/gpu_images
	$(PY) -m pip install --quiet --target .gpu_site --no-deps ml_collections absl-py PyYAML
