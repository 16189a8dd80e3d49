# Two commands: `make demo` and `make test`. Each creates .venv when it is missing, installs
# torch==2.13.0 first (a plain `torch` requirement would pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specdec-installed
# The checkout's top-level kernels/ (installed as specdec.kernels) would shadow Hugging Face's `kernels`
# package, which transformers >= 5.25 imports, wherever the working folder is on sys.path (`python -m`
# puts it there): keep it off for every command and the processes they start (Python >= 3.11).
export PYTHONSAFEPATH := 1

.PHONY: test test-gpu gpu-site demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,train,gpu,plots]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# On a CUDA machine whose python3 has torch, triton and transformers (the device image: no venv, no
# network): every test marked gpu, under CUDA graphs and the Triton kernels. specdec is put on the path
# as its installed layout (specdec.heads, .training, .kernels, .conf) without pip (-P: not the checkout).
# `make gpu-site` lays that path out alone (for benchmarks: PYTHONPATH=/tmp/specdec-gpu-site python3 -P ...).
GPU_SITE := /tmp/specdec-gpu-site
gpu-site:
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE) && cp -r specdec $(GPU_SITE)/
	for d in heads training kernels conf assets data; do ln -s $(CURDIR)/$$d $(GPU_SITE)/specdec/$$d; done

test-gpu: gpu-site
	PYTHONPATH=$(GPU_SITE) SPECDEC_DEMO_DIR=$(CURDIR)/assets/demo $(PYTHON) -P -m pytest -q -p no:cacheprovider -m gpu tests

demo: $(STAMP)
	$(PY) -m specdec.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
