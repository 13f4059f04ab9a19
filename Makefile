# Local development: `make run` starts the whole pipeline, `make test` runs the tests.
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON3 ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run test lint

run: $(STAMP)
	$(PYTHON) manage.py devstack

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check notifications project tests
	$(VENV)/bin/ruff format --check notifications project tests
	$(VENV)/bin/mypy notifications project

$(PYTHON):
	$(PYTHON3) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
