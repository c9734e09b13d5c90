# `make test` and `make demo` do all set-up themselves: they create .venv if missing and install
# torch (pinned here, override with `make TORCH_SPEC=torch==2.13.0 test`), the test/demo
# requirements and this project (editable, --no-build-isolation, so the CUDA extension builds
# against the installed torch when it can).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
# More requirements for an older stack, e.g. EXTRA_SPEC='numpy<2.3' with torch 2.11 (triton 3.6's
# interpreter breaks on numpy >= 2.3).
EXTRA_SPEC ?=
CUDA_HOME ?= /usr/local/cuda
PYTEST_ARGS ?=
# pytest-xdist workers: most tests are one Python thread (Triton's interpreter), so two workers
# on CI's two cores halve the suite's time (13 -> 8 min measured); 0 runs it in one process.
TEST_WORKERS ?= 2

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst =,-,$(subst <,-,$(subst >,-,$(TORCH_SPEC))))

.PHONY: test demo install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml requirements-dev.txt
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt $(if $(EXTRA_SPEC),"$(EXTRA_SPEC)")
	CUDA_HOME=$(CUDA_HOME) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m demo.train

clean:
	rm -rf build *.egg-info adam_mini_kernels/_C*.so demo/out
