# pyrovm: `make demo` boots the test guest, `make test` runs every test (as CI does).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-deps.sh
	scripts/install-deps.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Boot the test guest and show its console.  The guest reports success by writing 0 to the exit port,
# which pyrovm turns into exit status (0 << 1) | 1 = 1, as QEMU's isa-debug-exit does.
demo: setup
	$(VENV)/bin/pyrovm doctor
	$(VENV)/bin/pyrovm run --kernel "$$($(VENV)/bin/pyrovm guest build | tail -1)" --cmdline "test=hello"; \
	  status=$$?; [ $$status -eq 1 ] && echo "guest exited with status 0 (pyrovm exit code 1)" || exit $$status
	$(VENV)/bin/pyrovm run --kernel "$$($(VENV)/bin/pyrovm guest build | tail -1)" --cpus 4 \
	  --cmdline "test=cpus ncpus=4"; [ $$? -eq 1 ]

lint: setup
	$(VENV)/bin/ruff check src tests bench fuzz
	$(VENV)/bin/mypy src

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/exits.py

clean:
	rm -rf $(VENV) build *.egg-info
