# CPU image by default; for GPUs build FROM a CUDA runtime image and install torch for it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# Pin torch first (point pip at a CPU-only wheel index for small CPU images).
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY model ./model
COPY kernels ./kernels
COPY service ./service
RUN pip install .

RUN useradd --create-home skipdit
USER skipdit

EXPOSE 8000 9100
# API (embedded worker when SKIPDIT_REDIS_URL is unset); `skipdit worker` for Redis workers.
CMD ["skipdit", "serve", "--host", "0.0.0.0"]
