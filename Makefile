# lookalike: the two commands for a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-images
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-m "not browser"'
PYTEST_ARGS ?=

.PHONY: install demo test lint services schema clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python scripts/make_demo_images.py $(DEMO_DIR)
	$(BIN)/lookalike process $(DEMO_DIR) --weights none

# Installs missing test programs (MariaDB server binaries, Chromium), through sudo if needed.
services:
	scripts/ensure_services.sh

# The suite starts its own throwaway MariaDB server; missing programs are installed only when
# running as root, otherwise this stops with one line asking for `sudo make services`.
# pytest's exit status 5 means it collected no tests: a failure here, said in words.
test: install
	scripts/ensure_services.sh --no-sudo
	@status=0; $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) || status=$$?; \
	if [ $$status = 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$status

lint: install
	$(BIN)/python -m ruff check flows tasks api sql tests benchmarks scripts
	@# mypy sees the folders under the import names they are installed as (lookalike.*).
	@mkdir -p .typecheck/lookalike
	@for d in tasks flows api sql; do ln -sfn ../../$$d .typecheck/lookalike/$$d; done
	MYPYPATH=.typecheck $(BIN)/python -m mypy -p lookalike

schema: install
	$(BIN)/python -m lookalike.sql.schema > sql/mariadb.sql

clean:
	rm -rf data $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
