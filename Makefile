# Quickstart: `make demo` runs the main job, `make test` runs the test suite.
# Each target creates .venv (if missing) and installs the exact pins in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
XDIST ?= -n 2

.PHONY: demo demo-math test bench clean venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,hf,demo]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m jaxalign.demo

demo-math: $(STAMP)
	$(PY) -m jaxalign.demo --task math

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests

bench: $(STAMP)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_steps.py
	$(PY) benchmarks/bench_rlhf.py
	$(PY) benchmarks/bench_lora.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
