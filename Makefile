# The two commands a new user needs: `make demo` and `make test`. Both run the set-up first
# (scripts/setup.sh: idempotent, a few seconds once everything is installed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint demo bench clean-demo

setup:
	@bash scripts/setup.sh

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Python: ruff check and ruff format --check (configuration in pyproject.toml); shell: every script
# parses and passes shellcheck (tests/test_shell_scripts.py). `make test` runs it first.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests/test_shell_scripts.py

demo: setup
	@bash scripts/demo.sh

bench: setup
	@for b in $(filter-out benchmarks/harness.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

clean-demo:
	rm -rf demo
