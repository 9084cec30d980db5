# rbstream — the README's commands. Every target bootstraps its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RB     := $(VENV)/bin/rbstream
STAMP  := $(VENV)/.installed
# Real sample alerts live beside the checkout (../shared/data); override with SAMPLE_DATA=...
SAMPLE_DATA ?= $(abspath ../shared/data)
export RBSTREAM_SAMPLE_DATA := $(SAMPLE_DATA)

.PHONY: venv test run train kafka bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,explain,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

run: $(STAMP)
	$(RB) run --samples $(SAMPLE_DATA)

train: $(STAMP)
	$(RB) train --defaults

kafka: $(STAMP)
	$(RB) broker

bench: $(STAMP)
	$(RB) bench all --out bench-results

clean:
	rm -rf $(VENV) runs bench-results .pytest_cache
