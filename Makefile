# The two set-up commands of this project: `make demo` and `make test`.
# Both install everything into .venv first; nothing else is needed on a fresh
# Debian machine with Python 3.11.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/demo

.PHONY: install demo test tensorboard clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
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

demo: install
	$(PY) -m igpt_jax.main --config=configs/demo.py --config.stage=all --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q tests

tensorboard: install
	$(VENV)/bin/tensorboard --logdir $(WORKDIR) --port $${PORT:-6006}

clean:
	rm -rf $(VENV) runs
