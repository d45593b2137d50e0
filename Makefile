# The two commands a new user needs: `make demo` and `make test`. Both run the set-up first
# (scripts/setup.sh: idempotent, a few seconds once everything is installed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean-demo

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	@bash scripts/demo.sh

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-demo:
	rm -rf demo
