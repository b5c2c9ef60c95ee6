# GenRecal teacher server: serves a frozen teacher VLM over gRPC (genrecal.teacher.v1.TeacherService).
#
# Build from the repository root (the build context must be the root, see .dockerignore):
#   docker build -f docker/teacher.Dockerfile -t genrecal-teacher .
# Run (or use compose.yaml at the repository root):
#   docker run --gpus all --shm-size 16g -p 127.0.0.1:50051:50051 -v /path/to/checkpoint:/model:ro \
#     -v /path/to/teacher_tokens:/run/secrets/teacher_tokens:ro genrecal-teacher
# (teacher_tokens: one "CLIENT_NAME TOKEN" line per client; see compose.yaml.) Extra server flags replace the
# default CMD, so repeat --model/--host/--port/--auth-token-file when adding some.

# CUDA build of PyTorch (with torchvision) on Ubuntu; the project's `torch>=2.6` is satisfied by the base
# image, so pip keeps its torch. Bump the tag (or pass --build-arg BASE_IMAGE=...) to move CUDA/torch.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

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
RUN grep -v -E '^(torch|torchvision)==' /tmp/ci-constraints.txt > /tmp/constraints.txt \
    && python -m pip install --no-cache-dir -c /tmp/constraints.txt ".[teacher]" \
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
