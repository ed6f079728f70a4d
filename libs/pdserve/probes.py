"""Doctor's network probes: whether this host reaches what the cluster advertises, and if not, why and the fix.

Each probe answers with a finding, one line an operator acts on ("p1 transfer endpoint tcp://...: Connection
refused (ECONNREFUSED) (nothing listens there: ...); restart it with ..."), or None when the endpoint is reachable.
The connect itself and the classification of its failure are `netaddr.tcp_unreachable`; this module adds what
each kind of failure means for a worker, and the transfer endpoint's hello, which names its byte-stream port.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import zmq
import zmq.asyncio

from pdserve import netaddr
from pdserve.protocol import Heartbeat

log = logging.getLogger(__name__)

# Why a worker's advertised address does not take a connection, and what to change, by the kind of failure.
_WHY_AND_FIX: dict[str, tuple[str, str]] = {
    "refused": ("nothing listens there: the worker is gone, or it listens on another address than it advertises",
                "restart it with --bind-host 0.0.0.0, or with --advertise-host set to an address it has"),
    "timeout": ("a firewall drops the packets, or no host answers at that address",
                "open the worker's ports to this host (firewall, security group), or restart it with --advertise-host "
                "set to an address this host reaches"),
    "unroutable": ("this host has no route to that address",
                   "restart the worker with --advertise-host set to an address on a network this host reaches"),
    "unresolved": ("", "restart the worker with --advertise-host set to an IP address, or a name this host resolves"),
    "other": ("", "check the firewall between the hosts, and the worker's --advertise-host"),
}


def _finding(what: str, problem: netaddr.Unreachable, fix: str | None = None) -> str:
    why, default_fix = _WHY_AND_FIX[problem.kind]
    return f"{what}: {problem.reason}{f' ({why})' if why else ''}; {fix or default_fix}"


def parse_transfer_address(address: str) -> tuple[str, int]:
    """(host, port) of tcp://host:port or tcp://[v6]:port; ValueError when it is neither."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname or not parts.port:
        raise ValueError(f"{address!r} is not tcp://HOST:PORT")
    return parts.hostname, parts.port


async def nats_problems(servers: list[str], timeout_s: float) -> list[str]:
    """One finding per NATS server of the list that does not take a TCP connection from here."""
    async def probe(url: str) -> str | None:
        parts = urlsplit(url)
        try:
            port = parts.port or 4222
        except ValueError:
            return f"{url}: its port is not a number"
        problem = await netaddr.tcp_unreachable(parts.hostname or "127.0.0.1", port, timeout_s)
        return None if problem is None else f"{url}: {problem.reason}"

    return [p for p in await asyncio.gather(*(probe(u) for u in servers)) if p]


async def metrics_problem(hb: Heartbeat, timeout_s: float) -> str | None:
    """A finding when hb's /metrics address is malformed or takes no TCP connection from here, else None."""
    parts = urlsplit(hb.metrics_address)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return f"{hb.worker_id}: {hb.metrics_address!r} is not http://HOST:PORT/metrics"
    problem = await netaddr.tcp_unreachable(parts.hostname, port, timeout_s)
    return None if problem is None else _finding(f"{hb.worker_id} metrics {hb.metrics_address}", problem)


@dataclass(frozen=True)
class TransferProbe:
    """One endpoint's answer: unreachable (fail), reachable but not its byte stream (warn), or its stream port
    unknown (no answer to hello, so not checked)."""

    fail: str | None = None
    warn: str | None = None
    stream_unchecked: bool = False


async def probe_transfer_endpoints(workers: list[Heartbeat], timeout_s: float) -> list[TransferProbe]:
    """Each worker's transfer endpoint probed at once (workers advertise one), in the order given."""
    ctx = zmq.asyncio.Context()
    try:
        return await asyncio.gather(*(_probe_transfer(ctx, hb, timeout_s) for hb in workers))
    finally:
        ctx.term()


async def _probe_transfer(ctx: zmq.asyncio.Context, hb: Heartbeat, timeout_s: float) -> TransferProbe:
    address = hb.transfer_address
    assert address is not None
    try:
        host, port = parse_transfer_address(address)
    except ValueError as e:
        return TransferProbe(fail=f"{hb.worker_id}: {e}; restart it with --advertise-host set to its address")
    problem = await netaddr.tcp_unreachable(host, port, timeout_s)
    if problem is not None:
        return TransferProbe(fail=_finding(f"{hb.worker_id} transfer endpoint {address}", problem))
    answered, stream_port = await _ask_stream_port(ctx, address, timeout_s)
    if not answered:
        return TransferProbe(stream_unchecked=True)
    if stream_port is None:  # the endpoint offers no byte stream
        return TransferProbe()
    problem = await netaddr.tcp_unreachable(host, stream_port, timeout_s)
    if problem is None:
        return TransferProbe()
    return TransferProbe(warn=_finding(
        f"{hb.worker_id} byte stream {host}:{stream_port} (its control port {port} is reachable)", problem,
        "open the worker's ports to this host, not only the control port (both are picked at start), or forward "
        "its stream port too where a NAT or proxy forwards the control port"))


async def _ask_stream_port(ctx: zmq.asyncio.Context, address: str, timeout_s: float) -> tuple[bool, int | None]:
    """(answered, the stream port it names, None if it offers none), asking as kv.client does: {"op": "hello"}.
    The ticket that comes with the answer is left unused; the endpoint forgets it among its oldest."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    loop = asyncio.get_running_loop()
    try:
        sock.connect(address)
        nonce = secrets.token_hex(8)
        await sock.send(orjson.dumps({"op": "hello", "nonce": nonce}))
        deadline = loop.time() + timeout_s
        while (left_s := deadline - loop.time()) > 0:
            if not await sock.poll(left_s * 1000):
                break
            header = orjson.loads((await sock.recv_multipart())[0])
            if isinstance(header, dict) and header.get("nonce") == nonce:
                port = header.get("port") if header.get("k") == "hello" else None
                return True, port if type(port) is int and 0 < port < 65536 else None
    except (zmq.ZMQError, orjson.JSONDecodeError) as e:
        log.debug("hello to %s: %s", address, e)
    finally:
        sock.close(linger=0)
    return False, None
