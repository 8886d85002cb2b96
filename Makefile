# lookalike: the two commands for a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-images

.PHONY: install demo test test-fast lint services schema bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python scripts/make_demo_images.py $(DEMO_DIR)
	$(BIN)/lookalike process $(DEMO_DIR) --weights none

services:
	scripts/ensure_services.sh

test: install services
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check flows tasks api sql tests benchmarks scripts
	@# mypy sees the folders under the import names they are installed as (lookalike.*).
	@mkdir -p .typecheck/lookalike
	@for d in tasks flows api sql; do ln -sfn ../../$$d .typecheck/lookalike/$$d; done
	MYPYPATH=.typecheck $(BIN)/mypy -p lookalike

schema: install
	$(BIN)/python -m lookalike.sql.schema > sql/mariadb.sql

clean:
	rm -rf data $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
