"""`pdserve up`: the whole system on one machine, with nothing to configure.

Algorithm:
1. With the config (config.py's UpConfig, flags and PDSERVE_* variables, validated by the CLI), check the router's
   port is free (the one fixed port besides NATS'), else stop with the fix.
2. Start nats-server on a free port (or use --nats URL); with --nats-cluster N, N of them on 127.0.0.1 that
   form one cluster (nats_cluster.py), and every service is given all their URLs. Its own NATS gives each role
   its own identity (nats_auth.py: router, prefill, decode, broker, observer; fresh passwords, files in the run
   directory only this user can read) and a max_payload that fits long prompts (8 MiB), on every node alike.
   Each child gets its role's file through its environment (PDSERVE_NATS_CREDENTIALS_FILE), never its command
   line; with --nats URL, the identity files of --nats-credentials-dir, or the --nats-user/--nats-token given.
3. Start the KV broker, the router and N prefill + M decode workers as child processes; each child dies
   with this process (PR_SET_PDEATHSIG) so none is ever left behind, even after a kill -9 of `pdserve up`.
   Their output goes to ours, and their last lines are kept.
4. Poll the router's /health until every worker and the broker have announced themselves; on timeout, or
   when a child exits early, name what did not come up (with its last lines) and stop everything.
5. Print where everything is; then supervise (supervisor.py): a child (each nats-server too) that dies is restarted
   with backoff and a line that says so; one that keeps dying ends `pdserve up` with status 1, naming it and
   its last log lines. Ctrl-C / SIGTERM stops the children (SIGTERM, then SIGKILL after a grace period), then
   nats-server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from pdserve import nats_auth, nats_cluster, nats_server
from pdserve.config import UpConfig
from pdserve.supervisor import Child, OutputTail, Supervisor, file_tail

# Handed to every service through its environment, not its command line (which `ps` shows to everyone).
_NATS_SECURITY = ("nats_user", "nats_password", "nats_token", "nats_tls_ca", "nats_tls_cert", "nats_tls_key")
_NATS_IDENTITY_ENV = ("PDSERVE_NATS_USER", "PDSERVE_NATS_PASSWORD", "PDSERVE_NATS_TOKEN",
                      "PDSERVE_NATS_CREDENTIALS_FILE")
# Prompts travel as token ids in one NATS message: 8 MiB holds a decode request of a ~700K-token context.
OWN_NATS_MAX_PAYLOAD = 8 * 1024 * 1024
_ROLE_OF = {"kv-broker": "broker", "router": "router", "prefill-worker": "prefill", "decode-worker": "decode"}


def _say(message: str) -> None:
    print(f"pdserve up: {message}", file=sys.stderr, flush=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class System:
    def __init__(self, config: UpConfig):
        self.config = config
        self.supervisor = Supervisor(_say)
        self.nats: nats_server.NatsServer | None = None
        self.nats_cluster: nats_cluster.NatsCluster | None = None
        self.nats_url: str = config.nats or ""
        self._own_run_dir = config.run_dir is None
        self.run_dir = config.run_dir or tempfile.mkdtemp(prefix="pdserve-up-")
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        self.credentials_dir: str | None = config.nats_credentials_dir
        self.env = {k: v for k, v in os.environ.items() if k not in _NATS_IDENTITY_ENV}
        for name in _NATS_SECURITY:
            if getattr(config, name):
                self.env[f"PDSERVE_{name.upper()}"] = getattr(config, name)

    @property
    def children(self) -> list[Child]:
        return self.supervisor.children

    def observer_credentials(self) -> str | None:
        return nats_auth.credentials_path(self.credentials_dir, "observer") if self.credentials_dir else None

    def start(self) -> None:
        a = self.config
        if not self.nats_url:
            self._start_nats()
        common = ["--nats", self.nats_url, "--log-level", a.log_level]
        worker = [*common, "--engine", a.engine, "--kv-transport", a.kv_transport,
                  "--prefix-caching" if a.prefix_caching else "--no-prefix-caching"]
        if a.kv_host_cache_gib:
            worker += ["--kv-host-cache-gib", str(a.kv_host_cache_gib)]
        if a.model:
            worker += ["--model", a.model]
        if a.advertise_host:
            worker += ["--advertise-host", a.advertise_host]
        self._spawn("kv-broker", ["kv-broker", *common])
        cores = sorted(os.sched_getaffinity(0))
        roles = ["prefill"] * a.prefill + ["decode"] * a.decode
        for i, role in enumerate(roles):
            # One engine per core where there are enough cores (vLLM's OpenMP threads otherwise fight).
            pin = ["--cpu-cores", str(cores[i % len(cores)])] if a.engine == "vllm" else []
            self._spawn(f"{role}-worker-{i if role == 'prefill' else i - a.prefill}", [f"{role}-worker", *worker, *pin])
        keys = ["--api-keys-file", a.api_keys_file] if a.api_keys_file else []
        self._spawn("router", ["router", *common, "--host", a.host, "--port", str(a.port), *keys])

    def _start_nats(self) -> None:
        """Our own nats-server, or cluster of them: one identity per role, credentials in the run directory."""
        credentials = nats_auth.generate()
        self.credentials_dir = os.path.join(self.run_dir, "nats-credentials")
        nats_auth.write_credentials(self.credentials_dir, credentials)
        settings = dict(die_with_parent=True, authorization=nats_auth.authorization_block(credentials),
                        max_payload=OWN_NATS_MAX_PAYLOAD)
        if self.config.nats_cluster > 1:
            self.nats_cluster = nats_cluster.start_cluster(
                self.config.nats_cluster, store_dir=os.path.join(self.run_dir, "nats-cluster"), log_dir=self.run_dir,
                **settings)
            self.nats_url = self.nats_cluster.url
            for i, (node, log_file) in enumerate(zip(self.nats_cluster.nodes, self.nats_cluster.log_files)):
                self._supervise_nats(f"nats-server-{i}", node, log_file)
        else:
            log_file = os.path.join(self.run_dir, "nats-server.log")
            self.nats = nats_server.start(store_dir=os.path.join(self.run_dir, "nats"), log_file=log_file, **settings)
            self.nats_url = self.nats.url
            self._supervise_nats("nats-server", self.nats, log_file)

    def _supervise_nats(self, name: str, nats: nats_server.NatsServer, log_file: str) -> None:
        """Restarted on its own ports when it dies: clients know its URL, the other nodes its route URL."""

        def restart() -> subprocess.Popen:
            nats.restart()
            return nats.process

        self.supervisor.children.append(Child(name, restart, lambda: file_tail(log_file), nats.process))

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = dict(self.env)
        if self.credentials_dir:
            env["PDSERVE_NATS_CREDENTIALS_FILE"] = nats_auth.credentials_path(self.credentials_dir, _ROLE_OF[argv[0]])
        output = OutputTail(sys.stderr.buffer)

        def spawn() -> subprocess.Popen:
            process = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *argv], env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       preexec_fn=nats_server.set_parent_death_signal)
            output.follow(process.stdout)
            return process

        self.supervisor.add(Child(name, spawn, output.lines))

    def wait_healthy(self, stop_requested) -> dict:
        """The router's /health once every service announced itself; RuntimeError naming what did not."""
        a = self.config
        host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
        url = f"http://{host}:{a.port}/health"
        deadline = time.monotonic() + a.startup_timeout_s
        missing = "the router"
        while time.monotonic() < deadline:
            if stop_requested():
                raise RuntimeError("stopped during start-up")
            for child in self.children:
                if child.process is not None and child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with status {child.process.returncode} during start-up; "
                                       f"its last lines:{_indented(child.tail())}")
            health = _get_json(url)
            if health is not None:
                roles = [w["role"] for w in health.get("workers", [])]
                missing = ", ".join(
                    f"{want - roles.count(role)} of {want} {role} workers"
                    for role, want in (("prefill", a.prefill), ("decode", a.decode)) if roles.count(role) < want
                ) or ("the KV broker" if not health.get("kv_brokers") else "") or (
                    "the router (loading the model's tokenizer)" if health.get("status") != "ok" else "")
                if not missing:
                    return health
            time.sleep(0.25)
        raise RuntimeError(f"{missing} did not come up within {a.startup_timeout_s:.0f}s "
                           "(raise --startup-timeout-s, or read the services' logs above)")

    def supervise(self, stop_requested) -> int:
        """Until asked to stop: restart children that die; 1 when one keeps dying (named, with its last lines)."""
        while not stop_requested():
            gave_up = self.supervisor.check()
            if gave_up is not None:
                _say(f"{gave_up.name} died {gave_up.num_deaths} times within {self.supervisor.policy.window_s:.0f}s; "
                     f"stopping everything. Its last log lines:{_indented(gave_up.tail)}")
                return 1
            time.sleep(0.2)
        return 0

    def stop(self, grace_s: float = 10.0) -> None:
        # Router first (no new requests), then workers and broker, then NATS.
        services = [c for c in self.children if not c.name.startswith("nats-server") and c.process is not None]
        for child in reversed(services):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in services:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"{child.name} did not stop within {grace_s:.0f}s; killing it")
                child.process.kill()
                child.process.wait()
        if self.nats:
            self.nats.stop()
        if self.nats_cluster:
            self.nats_cluster.stop()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _indented(lines: list[str]) -> str:
    return "".join(f"\n    {line}" for line in lines) or " (none)"


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # 503 while degraded still carries the JSON body
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def up(config: UpConfig) -> int:
    """Run the system until Ctrl-C / SIGTERM (0) or a child that keeps dying (1); config is already validated."""
    if not _port_free(config.host, config.port):
        _say(f"port {config.port} on {config.host} is in use (another pdserve or server?); pass --port with a free one")
        return 1
    if config.engine == "vllm" and not config.model:
        from pdserve.models import pull_default_model

        pull_default_model()  # once, here, rather than in every worker at the same time
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    system = System(config)
    try:
        system.start()
        _say(f"NATS at {system.nats_url}; starting KV broker, router, {config.prefill} prefill and "
             f"{config.decode} decode worker(s) with engine {config.engine}")
        health = system.wait_healthy(lambda: stopping)
        models = ", ".join(sorted({w["model"] for w in health["workers"] if w.get("model")}))
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
        nodes = f" (a cluster of {config.nats_cluster} nats-servers)" if system.nats_cluster else ""
        _say(f"ready: OpenAI API at http://{host}:{config.port}/v1 (model {models}); "
             f"health at http://{host}:{config.port}/health; NATS at {system.nats_url}{nodes}; Ctrl-C stops everything")
        observer = system.observer_credentials()
        if observer:
            _say(f"watch it: pdserve status --nats {system.nats_url} --nats-credentials-file {observer} "
                 "(the observer's NATS identity: lifecycle events, no prompts or tokens)")
        status = system.supervise(lambda: stopping)
        _say("stopping")
        return status
    except RuntimeError as e:
        _say(f"failed: {e}")
        return 1
    finally:
        system.stop()
