# Two commands on a fresh clone: `make run` and `make test`. Both build what they need.
PYTHON ?= python3
# The pinned set (constraints.txt) needs Python 3.11 or newer: numpy 2.3+ and onnxruntime 1.24+ have no
# 3.10 builds (3.10 reached its end of life in October 2026). Say so before pip's resolver does.
NAME_ANOTHER = Name another, e.g. make $(or $(MAKECMDGOALS),run) PYTHON=python3.12
CHECK_PYTHON = command -v $(PYTHON) >/dev/null 2>&1 || { \
	echo "edlight needs Python 3.11 or newer; $(PYTHON) was not found. $(NAME_ANOTHER)" >&2; exit 1; }; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	echo "edlight needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1). $(NAME_ANOTHER)" >&2; exit 1; }
VENV := .venv
ENGINE_VENV := .venv-engine
export HF_HUB_OFFLINE := 1

.PHONY: help install install-engine run test test-full test-torchfree lint model upgrade clean

help:
	@echo "make run        caption examples/ with the bundled model (builds .venv-engine: engine only, no torch)"
	@echo "make test       the whole suite in .venv, then the engine suite again in .venv-engine (no torch)"
	@echo "make install    build .venv: everything, pinned by constraints.txt"
	@echo "make install-engine  build .venv-engine only"
	@echo "make lint       ruff and mypy"
	@echo "make model      rebuild engine/default_bundle from the generator (fixed seeds)"
	@echo "make upgrade    re-resolve the newest allowed versions into constraints.txt"
	@echo "make clean      remove the virtual environments and build/"
	@echo "Without a local torch wheel: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make test"

install: $(VENV)/.installed

# Everything: engine, training, export, dev tools, pinned by constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[all]'
	touch $@

# The base install only (no torch/transformers/optimum): what an ops person deploys.
install-engine: $(ENGINE_VENV)/.installed
$(ENGINE_VENV)/.installed: pyproject.toml constraints.txt
	@$(CHECK_PYTHON)
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/pip install -q --upgrade pip
	$(ENGINE_VENV)/bin/pip install -q -c constraints.txt -e . pytest
	touch $@

# The main job: caption the sample folder with the bundle shipped in the package, no torch installed.
run: $(ENGINE_VENV)/.installed
	$(ENGINE_VENV)/bin/edlight caption examples/ --out captions.jsonl --overwrite
	@cat captions.jsonl

test: test-full test-torchfree

# In one worker process per CPU (pytest-xdist), a test file to a worker: most of the suite waits on
# subprocesses importing torch, one core each. The tiny model's fixtures are built once for all workers.
test-full: $(VENV)/.installed
	$(VENV)/bin/pytest -q -n auto --dist loadfile tests

# The same engine tests again where torch, transformers and optimum are absent.
test-torchfree: $(ENGINE_VENV)/.installed
	$(ENGINE_VENV)/bin/pytest -q tests/torchfree

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Rebuild the default bundle shipped in engine/default_bundle from the generator, with fixed seeds.
model: $(VENV)/.installed
	$(VENV)/bin/python -m train.make_model

# Re-resolve the newest versions allowed by pyproject's ranges and re-pin them.
upgrade:
	rm -rf build/upgrade-venv
	$(PYTHON) -m venv build/upgrade-venv
	build/upgrade-venv/bin/pip install -q --upgrade pip
	build/upgrade-venv/bin/pip install -q 'torch==2.13.0+cpu' -e '.[all]'
	{ echo "# The exact tested set. Refresh with \`make upgrade\`. torch must stay pinned: an unpinned torch pulls a multi-GB CUDA build."; \
	  build/upgrade-venv/bin/pip freeze --exclude-editable | grep -vi '^edlight'; } > constraints.txt
	rm -rf build/upgrade-venv

clean:
	rm -rf $(VENV) $(ENGINE_VENV) build *.egg-info
