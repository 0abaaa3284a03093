# Everything a fresh machine needs: `make test` and (with the server issue) `make serve`
# create the virtualenv, install pinned dependencies and fetch the default model themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: install test model clean

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fetch the default model (SmolLM2-135M-Instruct Q4_1 GGUF) into $$TOKENLOOM_HOME once.
model: install
	$(PY) -c "from tokenloom.model_files import resolve_model; print(resolve_model('smollm2-135m'))"

test: install model
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
