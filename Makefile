# Two entry points for newcomers: `make pretrain` and `make test`. Both set up .venv first
# (idempotent: reinstalls only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shakespeare_char.yaml
# Dotted overrides for pretrain, e.g. make pretrain ARGS="train.steps=100 run.dir=runs/short"
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup pretrain lint test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,tpu,hf]'
	touch $@

pretrain: setup
	$(VENV)/bin/podtrain pretrain --config $(CONFIG) $(ARGS)

# The rooms as installed (pyproject.toml's package-dir): import-linter reads a package from one
# folder, so `lint` checks a tree of links laid out like the wheel (podtrain/model -> model, ...).
ROOMS = $(shell $(PY) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['tool']['setuptools']['package-dir']; print(' '.join(v for k, v in d.items() if k != 'podtrain'))")
LINT_TREE := build/lint

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/podtrain
	@for f in podtrain/*.py $(ROOMS); do ln -s "$(CURDIR)/$$f" $(LINT_TREE)/podtrain/; done
	cd $(LINT_TREE) && PYTHONPATH=. "$(CURDIR)/$(VENV)/bin/lint-imports" "$(CURDIR)/pyproject.toml"

# pytest exits 5 when it collects no tests: that fails here like any other error, and says so.
test: lint
	@status=0; $(PY) -m pytest -n 2 -q $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

bench: setup
	$(PY) bench/train_throughput.py
