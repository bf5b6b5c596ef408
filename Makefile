# Two commands on a fresh machine: `make demo` (the main job) and `make test`
# (the suite and a strict build of the docs).
# Both bootstrap .venv idempotently.  torch is pinned to the build on this machine's
# disk; an unpinned torch would pull a multi-GB CUDA wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-subinterpreters bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,ray]"   # ray: so the suite runs tests/test_ray.py
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multipy demo

# The suite runs once on the C call channel (multipy._native, built by `pip install -e .`
# where a compiler exists) and once more with MULTIPY_NATIVE=0 on the pure-Python path.
# Running everything twice would pass ~10 minutes on 2 cores, so the second run takes the
# modules that exercise the transport and the process backend: NATIVE_OFF_TESTS.
NATIVE_OFF_TESTS := tests/test_channel.py tests/test_transport.py tests/test_reliability.py tests/test_manager.py \
	tests/test_futures.py tests/test_in_flight.py tests/test_codec.py tests/test_odd_arguments.py \
	tests/test_whole_call.py tests/test_call_races.py

# The first run: the tests and the docstring examples (testpaths and --doctest-modules in pyproject.toml).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"
	MULTIPY_NATIVE=0 $(PY) -m pytest -q -m "not slow" $(NATIVE_OFF_TESTS)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site
	$(MAKE) --no-print-directory test-subinterpreters

# The subinterpreter backend needs CPython 3.13+ (no torch there); pyenv provides one
# on these machines.  It gets its own small venv; skipped with a message when absent.
# A test still running after 240 s has every host thread's stack written by faulthandler
# (faulthandler_timeout): pytest-timeout's own report at 300 s walks the running
# subinterpreters' threads too (sys._current_frames) and aborts CPython 3.13.
PY313 ?= $(shell (pyenv prefix 3.13.0 2>/dev/null || ls -d $$HOME/.pyenv/versions/3.13* 2>/dev/null) | head -n 1)
VENV313 := .venv313

test-subinterpreters:
	@if [ -x "$(PY313)/bin/python3" ]; then \
		[ -x $(VENV313)/bin/python ] || $(PY313)/bin/python3 -m venv $(VENV313); \
		$(VENV313)/bin/python -m pip install -q pytest pytest-timeout hypothesis && \
		$(VENV313)/bin/python -m pip install -q --no-deps -e . && \
		$(VENV313)/bin/python -m pytest -q -p no:cacheprovider --noconftest --timeout=300 -o faulthandler_timeout=240 tests/test_subinterpreter.py tests/test_subinterpreter_interrupts.py; \
	else echo "skipped: no CPython 3.13 found (pyenv prefix 3.13.0) for the subinterpreter tests"; fi

bench: $(STAMP)
	$(VENV)/bin/multipy bench smallops --max-interpreters 2 --csv benchmarks/smallops_cpu2.csv --plot benchmarks/smallops_cpu2.png

clean:
	rm -rf $(VENV) $(VENV313) build dist src/*.egg-info
