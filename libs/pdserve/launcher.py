"""`pdserve up`: the whole system on one machine, with nothing to configure.

Algorithm:
1. Check the router's port is free (the one fixed port besides NATS'), else stop with the fix.
2. Start nats-server on a free port (or use --nats URL); with --nats-user/--nats-token it asks for them.
   NATS credentials and TLS files reach every service through its environment (PDSERVE_NATS_*), never its
   command line; --api-keys-file goes to the router.
3. Start the KV broker, the router and N prefill + M decode workers as child processes; each child dies
   with this process (PR_SET_PDEATHSIG) so none is ever left behind, even after a kill -9 of `pdserve up`.
4. Poll the router's /health until every worker and the broker have announced themselves; on timeout, or
   when a child exits early, name what did not come up and stop everything.
5. Print where everything is; wait for Ctrl-C / SIGTERM; stop the children (SIGTERM, then SIGKILL after a
   grace period), then nats-server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pdserve import nats_server
from pdserve.config import DEFAULT_VLLM_MODEL, MOCK_MODEL, read_api_keys

# Handed to every service through its environment, not its command line (which `ps` shows to everyone).
_NATS_SECURITY = ("nats_user", "nats_password", "nats_token", "nats_tls_ca", "nats_tls_cert", "nats_tls_key")

def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", default=os.environ.get("PDSERVE_NATS"),
                        help="use this NATS server instead of starting one [env PDSERVE_NATS]")
    parser.add_argument("--host", default="127.0.0.1", help="router HTTP bind address [default 127.0.0.1]")
    parser.add_argument("--port", type=int, default=8000, help="router HTTP port [default 8000]")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers [default 1]")
    parser.add_argument("--decode", type=int, default=1, help="decode workers [default 1]")
    parser.add_argument("--engine", default="mock", choices=["mock", "vllm"], help="inference engine [default mock]")
    parser.add_argument("--model", default="", help=f"vllm: a local Hugging Face directory [default {DEFAULT_VLLM_MODEL}, "
                                                    f"pulled once]; mock: the name to serve [default {MOCK_MODEL}]")
    parser.add_argument("--advertise-host", default=None, help="address workers advertise [default: detected]")
    parser.add_argument("--startup-timeout-s", type=float, default=None,
                        help="how long to wait for every service to come up [default 60 mock, 600 vllm]")
    parser.add_argument("--log-level", default="INFO", help="log level of every service [default INFO]")
    security = parser.add_argument_group("security (see README: Security and overload)")
    security.add_argument("--api-keys-file", default=os.environ.get("PDSERVE_API_KEYS_FILE"),
                          help="router: clients must send `Authorization: Bearer KEY` with a key of this file (one per "
                               "line, # comments) [env PDSERVE_API_KEYS_FILE; PDSERVE_API_KEYS=k1,k2 also works]")
    for name, what in (("user", "user name"), ("password", "password"), ("token", "auth token")):
        security.add_argument(f"--nats-{name}", default=os.environ.get(f"PDSERVE_NATS_{name.upper()}"),
                              help=f"NATS {what} for every service (and for the NATS server `pdserve up` starts) "
                                   f"[env PDSERVE_NATS_{name.upper()}]")
    for name, what in (("ca", "CA certificate of the NATS server"), ("cert", "client certificate"),
                       ("key", "client certificate's key")):
        security.add_argument(f"--nats-tls-{name}", default=os.environ.get(f"PDSERVE_NATS_TLS_{name.upper()}"),
                              help=f"TLS to an external --nats: {what} (PEM) [env PDSERVE_NATS_TLS_{name.upper()}]")


@dataclass
class Child:
    name: str
    process: subprocess.Popen


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
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        self.nats: nats_server.NatsServer | None = None
        self.nats_url: str = args.nats or ""
        self.env = {**os.environ}
        for name in _NATS_SECURITY:
            if getattr(args, name, None):
                self.env[f"PDSERVE_{name.upper()}"] = getattr(args, name)

    def start(self) -> None:
        a = self.args
        if not self.nats_url:
            # Our own NATS asks for the same credentials the services are given.
            auth = nats_server.ServerAuth(user=a.nats_user, password=a.nats_password, token=a.nats_token) \
                if a.nats_user or a.nats_token else None
            self.nats = nats_server.start(die_with_parent=True, auth=auth)
            self.nats_url = self.nats.url
        common = ["--nats", self.nats_url, "--log-level", a.log_level]
        worker = [*common, "--engine", a.engine]
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

    def _spawn(self, name: str, argv: list[str]) -> None:
        process = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *argv], preexec_fn=nats_server.set_parent_death_signal,
                                   stdin=subprocess.DEVNULL, env=self.env)
        self.children.append(Child(name, process))

    def wait_healthy(self, stop_requested) -> dict:
        """The router's /health once every service announced itself; RuntimeError naming what did not."""
        a = self.args
        host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
        url = f"http://{host}:{a.port}/health"
        deadline = time.monotonic() + a.startup_timeout_s
        missing = "the router"
        while time.monotonic() < deadline:
            if stop_requested():
                raise RuntimeError("stopped during start-up")
            for child in self.children:
                if child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with status {child.process.returncode} during start-up; "
                                       "its log above says why")
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

    def watch(self, stop_requested) -> None:
        """Until asked to stop: report children that die (the rest keeps serving)."""
        reported: set[str] = set()
        while not stop_requested():
            for child in self.children:
                if child.process.poll() is not None and child.name not in reported:
                    reported.add(child.name)
                    _say(f"{child.name} (pid {child.process.pid}) exited with status {child.process.returncode}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 10.0) -> None:
        # Router first (no new requests), then workers and broker, then NATS.
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"{child.name} did not stop within {grace_s:.0f}s; killing it")
                child.process.kill()
                child.process.wait()
        if self.nats:
            self.nats.stop()


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


