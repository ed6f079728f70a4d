"""A worker that cannot start as configured says why in one line that names the flag to change, with no
traceback, and exits non-zero: an address it cannot listen on, a NATS it cannot reach. Real processes against a
real nats-server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pdserve import netaddr
from pdserve.kv import stream
from pdserve.kv.endpoint import TransferEndpoint
from pdserve.kv.pool import ArrayBlockPool
from tests.e2e.conftest import free_port

NOT_HERE = "198.18.99.99"  # benchmarking range (RFC 2544): an address no host of this test has


@pytest.fixture(autouse=True)
def _not_an_address_here():
    if netaddr.bind_problem(NOT_HERE) is None:
        pytest.skip(f"{NOT_HERE} is an address of this host")


def start_worker(role: str, *args: str, timeout_s: float = 10) -> tuple[int, str, float]:
    """(exit status, output, seconds) of a worker that is expected to give up at start."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", f"{role}-worker", *args], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s + 20)
    return done.returncode, done.stdout, time.monotonic() - started


def the_one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("role, engine", [("prefill", "mock"), ("decode", "mock"), ("prefill", "vllm")])
def test_an_advertised_host_this_host_does_not_have_names_bind_host(nats, role, engine):
    status, output, seconds = start_worker(role, "--nats", nats.url, "--engine", engine, "--advertise-host", NOT_HERE)
    assert status != 0 and seconds < 10, (status, seconds)
    line = the_one_line(output)
    assert f"--advertise-host {NOT_HERE} is not an address of this host" in line
    assert "NAT or a proxy, also pass --bind-host 0.0.0.0" in line


def test_a_bind_host_this_host_does_not_have_is_named(nats):
    status, output, seconds = start_worker("prefill", "--nats", nats.url, "--engine", "mock",
                                           "--advertise-host", "127.0.0.1", "--bind-host", NOT_HERE)
    assert status != 0 and seconds < 10, (status, seconds)
    line = the_one_line(output)
    assert f"--bind-host {NOT_HERE} is not an address of this host" in line and "0.0.0.0" in line


def test_an_unreachable_nats_names_nats():
    url = f"nats://127.0.0.1:{free_port()}"
    status, output, seconds = start_worker("prefill", "--nats", url, "--engine", "mock", "--connect-timeout-s", "1")
    assert status != 0 and seconds < 10, (status, seconds)
    line = the_one_line(output)
    assert url in line and "--nats" in line


def test_an_unresolvable_advertise_host_is_named(nats):
    status, output, _ = start_worker("decode", "--nats", nats.url, "--engine", "mock",
                                     "--advertise-host", "no-such-host.invalid")
    assert status != 0
    assert "--advertise-host no-such-host.invalid does not resolve here" in the_one_line(output)


def test_bind_refusal_names_the_flag_that_set_the_address():
    assert netaddr.bind_refusal("127.0.0.1", None, detected=False) is None
    assert netaddr.bind_refusal(NOT_HERE, "0.0.0.0", detected=False) is None  # advertised through NAT: fine
    assert netaddr.bind_refusal(NOT_HERE, None, detected=False).startswith(f"--advertise-host {NOT_HERE} ")
    assert netaddr.bind_refusal("127.0.0.1", NOT_HERE, detected=False).startswith(f"--bind-host {NOT_HERE} ")
    detected = netaddr.bind_refusal(NOT_HERE, None, detected=True)
    assert detected.startswith(f"the detected address {NOT_HERE}") and "--advertise-host" in detected


def test_the_transfer_endpoint_and_its_stream_name_bind_host_when_they_cannot_listen():
    """Where the endpoint is built without the worker's check first (vLLM's connector, in vLLM's process)."""
    endpoint = TransferEndpoint(ArrayBlockPool([np.zeros((4, 64), np.uint8)]), bind_host=NOT_HERE,
                                tune_malloc=False, offer_shm=False)
    with pytest.raises(netaddr.BindError, match=f"cannot listen on {NOT_HERE} .*--bind-host") as raised:
        endpoint.start()
    assert isinstance(raised.value, OSError) and raised.value.errno is not None
    with pytest.raises(netaddr.BindError, match=f"byte stream cannot listen on {NOT_HERE} .*--bind-host"):
        stream.StreamServer(NOT_HERE)


def test_a_router_that_cannot_listen_names_host_or_port(nats):
    """The router checks its HTTP address before anything else (uvicorn alone would end in a traceback)."""
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "router", "--nats", nats.url, "--host", NOT_HERE],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=30)
    assert done.returncode != 0 and f"--host {NOT_HERE} is not an address of this host" in the_one_line(done.stdout)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", "router", "--nats", nats.url, "--port", str(port)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=30)
    assert done.returncode != 0 and f"--port {port} on 127.0.0.1 is taken" in the_one_line(done.stdout)
