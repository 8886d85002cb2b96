# lookalike: the two commands for a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-images
# Exact versions of every installed distribution, written by `make lock` from a working venv.
CONSTRAINTS := constraints.txt
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-m "not browser"'
PYTEST_ARGS ?=
# pytest-xdist worker processes for make test; each test file runs whole on one worker
# (--dist loadfile: module fixtures are built once), and each worker starts its own MariaDB and
# Prefect test server (tests/conftest.py). A fixed 2 rather than -n auto: the suite is sized for
# a 2-core machine and every worker holds TensorFlow and two servers. 0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: install lock demo test lint services schema clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c $(CONSTRAINTS) pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Pin what the venv holds now (after changing pyproject.toml: install, test, then lock).
# No dependency on install: locking only reads the venv, it never changes it.
lock:
	@test -x $(BIN)/python || { echo "no venv at $(VENV): run make install first" >&2; exit 1; }
	{ echo "# Exact versions for pip install -c $(CONSTRAINTS); written by make lock, do not edit."; \
	  $(BIN)/python -m pip freeze --all --exclude-editable \
	    --exclude lookalike --exclude setuptools --exclude wheel; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

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
	@status=0; $(BIN)/python -m pytest -q -p no:cacheprovider \
	  -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || status=$$?; \
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
