# Two commands set up and use a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CONFIG ?= config.yaml
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: run test install install-test system-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

system-deps: $(VENV)/.installed
	@$(PY) -m dicom_node.tools --install
	@bash tests/viewer/install_ohif.sh

test: install-test system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install-test system-deps
	$(PY) benchmarks/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info
