# Everything a fresh machine needs: `make test` and `make serve` create the virtualenv,
# install pinned dependencies and fetch the default model themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q

HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: install kernels test model serve clean

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

# Compile the native CPU kernels once (cached in $$TOKENLOOM_HOME/kernels; a no-op when built).
# Where they cannot be built, the engine runs its plain PyTorch paths instead.
kernels: install
	$(PY) -c "from tokenloom import kernels; print('tokenloom kernels:', 'ready' if kernels.available() else 'unavailable, using plain PyTorch')"

test: install model kernels
	$(PY) -m pytest $(PYTEST_ARGS)

# Start the OpenAI-compatible server on the default model (Ctrl-C stops it).
serve: install model kernels
	@echo "tokenloom: starting the OpenAI-compatible server at http://$(HOST):$(PORT)/v1"
	@echo "  (ready once the log says 'Application startup complete')"
	@echo "  try: curl http://$(HOST):$(PORT)/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "         -d '{\"model\": \"smollm2-135m\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'"
	$(VENV)/bin/tokenloom serve smollm2-135m --host $(HOST) --port $(PORT) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
