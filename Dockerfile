# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t kubetune-operator .   slim Python, no torch
#   docker build --target trainer  -t kubetune-trainer  .   CUDA runtime + PyTorch + diffusers
# Both install exactly what uv.lock pins, run as a non-root user and start `kubetune`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_VERSION=0.13.9

# ---------------------------------------------------------------- operator: build
FROM ${PYTHON_IMAGE} AS operator-build
ARG UV_VERSION
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/kubetune
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project --extra operator
COPY api ./api
COPY operator ./operator
COPY cli ./cli
COPY trainer ./trainer
COPY demo ./demo
RUN uv sync --frozen --no-editable --extra operator

# ---------------------------------------------------------------- operator: runtime
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="Kopf operator for FineTuneJob resources"
RUN groupadd --system --gid 65532 kubetune \
 && useradd --system --uid 65532 --gid kubetune --no-create-home --shell /usr/sbin/nologin kubetune
COPY --from=operator-build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["kubetune"]
CMD ["operator"]

# ---------------------------------------------------------------- trainer: build
FROM ${CUDA_IMAGE} AS trainer-build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/kubetune \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON=3.11 UV_PYTHON_PREFERENCE=only-managed
# uv is one static binary: take the one the operator build installed (no apt, no pip here).
COPY --from=operator-build /usr/local/bin/uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
RUN uv python install 3.11 \
 && uv sync --frozen --no-install-project --extra trainer
COPY api ./api
COPY operator ./operator
COPY cli ./cli
COPY trainer ./trainer
COPY demo ./demo
RUN uv sync --frozen --no-editable --extra trainer

# ---------------------------------------------------------------- trainer: runtime
FROM ${CUDA_IMAGE} AS trainer
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="Diffusion fine-tuning trainer (diffusers + accelerate)"
RUN groupadd --system --gid 1000 kubetune \
 && useradd --system --uid 1000 --gid kubetune --create-home --home-dir /home/kubetune --shell /usr/sbin/nologin kubetune \
 && mkdir -p /scratch && chown kubetune:kubetune /scratch
COPY --from=trainer-build /opt/python /opt/python
COPY --from=trainer-build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/scratch/hf KUBETUNE_SCRATCH=/scratch
USER 1000:1000
WORKDIR /home/kubetune
EXPOSE 9090
ENTRYPOINT ["kubetune"]
CMD ["train", "--config", "/etc/kubetune/job.yaml"]
