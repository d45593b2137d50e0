# The two commands a new user needs: `make demo` and `make test`. Both run the set-up first
# (scripts/setup.sh: idempotent, a few seconds once everything is installed).
VENV ?= .venv
PY := $(VENV)/bin/python
# The slowest tests are listed at the end of every run, and why each skipped test was skipped.
PYTEST_ARGS ?= -ra --durations=25

.PHONY: setup test test-fresh lint demo bench clean-demo

setup:
	@bash scripts/setup.sh

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# `make test` as a new machine meets it: a fresh clone of the committed HEAD (so no .venv) with every cache
# empty (the Horovod wheel, the container base image, podman's image store, pip's cache), all in one
# temporary folder that is removed afterwards; system packages already installed stay. Prints the wall
# time, set-up included.
test-fresh:
	@fresh=$$(mktemp -d); trap 'rm -rf "$$fresh"' EXIT; started=$$(date +%s); \
	git clone --quiet . "$$fresh/hpcgan" && \
	HPCGAN_CACHE=$$fresh/cache PIP_CACHE_DIR=$$fresh/pip $(MAKE) --no-print-directory -C "$$fresh/hpcgan" test \
		PYTEST_ARGS="$(PYTEST_ARGS)"; \
	status=$$?; seconds=$$(( $$(date +%s) - started )); \
	echo "test-fresh: exit $$status after $$((seconds / 60)) min $$((seconds % 60)) s, set-up included"; \
	exit $$status

# Python: ruff check and ruff format --check (configuration in pyproject.toml); shell: every script
# parses and passes shellcheck (tests/cluster/test_shell_scripts.py). `make test` runs it first.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests/cluster/test_shell_scripts.py

# `make demo QUICK=1`: the same demo stopped at step 300 (about a minute); a later `make demo` continues it.
demo: setup
	@HPCGAN_DEMO_QUICK=$(QUICK) bash scripts/demo.sh

bench: setup
	@for b in $(filter-out benchmarks/harness.py benchmarks/bare_stylegan2.py,$(wildcard benchmarks/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

clean-demo:
	rm -rf demo
