"""The teacher's container files, checked without a Docker engine.

- compose.yaml is rendered and schema-checked by `docker-compose config` (1.29.2 rejects unknown keys);
- docker/teacher.Dockerfile is linted by hadolint, its CMD is parsed by the server's own parser, and its COPY steps
  are replayed on the build context that .dockerignore leaves (the Docker SDK's matcher); the project is built from
  exactly those files, installed into a folder of its own, and the server imported and started from there;
- docker/healthcheck.py is run as a subprocess against a real grpc.health.v1 server on localhost.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from concurrent import futures
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "teacher.Dockerfile"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
DOCKERIGNORE = ROOT / ".dockerignore"
TEACHER_SERVICE = "genrecal.teacher.v1.TeacherService"


def _tool(name: str) -> str:
    """Path of a dev-extra tool: next to this interpreter first (the venv's bin), then PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)
    if found is None:
        pytest.skip(f"`{name}` not found; install the dev extra (pip install -e '.[dev]')")
    return found


# ----------------------------------------------------------------------------------------------- compose


def _compose_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TEACHER_", "COMPOSE_", "DOCKER_"))}
    full_env.update(env)
    env_file = tmp_path / "empty.env"  # so a developer's ./.env cannot change what is rendered
    env_file.write_text("")
    cmd = [
        _tool("docker-compose"),
        "-f",
        str(COMPOSE),
        "--project-directory",
        str(ROOT),
        "--env-file",
        str(env_file),
    ]
    return subprocess.run(
        [*cmd, "config"],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compose")
    model = tmp / "model dir"  # a space on purpose: the bind source must survive interpolation intact
    model.mkdir()
    tokens = tmp / "teacher_tokens"
    tokens.write_text("trainer-1 0123456789abcdef0123\n")
    proc = _compose_config(tmp, TEACHER_MODEL_DIR=str(model), TEACHER_TOKEN_FILE=str(tokens))
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    config = yaml.safe_load(proc.stdout)
    config["_model_dir"] = str(model)
    config["_token_file"] = str(tokens)
    return config


def test_compose_renders_the_gpu_reservation(rendered):
    teacher = rendered["services"]["teacher"]
    devices = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_mounts_the_model_read_only(rendered):
    volumes = rendered["services"]["teacher"]["volumes"]
    assert volumes == [
        {"type": "bind", "source": rendered["_model_dir"], "target": "/model", "read_only": True}
    ]


SERVER_COMMAND = ["--model", "/model", "--host", "0.0.0.0", "--port", "50051",
                  "--auth-token-file", "/run/secrets/teacher_tokens"]


def test_compose_publishes_the_grpc_port_on_localhost_with_tokens_as_a_secret(rendered):
    teacher = rendered["services"]["teacher"]
    assert teacher["ports"] == ["127.0.0.1:50051:50051/tcp"]
    assert teacher["command"] == SERVER_COMMAND
    assert teacher["secrets"] == [{"source": "teacher_tokens"}]  # mounted at /run/secrets/teacher_tokens
    assert rendered["secrets"] == {"teacher_tokens": {"file": rendered["_token_file"]}}


def test_compose_healthcheck_calls_the_grpc_health_service(rendered):
    teacher = rendered["services"]["teacher"]
    health = teacher["healthcheck"]
    assert health["test"] == ["CMD", "python", "/opt/genrecal/healthcheck.py", "127.0.0.1:50051"]
    assert health["start_period"] and health["retries"] >= 1
    # The compose check must be the same as the image's, and point at the script the image installs.
    (image_check,) = [rest for word, rest in _instructions() if word == "HEALTHCHECK"]
    options, _, command = image_check.partition(" CMD ")
    assert json.loads(command) == health["test"][1:]
    for key in ("interval", "timeout", "retries", "start_period"):  # same timing as the image's own check
        assert f"--{key.replace('_', '-')}={health[key]}" in options.split()


def test_compose_build_stop_and_runtime_settings(rendered):
    teacher = rendered["services"]["teacher"]
    assert Path(teacher["build"]["context"]) == ROOT
    assert teacher["build"]["dockerfile"] == "docker/teacher.Dockerfile"
    assert teacher["stop_signal"] == "SIGTERM"
    # Longer than the server's own drain (`--grace-s`, 30 s unless the command sets it) plus engine close.
    grace = teacher["command"]
    server_grace = float(grace[grace.index("--grace-s") + 1]) if "--grace-s" in grace else 30.0
    assert _seconds(teacher["stop_grace_period"]) >= server_grace + 30
    assert teacher["shm_size"]
    assert teacher["init"] is True


REPLICAS = ("teacher-a", "teacher-b")


def test_compose_two_replicas_share_the_teacher_service_with_one_gpu_set_and_port_each(rendered):
    """`--profile replicas`: two whole teachers on one host, each on its own GPUs and host port."""
    services = rendered["services"]
    teacher = services["teacher"]
    assert "profiles" not in teacher  # `docker compose up` alone starts the single teacher only
    ports, gpus = [], []
    for name in REPLICAS:
        replica = services[name]
        assert replica["profiles"] == ["replicas"]
        differing = {"ports", "deploy", "profiles"}
        assert {k: v for k, v in replica.items() if k not in differing} == {
            k: v for k, v in teacher.items() if k not in differing
        }, f"{name} must run the same image, model, command, secrets and health check as `teacher`"
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        gpus.append(device["device_ids"])
        ports.extend(replica["ports"])
    assert gpus == [["0"], ["1"]]
    assert ports == ["127.0.0.1:50051:50051/tcp", "127.0.0.1:50052:50051/tcp"]


def test_compose_replica_gpu_sets_and_ports_are_configurable(tmp_path):
    proc = _compose_config(tmp_path, TEACHER_MODEL_DIR=str(tmp_path), TEACHER_TOKEN_FILE=str(tmp_path),
                           TEACHER_A_GPUS="0,1,2,3", TEACHER_B_GPUS="4,5,6,7", TEACHER_A_PORT="7001",
                           TEACHER_B_PORT="7002")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    for name, ids, port in (("teacher-a", "0,1,2,3", "7001"), ("teacher-b", "4,5,6,7", "7002")):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [ids]
        assert services[name]["ports"] == [f"127.0.0.1:{port}:50051/tcp"]


def test_compose_port_and_address_are_configurable(tmp_path):
    proc = _compose_config(tmp_path, TEACHER_MODEL_DIR=str(tmp_path), TEACHER_PORT="6000",
                           TEACHER_BIND="0.0.0.0", TEACHER_TOKEN_FILE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["services"]["teacher"]["ports"] == ["0.0.0.0:6000:50051/tcp"]


def test_compose_requires_the_token_file(tmp_path):
    proc = _compose_config(tmp_path, TEACHER_MODEL_DIR=str(tmp_path))
    assert proc.returncode != 0
    assert "set TEACHER_TOKEN_FILE" in proc.stderr


def test_compose_requires_the_model_dir(tmp_path):
    proc = _compose_config(tmp_path)
    assert proc.returncode != 0
    assert "set TEACHER_MODEL_DIR to the teacher checkpoint folder" in proc.stderr


def test_compose_validation_is_active(tmp_path):
    """The renderer really schema-checks: the same file plus an unknown key is refused."""
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["teacher"]["gpus_please"] = True
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEACHER_", "COMPOSE_", "DOCKER_"))}
    env["TEACHER_MODEL_DIR"] = env["TEACHER_TOKEN_FILE"] = str(tmp_path)
    proc = subprocess.run(
        [_tool("docker-compose"), "-f", str(broken), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "gpus_please" in proc.stderr


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"unparsed duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -------------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(ln for ln in _dockerfile_text().splitlines() if not ln.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean():
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [] and proc.returncode == 0, f"hadolint: {findings or proc.stderr}"
    assert "hadolint ignore" not in _dockerfile_text()


def test_hadolint_really_lints(tmp_path):
    """The linter is live: an unpinned base image and an uncached pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install requests\n")
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", "--format", "json", str(bad)], capture_output=True, text=True
    )
    codes = {finding["code"] for finding in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3006", "DL3042"} <= codes


def _last(word: str) -> str:
    return [rest for w, rest in _instructions() if w == word][-1]


def test_the_image_command_is_a_valid_server_command_and_the_same_as_compose(rendered):
    """CMD's flags are the server's own (its real parser takes them); compose starts the same command."""
    from teacher_server.__main__ import build_parser

    entrypoint, command = json.loads(_last("ENTRYPOINT")), json.loads(_last("CMD"))
    assert entrypoint == ["python", "-m", "teacher_server"]  # run from the installed wheel: see the build test
    args = build_parser().parse_args(command)
    assert (args.model, args.host, args.port) == ("/model", "0.0.0.0", 50051)
    assert args.auth_token_file == "/run/secrets/teacher_tokens"  # where compose mounts the secret
    assert int(_last("EXPOSE")) == args.port
    for name in ("teacher", *REPLICAS):
        assert rendered["services"][name]["command"] == command, name
    assert _last("USER").split(":")[0] not in ("root", "0"), "the server must not run as root"


def _ignore_patterns() -> list[str]:
    """.dockerignore's patterns, read as the Docker SDK's `build` reads them (blank lines and comments dropped)."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _in_context(rel: str, patterns: list[str]) -> bool:
    """Whether the build context keeps ``rel``, by the Docker SDK's own .dockerignore matcher (a match of a
    parent folder excludes what is below it; `!` patterns re-include)."""
    from docker.utils.build import PatternMatcher

    return not PatternMatcher(patterns).matches(rel)


def test_dockerignore_keeps_state_out_and_code_in():
    pytest.importorskip("docker", reason="the Docker SDK (installed with docker-compose) matches .dockerignore")
    patterns = _ignore_patterns()
    for rel in (
        ".venv/bin/python",
        ".venv-vllm/bin/python",
        "sub/.venv/lib/x.py",
        ".git/HEAD",
        "tests/conftest.py",
        "runs/x/ckpt.bin",
        "genrecal/__pycache__/a.pyc",
        "teacher_server/backends/__pycache__/x.cpython-311.pyc",
        ".pytest_cache/v",
        ".ruff_cache/x",
        "genrecal.egg-info/PKG-INFO",
        "model/model.safetensors",
        "demo/weights/teacher.safetensors",
        ".env",
    ):
        assert not _in_context(rel, patterns), rel
    for rel in (
        "pyproject.toml",
        "README.md",
        ".ci/constraints.txt",
        "genrecal/__init__.py",
        "teacher_server/__init__.py",
        "teacher_server/backends/vllm_body.py",
        "docker/healthcheck.py",
        "protos/genrecal/teacher/v1/teacher.proto",
    ):
        assert _in_context(rel, patterns), rel


PROJECT_DIR = "/opt/genrecal"  # the image's WORKDIR while it installs the project


def _replay_copies(dest_root: Path, pip_installs: int | None = None) -> list[str]:
    """Copy what the COPY steps put under PROJECT_DIR into dest_root, from the context .dockerignore leaves.

    With ``pip_installs=n``, stop before the n-th `RUN ... pip install` (1 = what the dependency layer sees)."""
    patterns = _ignore_patterns()
    copied: list[str] = []
    workdir = "/"
    runs = 0
    for word, rest in _instructions():
        if word == "WORKDIR":
            workdir = str(Path(workdir, rest))
        elif word == "RUN" and "pip install" in rest:
            runs += 1
            if runs == pip_installs:
                break
        elif word == "COPY":
            *sources, dest = [a for a in shlex.split(rest) if not a.startswith("--")]
            absolute = str(Path(workdir, dest)) + (
                "/" if dest.endswith(("/", ".")) or len(sources) > 1 else ""
            )
            for source in sources:
                src = ROOT / source
                assert src.exists(), f"COPY {source}: no such path in the repository"
                assert _in_context(source.strip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
                if not (absolute + "/").startswith(PROJECT_DIR + "/"):
                    continue  # outside the project folder (the constraints file in /tmp, ...)
                target = dest_root / absolute.removeprefix(PROJECT_DIR).strip("/")
                if src.is_file():
                    pairs = [(src, target / src.name if absolute.endswith("/") else target)]
                else:
                    pairs = [(f, target / f.relative_to(src)) for f in sorted(src.rglob("*")) if f.is_file()]
                for f, to in pairs:
                    if _in_context(f.relative_to(ROOT).as_posix(), patterns):
                        to.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, to)
                        copied.append(to.relative_to(dest_root).as_posix())
    return copied


def _build_wheel(project: Path, out: Path) -> set[str]:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    proc = subprocess.run([*cmd, str(project)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("genrecal-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.slow
def test_project_builds_from_the_image_context(tmp_path):
    """Both install layers build from exactly the files the image copies; the final wheel holds the server."""
    deps_layer = tmp_path / "deps-layer"
    assert sorted(_replay_copies(deps_layer, pip_installs=1)) == ["README.md", "pyproject.toml"]
    _build_wheel(deps_layer, tmp_path / "deps-wheel")  # the placeholder install that pulls the requirements

    final = tmp_path / "final"
    copied = set(_replay_copies(final))
    assert {"pyproject.toml", "README.md", "healthcheck.py", "teacher_server/__init__.py"} <= copied
    assert not any("__pycache__" in c or c.endswith(".pyc") for c in copied)
    names = _build_wheel(final, tmp_path / "final-wheel")
    assert {"teacher_server/__init__.py", "teacher_server/__main__.py", "genrecal/__init__.py"} <= names

    # What the image's `RUN pip install --no-deps .` and its import check do, into a folder of its own: the
    # server imports from the wheel (not this checkout) and its entry point answers.
    site = tmp_path / "site"
    (wheel,) = (tmp_path / "final-wheel").glob("genrecal-*.whl")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = ("import genrecal, grpc_health.v1.health, teacher_server, teacher_server.server; "
             "print(teacher_server.__file__); print(genrecal.__file__)")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(Path(line).is_relative_to(site) for line in proc.stdout.split()), proc.stdout
    proc = subprocess.run([sys.executable, "-m", "teacher_server", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "--auth-token-file" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------- healthcheck


def test_healthcheck_script_compiles():
    compile(HEALTHCHECK.read_text(), str(HEALTHCHECK), "exec")


@pytest.fixture
def health_server():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip(
        "grpc_health.v1.health",
        reason="grpcio-health-checking is not installed (the teacher server needs it)",
    )
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, health_pb2.HealthCheckResponse
    finally:
        server.stop(None)


def _probe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TEACHER_HEALTH_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_healthcheck_serving_is_healthy(health_server):
    address, servicer, status = health_server
    servicer.set("", status.SERVING)
    servicer.set(TEACHER_SERVICE, status.SERVING)
    assert _probe(address).returncode == 0
    assert _probe(address, "--service", "", "--service", TEACHER_SERVICE).returncode == 0
    # the address can come from the environment instead
    assert _probe(env={"TEACHER_HEALTH_ADDRESS": address}).returncode == 0


def test_healthcheck_not_serving_is_unhealthy(health_server):
    address, servicer, status = health_server
    servicer.set("", status.NOT_SERVING)
    proc = _probe(address)
    assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr
    servicer.set("", status.SERVING)
    servicer.set(TEACHER_SERVICE, status.NOT_SERVING)
    assert _probe(address, "--service", TEACHER_SERVICE).returncode == 1
    assert _probe(address, "--service", "", "--service", TEACHER_SERVICE).returncode == 1


def test_healthcheck_unknown_service_is_unhealthy(health_server):
    address, servicer, status = health_server
    servicer.set("", status.SERVING)
    proc = _probe(address, "--service", "no.such.Service")
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr


def test_healthcheck_without_a_server_is_unhealthy():
    pytest.importorskip("grpc_health.v1.health", reason="grpcio-health-checking is not installed")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _probe(f"127.0.0.1:{port}", "--timeout", "3")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


def test_healthcheck_bad_usage_is_unhealthy_not_reserved_status():
    assert _probe("--timeout", "abc").returncode == 1  # argparse would exit 2, which Docker reserves


def test_healthcheck_speaks_tls_and_mtls(tmp_path):
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2_grpc

    from tests.e2e.certs import make_certificates

    certs = make_certificates(tmp_path)
    credentials = grpc.ssl_server_credentials([(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
                                              root_certificates=certs.ca.read_bytes(), require_client_auth=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        mtls = ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
        ok = _probe(address, *mtls)
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
        assert _probe(address, *mtls[:2], "--timeout", "2").returncode == 1  # no client certificate
        assert _probe(address, "--timeout", "2").returncode == 1  # plaintext against TLS
    finally:
        server.stop(None)
