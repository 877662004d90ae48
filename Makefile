# mmlora: `make demo` runs the embedded default, `make test` the whole test suite CI runs.
# Both set up .venv first (a no-op when it is up to date with pyproject.toml and constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmlora-installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $@

test: setup
	$(OFFLINE) $(PY) -m pytest

test-fast: setup
	$(OFFLINE) $(PY) -m pytest -m "not slow" -x -q

demo: setup
	$(OFFLINE) $(VENV)/bin/mmlora demo

clean:
	rm -rf .cache build *.egg-info
