# fastlaion: `make demo` and `make test` work on a fresh Debian/Ubuntu machine with nothing
# installed by hand: they install the system library and a virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastlaion-installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test test-all bench clean

setup: $(STAMP)

# libjpeg-turbo's TurboJPEG API (PyTurboJPEG loads it at run time).
system-deps:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || ! command -v apt-get >/dev/null 2>&1 || { echo "installing python3-venv (Debian's python3 makes no virtual environment without it)"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv; }
	@if ! ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so'; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing libturbojpeg0 with apt-get"; \
	    $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libturbojpeg0; \
	  else echo "please install libjpeg-turbo's TurboJPEG library (libturbojpeg)" >&2; exit 1; fi; \
	fi
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { echo "installing gcc (fastlaion extract builds its compiled WAT reader on first use; without it, the slower Python path)"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q gcc libc6-dev; }
	@command -v openssl >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { echo "installing openssl (the HTTPS tests make their certificates with it)"; $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q openssl; }
	@# Debian's package; Ubuntu has none of that name (its chromium-browser is a snap): there the
	@# one test that opens the HTML report in chromium skips, and the set-up goes on.
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	  if apt-cache show chromium >/dev/null 2>&1; then echo "installing chromium (the HTML report test opens the page in it)"; \
	    $(SUDO) apt-get install -y -q chromium; \
	  else echo "no apt package 'chromium' here: the HTML report test looks for chromium-browser or google-chrome, or CHROMIUM=/path"; fi; }

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/fastlaion demo -o fastlaion-demo

# Two pytest processes, each taking whole test files (their module fixtures, such as test_ray's
# cluster, start once): about two-thirds of one process's time on 2 cores (9.5 -> 6 minutes when
# the suite was smaller; `make test` is now about 8, install included: 6.5 min of tests on a quiet box). TEST_PROCESSES=0 runs in one.
TEST_PROCESSES ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

test-all: setup
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile -m "not gpu"

bench: setup
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) fastlaion-demo .pytest_cache .cache build dist *.egg-info
