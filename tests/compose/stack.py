"""One compose project of the compose test: the repository's docker-compose.yml plus an override file that only
swaps in the local stand-ins (tests/compose/docker_env.py) and sets test timings, on host ports of its own.

The project's name is unique to the test process, so its containers, network and volumes are told apart from
anything else on the engine by compose's project label, and `down -v` removes exactly them.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from pathlib import Path

from tests.compose import docker_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
TORCH_VERSION = "2.13.0"  # the Dockerfile's TORCH_VERSION
NATS_HEALTH = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8222/healthz', timeout=2)"

log = logging.getLogger(__name__)


class ComposeStack:
    def __init__(self, workdir: Path, *, engine: str, worker_env: dict[str, str] | None = None,
                 pin_workers_to_cores: bool = False):
        self.workdir = workdir
        self.project = f"pdserve-test-{engine}-{os.getpid()}"
        self.ports = {name: docker_env.free_port() for name in
                      ("ROUTER_PORT", "NATS_PORT", "NATS_MONITOR_PORT", "JAEGER_UI_PORT", "OTLP_GRPC_PORT",
                       "OTLP_HTTP_PORT")}
        self.base_url = f"http://127.0.0.1:{self.ports['ROUTER_PORT']}"
        self.env = {**os.environ, **{k: str(v) for k, v in self.ports.items()}, "PDSERVE_ENGINE": engine}
        self.override = workdir / "compose.override.yml"
        self.override.write_text(json.dumps(self._override(worker_env or {}, pin_workers_to_cores), indent=2))
        self.timings: dict[str, float] = {}
        self._is_down = True

    def _override(self, worker_env: dict[str, str], pin_workers_to_cores: bool) -> dict:
        """Compose reads JSON as YAML: the stand-ins for nats and jaeger, and what the workers get besides."""
        nats = docker_env.nats_context(self.workdir / "nats-image")
        recorder = docker_env.recorder_context(self.workdir / "otlp-recorder-image")
        services: dict = {
            "nats": {"image": "pdserve-test-nats:local", "build": {"context": str(nats)},
                     "healthcheck": {"test": ["CMD", "python3", "-c", NATS_HEALTH]}},
            "jaeger": {"image": "pdserve-test-otlp-recorder:local", "build": {"context": str(recorder)}},
        }
        for i, role in enumerate(("prefill-worker", "decode-worker")):
            service: dict = {"environment": dict(worker_env)}
            if pin_workers_to_cores:  # two vLLM engines on two cores: one core each, or they fight
                service["cpuset"] = str(i % max(1, os.cpu_count() or 1))
            services[role] = service
        return {"services": services}

    # ---------------------------------------------------------------------------------------- compose

    def compose(self, *args: str, timeout_s: float, check: bool = True):
        binary = docker_env.compose_binary()
        assert binary is not None
        return docker_env.run(binary, "-f", str(COMPOSE_FILE), "-f", str(self.override), "-p", self.project, *args,
                              timeout_s=timeout_s, check=check, cwd=ROOT, env=self.env)

    def up_build(self, timeout_s: float = 1500) -> None:
        """`docker compose up --build --wait -d`, with the build arguments this closed network needs."""
        self.timings["base_image_s"] = docker_env.ensure_base_image()
        wheels = docker_env.torch_wheel_dir(TORCH_VERSION)
        self.env.update(PYTHON_IMAGE=docker_env.BASE_IMAGE, EXTRA_CA_CERT=docker_env.extra_ca_cert())
        started = time.monotonic()
        self._is_down = False
        if wheels is None:  # PyTorch's CPU index, as for any user
            done = self.compose("up", "--build", "--wait", "-d", timeout_s=timeout_s, check=False)
        else:
            with docker_env.WheelServer(wheels, docker_env.bridge_gateway()) as server:
                self.env["TORCH_FIND_LINKS"] = server.url
                done = self.compose("up", "--build", "--wait", "-d", timeout_s=timeout_s, check=False)
        # Compose 2.22 exits 0 when a build under `up --build --wait` failed: what runs is checked, not its status.
        try:
            health = self.health()
        except OSError as e:
            health = {"error": str(e)}
        if done.returncode != 0 or health.get("status") != "ok":
            output = self.workdir / "compose-up.log"
            output.write_text(done.stdout + done.stderr)
            raise AssertionError(f"docker compose up --build --wait -d exited {done.returncode} and the router's "
                                 f"/health says {health} (whole output: {output}):\n{done.stderr[-6000:]}\n"
                                 f"--- logs ---\n{self.logs()}")
        self.timings["up_build_wait_s"] = time.monotonic() - started
        log.info("compose project %s up in %.1f s (base image %.1f s)", self.project,
                 self.timings["up_build_wait_s"], self.timings["base_image_s"])
        print(f"\n{self.project}: timings {self.timings}; image sizes {image_sizes()}", flush=True)

    def scale(self, *, prefill: int, decode: int) -> None:
        """As the README says to: --no-recreate, so that compose adds workers and never replaces running ones. Without
        it, one CI run (not reproduced here) saw compose replace every worker container at the scale-up: both decode
        workers at once, so streams in flight had no worker left to resume on."""
        self.compose("up", "-d", "--no-recreate", "--scale", f"prefill-worker={prefill}", "--scale",
                     f"decode-worker={decode}", timeout_s=300)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, timeout_s=60).stdout.split()

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "80", timeout_s=60, check=False).stdout[-20000:]
        except Exception as e:  # the logs are for the failure message: never a second failure
            return f"(no logs: {e})"

    def down(self) -> None:
        if self._is_down:
            return
        self.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout_s=300)
        self._is_down = True

    def leftovers(self) -> dict[str, list[str]]:
        """What the engine still has of this project: containers, networks, volumes (empty after down -v)."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {
            "containers": docker_env.run("docker", "ps", "-a", "-q", "--filter", label, timeout_s=60).stdout.split(),
            "networks": docker_env.run("docker", "network", "ls", "-q", "--filter", label, timeout_s=60).stdout.split(),
            "volumes": docker_env.run("docker", "volume", "ls", "-q", "--filter", label, timeout_s=60).stdout.split(),
        }
        return {kind: ids for kind, ids in found.items() if ids}

    # --------------------------------------------------------------------------------------- services

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/health", timeout=10) as r:
            return json.loads(r.read())

    def wait_workers(self, num_prefill: int, num_decode: int, timeout_s: float) -> dict:
        """The router's /health once it lists exactly this many live workers of each role."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                health = self.health()
                roles = [w["role"] for w in health["workers"]]
                if roles.count("prefill") == num_prefill and roles.count("decode") == num_decode:
                    return health
            except OSError as e:
                health = {"error": str(e)}
            assert time.monotonic() < deadline, f"not {num_prefill}P{num_decode}D within {timeout_s:g}s: {health}"
            time.sleep(0.5)

    def recorded_spans(self) -> list[dict]:
        """What the trace stand-in (the `jaeger` service) has received."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['OTLP_HTTP_PORT']}/spans", timeout=10) as r:
            return json.loads(r.read())


def image_sizes() -> dict[str, str]:
    sizes = {}
    for name in ("pdserve:cpu", docker_env.BASE_IMAGE, "pdserve-test-nats:local", "pdserve-test-otlp-recorder:local"):
        done = docker_env.run("docker", "image", "inspect", "--format", "{{.Size}}", name, timeout_s=30, check=False)
        if done.returncode == 0:
            sizes[name] = f"{int(done.stdout.strip()) / 1e6:.0f} MB"
    return sizes
