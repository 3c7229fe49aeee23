# lcinfer: `make demo` runs the default job, `make test` runs the CPU test suite.
# Both create .venv from a Python >= 3.12 when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HF_VENV ?= .venv-hf

# A Python >= 3.12 (3.12 preferred: the GPU machines run it): on PATH, else pyenv's installed versions.
FIND_PYTHON = for c in python3.12 python3.13 python3; do \
    p=$$(command -v $$c 2>/dev/null) || continue; \
    $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
  done; \
  root=$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv); \
  for p in $$(ls -d $$root/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do \
    $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
  done; exit 1

.PHONY: venv demo test test-gpu fixtures bench clean

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  py=$$($(FIND_PYTHON)) || { echo "error: lcinfer needs Python >= 3.12 (jax 0.11 requires it)." >&2; \
	    echo "Install one, e.g. 'pyenv install 3.12' or your OS package python3.12 (with venv), then rerun." >&2; exit 1; }; \
	  echo "creating $(VENV) with $$py"; $$py -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/lcinfer demo

test: venv
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
	  $(PY) -m pytest tests -m "not gpu" $(PYTEST_ARGS)

# On a GPU machine (the device tool): the GPU-only tests, compiled, not interpreted.
test-gpu:
	python3 -m pytest tests -m gpu $(PYTEST_ARGS)

# Rebuild the committed HF reference fixtures (needs torch; Python 3.11 CPU wheel).
fixtures:
	@[ -x $(HF_VENV)/bin/python ] || { python3 -m venv $(HF_VENV) && \
	  $(HF_VENV)/bin/pip install -q torch==2.13.0 && \
	  $(HF_VENV)/bin/pip install -q transformers==5.23.0 sentencepiece tokenizers protobuf; }
	$(HF_VENV)/bin/python tests/fixtures/build_hf_fixtures.py

bench:
	PYTHONPATH=. python3 benchmarks/prefill_decode.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
