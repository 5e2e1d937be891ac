# Two stages: the builder makes a venv (torch first, then the package), the final image gets only
# that venv, run by a non-root user. The shipped models are package data of `model`
# (model/weights), so they land in the venv with it.
#
# CPU image (default):
#   docker build -t skipdit-serve:0.1.0 .
# GPU workers: torch's CUDA wheels carry the CUDA libraries, so the CUDA wheel index is enough:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#     -t skipdit-serve:0.1.0-cuda .
# BASE_IMAGE swaps the base of both stages (e.g. a CUDA runtime image with Python): it must have
# python3 >= 3.11 with venv, at the same path in both, since the venv links to that interpreter.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index: a bare "torch" requirement from PyPI is the multi-GB CUDA build,
# and `pip install .` below then finds its torch requirement met.
RUN pip install --index-url "$TORCH_INDEX" torch==2.13.0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY kernels ./kernels
COPY service ./service
# Not editable: the packages and their data go into the venv's site-packages.
RUN pip install .

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 --user-group skipdit
COPY --from=builder /opt/venv /opt/venv
# Numeric, so that a runtime (k8s runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /home/skipdit

EXPOSE 8000 9100
# Liveness of the API on SKIPDIT_PORT (the slim image has no curl). A worker container
# (`docker run IMAGE worker`) serves no API: give it its own check on SKIPDIT_METRICS_PORT, as
# docker-compose.yml does.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SKIPDIT_PORT', '8000'), timeout=4)"]
# `docker run IMAGE` serves the API (with an embedded worker when SKIPDIT_REDIS_URL is unset);
# `docker run IMAGE worker` runs a Redis worker; any other `skipdit` subcommand works the same way.
ENTRYPOINT ["skipdit"]
CMD ["serve", "--host", "0.0.0.0"]
