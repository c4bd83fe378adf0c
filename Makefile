# cradle — the two set-up commands are `make serve` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
CONFIG  ?=
PYTEST_ARGS ?=
DEMO_DIR ?= var/demo

.PHONY: install dev serve test test-quick demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip setuptools wheel
	$(VENV)/bin/pip install --quiet -e '.[postgres]'
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[dev,postgres]'
	touch $@

dev: $(VENV)/.dev-installed

serve: install
	$(VENV)/bin/cradle serve $(if $(CONFIG),--config $(CONFIG))

# two xdist workers, a module per unit of work, the longest first: tests/conftest.py
# OMP_WAIT_POLICY=PASSIVE: two trainings at once share the cores instead of spinning against each other
# (each 4.7x slower than alone when spinning, 1.5x when passive)
test: dev
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-quick: dev
	$(VENV)/bin/pytest -m "not slow and not browser" $(PYTEST_ARGS)

# the guided synthetic demo (needs only `make install`; DCMTK's storescu is used when installed)
demo: install
	$(VENV)/bin/cradle demo --workdir $(DEMO_DIR)

bench: dev
	$(VENV)/bin/python -m benchmarks.ingest

clean:
	rm -rf $(VENV) var build *.egg-info
