"""The address other machines reach this process at.

Advertising the wrong address (loopback on a multi-host setup, or a container-internal IP) is the classic
"connection refused" failure of disaggregated serving. pdserve advertises the local address of the
interface that routes to NATS: whoever reaches NATS from there can most likely reach us the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
