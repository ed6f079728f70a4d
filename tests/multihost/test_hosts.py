"""The harness itself: hosts reach each other over the switch, a dropped port drops and undrop restores it, a
link down is silence, the delay proxy delays, and a network's teardown leaves nothing behind."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from tests.multihost.conftest import requires_nft
from tests.multihost.hosts import Network, leftovers, missing_requirements

pytestmark = [pytest.mark.e2e, pytest.mark.multihost]

LISTEN = [sys.executable, "-c", "import socket, time; s = socket.create_server(('0.0.0.0', 9000)); "
          "print('listening', flush=True); time.sleep(3600)"]

ECHO = [sys.executable, "-c", """
import asyncio
async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(echo, '0.0.0.0', 7000)
    print('serving', flush=True)
    await server.serve_forever()
asyncio.run(main())
"""]


@requires_nft
def test_drop_port_drops_undrop_restores_and_a_link_down_is_silence(network):
    x, y = network.add_hosts("x", "y")
    y.start("listener", LISTEN).wait_for("listening")
    assert x.connect(y.ip, 9000) == "connected"
    assert x.connect(y.ip, 9001) == "refused"

    y.drop_port(9000, "in")  # a firewall in front of y's server
    assert x.connect(y.ip, 9000) == "timeout"
    assert x.connect(y.ip, 9001) == "refused"  # only that port
    y.undrop()
    assert x.connect(y.ip, 9000) == "connected"

    x.drop_port(9000, "out")  # x may not call port 9000 anywhere
    assert x.connect(y.ip, 9000) == "timeout"
    with socket.create_connection((y.ip, 9000), timeout=2):  # the test process (another client) still may
        pass
    x.undrop()
    assert x.connect(y.ip, 9000) == "connected"

    y.drop(peer=x)  # everything from x, any port
    assert x.connect(y.ip, 9000) == "timeout"
    assert x.connect(y.ip, 9001) == "timeout"
    with socket.create_connection((y.ip, 9000), timeout=2):
        pass
    y.undrop()

    y.link_down()
    assert x.connect(y.ip, 9000) == "timeout"
    y.link_up()
    assert x.connect(y.ip, 9000, timeout_s=5) == "connected"


def test_each_host_has_its_name_and_address(network):
    x, y = network.add_hosts("x", "y")
    assert x.run(["hostname"]).stdout.strip() == "x"
    started = x.start("hostname", ["sh", "-c", "hostname; ip -4 -o addr show dev eth0"])
    assert started.wait_for(r"inet (\S+)/").group(1) == x.ip
    assert started.output().splitlines()[0] == "x"
    assert x.ip != y.ip and network.client_ip not in (x.ip, y.ip)
    assert x.connect(network.client_ip, 1) == "refused"  # the test process's address is on the switch too


def test_delay_proxy_delays_each_direction_and_passes_everything(network):
    server, slow = network.add_hosts("server", "slow")
    server.start("echo", ECHO).wait_for("serving")
    slow.start_delay_proxy(100, {7000: (server.ip, 7000)})
    payload = os.urandom(3 * 1024 * 1024)
    with socket.create_connection((slow.ip, 7000), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        round_trip = time.monotonic() - started
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # the half-close reaches the echo server, whose close comes back
        received = bytearray()
        while chunk := s.recv(1 << 20):
            received += chunk
    assert 0.2 <= round_trip < 1.5, round_trip
    assert received == payload


def test_teardown_leaves_no_namespace_link_or_process_behind(tmp_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with Network(tmp_path) as net:
        x, y = net.add_hosts("x", "y")
        assert len(net.client_link) <= 15 and str(os.getpid()) in net.tag
        stubborn = x.start("stubborn", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
        stubborn.wait_for("ready")
        listener = y.start("listener", LISTEN)
        listener.wait_for("listening")
        if missing_requirements(nft=True) is None:
            y.drop_port(9000)
        stray = int(y.run(["sh", "-c", "setsid sleep 3600 >/dev/null 2>&1 & echo $!"]).stdout)  # not owned
        assert leftovers(net.tag)
        pids = [stubborn.pid, listener.pid, stray]
        net.close(stop_timeout_s=2)
    assert leftovers(net.tag) == []
    assert net.unclean_stops == [f"x/stubborn (pid {pids[0]})"]
    time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z", f"pid {pid} left running"
    assert stubborn.how_it_ended == "SIGKILL" and listener.how_it_ended == "SIGTERM"