def _security_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the security options, before anything starts."""
    if args.api_keys_file:
        try:
            if not read_api_keys(args.api_keys_file):
                return f"--api-keys-file {args.api_keys_file}: no key in it; put one API key per line"
        except OSError as e:
            return f"--api-keys-file {args.api_keys_file}: cannot read it ({e.strerror})"
    if args.nats_password and not args.nats_user:
        return "--nats-password needs --nats-user"
    if not args.nats and (args.nats_tls_ca or args.nats_tls_cert or args.nats_tls_key):
        return ("--nats-tls-* are for an external NATS with TLS (--nats URL); the NATS server pdserve up starts "
                "listens on 127.0.0.1 without TLS")
    return None


def up(args: argparse.Namespace) -> int:
    if not _port_free(args.host, args.port):
        _say(f"port {args.port} on {args.host} is in use (another pdserve or server?); pass --port with a free one")
        return 1
    if args.startup_timeout_s is None:
        args.startup_timeout_s = 600.0 if args.engine == "vllm" else 60.0
    if args.engine == "vllm" and not args.model:
        from pdserve.models import pull_default_model

        pull_default_model()  # once, here, rather than in every worker at the same time
    if args.prefill < 1 or args.decode < 1:
        _say("--prefill and --decode must be at least 1")
        return 2
    problem = _security_problem(args)
    if problem:
        _say(problem)
        return 2
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    system = System(args)
    try:
        system.start()
        _say(f"NATS at {system.nats_url}; starting KV broker, router, {args.prefill} prefill and "
             f"{args.decode} decode worker(s) with engine {args.engine}")
        health = system.wait_healthy(lambda: stopping)
        models = ", ".join(sorted({w["model"] for w in health["workers"] if w.get("model")}))
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        _say(f"ready: OpenAI API at http://{host}:{args.port}/v1 (model {models}); "
             f"health at http://{host}:{args.port}/health; Ctrl-C stops everything")
        system.watch(lambda: stopping)
        _say("stopping")
        return 0
    except RuntimeError as e:
        _say(f"failed: {e}")
        return 1
    finally:
        system.stop()
