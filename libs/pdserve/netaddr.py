"""The address other machines reach this process at, whether this host can listen there, and whether another
host can connect to it.

Advertising the wrong address (loopback on a multi-host setup, or a container-internal IP) is the classic
"connection refused" failure of disaggregated serving. pdserve advertises the local address of the
interface that routes to NATS: whoever reaches NATS from there can most likely reach us the same way.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit


class BindError(OSError):
    """A socket cannot be bound where this process was told to listen; the message names the flag to change."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = code


def detect_advertise_host(nats_url: str) -> str:
    """Local IP of the interface that routes to the NATS server (no packet is sent)."""
    parts = urlsplit(nats_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 4222
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve the NATS host {host!r} ({e}); fix --nats or pass --advertise-host") from e
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP connect only picks a route
        return s.getsockname()[0]


def bind_problem(host: str) -> str | None:
    """Why a TCP socket cannot be bound on host, port 0 ("is not an address of this host (...)"), or None when it
    can: a throwaway bind, so that a worker finds out before its engine (and, on vLLM, another process) binds."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"does not resolve here ({e.strerror})"
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.bind(sockaddr)
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.EADDRNOTAVAIL:
            return f"is not an address of this host ({why})"
        return f"cannot be bound ({why})"
    return None


def bind_refusal(advertise_host: str, bind_host: str | None, *, detected: bool) -> str | None:
    """One line naming the flag to change when a worker cannot listen where it would: on bind_host, or without one
    on the address it advertises (detected: found by detect_advertise_host, not given). None when it can."""
    if bind_host:
        problem = bind_problem(bind_host)
        return None if problem is None else (
            f"--bind-host {bind_host} {problem}; pass one of this host's addresses, or --bind-host 0.0.0.0 to listen "
            "on all of them")
    problem = bind_problem(advertise_host)
    if problem is None:
        return None
    if detected:
        return (f"the detected address {advertise_host} (of the interface that routes to NATS) {problem}; pass "
                "--advertise-host with the address other machines reach this host at, and --bind-host 0.0.0.0")
    return (f"--advertise-host {advertise_host} {problem}, and without --bind-host a worker listens on the address it "
            "advertises; to advertise an address that reaches this host through NAT or a proxy, also pass "
            "--bind-host 0.0.0.0, else advertise one of this host's addresses")


@dataclass(frozen=True)
class Unreachable:
    """Why a TCP connection did not open: kind for the fix to suggest, reason as the operator reads it (with the
    errno's text and name)."""

    kind: Literal["refused", "timeout", "unroutable", "unresolved", "other"]
    reason: str


_UNROUTABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL)


async def tcp_unreachable(host: str, port: int, timeout_s: float) -> Unreachable | None:
    """None when a TCP connection to host:port opens within timeout_s (and is closed at once), else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except asyncio.TimeoutError:
        return Unreachable("timeout", f"timed out after {timeout_s:g}s")
    except socket.gaierror as e:
        return Unreachable("unresolved", f"{host} does not resolve here ({e.strerror})")
    except OSError as e:
        if e.errno is None:  # a name with several addresses: asyncio joins their errors into one message
            return Unreachable("other", str(e))
        text = f"{os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
        if e.errno == errno.ECONNREFUSED:
            return Unreachable("refused", text)
        if e.errno == errno.ETIMEDOUT:
            return Unreachable("timeout", text)
        return Unreachable("unroutable" if e.errno in _UNROUTABLE else "other", text)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the peer hung up first: it was reachable all the same
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
