# `make test` and `make demo` do all set-up themselves: they create .venv if missing and install
# torch (pinned here, override with `make TORCH_SPEC=torch==2.13.0 test`), the test/demo
# requirements and this project (editable, --no-build-isolation, so the CUDA extension builds
# against the installed torch when it can).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst =,-,$(subst <,-,$(subst >,-,$(TORCH_SPEC))))

.PHONY: test demo install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml requirements-dev.txt
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	CUDA_HOME=$(CUDA_HOME) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m demo.train

clean:
	rm -rf build *.egg-info adam_mini_kernels/_C*.so demo/out
