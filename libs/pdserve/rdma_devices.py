"""The RDMA devices of this host: each port's state, link layer and GID, and what that means for KV between hosts.

`pdserve doctor` lists them, workers put them in their heartbeats for `pdserve status`, and the NIXL/UCX
transfer path asks `has_active_port(list_devices())` before it prefers RDMA across hosts. A host without a usable
port is said in one line that names the path KV takes instead, so a missing or inactive NIC is never silent.

Two sources, because pyverbs (rdma-core's bindings) is there only where Debian's python3-pyverbs is installed
(`make install` as root adds it; the PyPI sdist needs rdma-core's build tree): pyverbs asks libibverbs, which sees
what NIXL/UCX will see (a device it cannot open is no use to them either); /sys/class/infiniband, read where
pyverbs is absent, has the same ports, states and GIDs without any package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SYSFS_ROOT = Path("/sys/class/infiniband")
Source = Literal["pyverbs", "sysfs"]

# enum ibv_port_state and ibv_port_phys_state, named as the kernel's sysfs files name them ("4: ACTIVE").
_PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
_PHYS_STATES = {1: "Sleep", 2: "Polling", 3: "Disabled", 4: "PortConfigurationTraining", 5: "LinkUp",
                6: "LinkErrorRecovery", 7: "Phy Test"}
_IBV_LINK_LAYER_ETHERNET = 2  # 0 (unspecified, older drivers) and 1 are InfiniBand
_IBV_NODE_RNIC = 4  # an iWARP NIC; a CA on Ethernet is RoCE
# Gb/s per lane of ibv_port_attr.active_speed, and lanes of active_width, as the kernel's sysfs `rate` counts them.
_LANE_GBPS = {1: 2.5, 2: 5.0, 4: 10.0, 8: 10.0, 16: 14.0, 32: 25.0, 64: 50.0, 128: 100.0}
_LANES = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}
_ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
_FIX_DOWN = ("check the cable and the link (`ibv_devinfo` shows each port's state; a port stays INIT on InfiniBand "
             "until a subnet manager runs: `sminfo`, or start opensm)")


@dataclass(frozen=True)
class RdmaPort:
    """One port of one RDMA device, as libibverbs or sysfs reports it."""

    device: str  # "mlx5_0"
    port: int  # from 1
    state: str  # "ACTIVE", "DOWN", "INIT", ...: only ACTIVE carries traffic
    phys_state: str | None  # "LinkUp", "Polling" (no link partner), "Disabled", ...
    link_layer: str  # "InfiniBand" or "Ethernet"
    fabric: str  # "IB", "RoCE" or "iWARP"
    gid: str | None  # GID index 0, "fe80:0000:...", None where the table has no entry
    rate_gbps: float | None

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"

    def short(self) -> str:
        """'mlx5_0/1 ACTIVE RoCE': what a heartbeat carries and `pdserve status` shows."""
        return f"{self.device}/{self.port} {self.state} {self.fabric}"

    def describe(self) -> str:
        """The short form plus what doctor lists: physical state, rate and GID 0."""
        rate = f", {self.rate_gbps:g} Gb/s" if self.rate_gbps else ""
        phys = f" ({self.phys_state})" if self.phys_state else ""
        return f"{self.device}/{self.port} {self.state}{phys} {self.fabric}{rate}, GID[0] {self.gid or 'none'}"


@dataclass(frozen=True)
class Scan:
    """This host's RDMA ports and where they were read; note says why libibverbs' view was not used, if so."""

    ports: tuple[RdmaPort, ...]
    source: Source
    note: str | None = None


def list_devices(sysfs_root: Path | None = None) -> list[RdmaPort]:
    """This host's RDMA ports (empty when there is none); never raises."""
    return list(scan(sysfs_root).ports)


def has_active_port(devices: list[RdmaPort] | tuple[RdmaPort, ...]) -> bool:
    """Whether any port can carry RDMA traffic now."""
    return any(p.active for p in devices)


def scan(sysfs_root: Path | None = None, verbs: Any = None) -> Scan:
    """This host's RDMA ports through pyverbs where it imports, else from sysfs; never raises (an error is a debug
    line, and the ports are what the other source sees, or none).

    A sysfs_root given (a test's tree) is read as it is: pyverbs sees only this host's devices, so it is used then
    only as `verbs`, a stand-in for pyverbs.device."""
    root = sysfs_root or SYSFS_ROOT
    if verbs is None and sysfs_root is None:
        verbs = _import_pyverbs()
    if verbs is None:
        return Scan(_read_sysfs_safely(root), "sysfs")
    try:
        ports = tuple(_read_pyverbs(verbs))
    except Exception as e:  # a C binding's errors are many kinds; none may stop a worker or doctor
        log.debug("pyverbs could not list RDMA devices (%s); reading %s", e, root)
        ports, problem = (), (f"libibverbs cannot open them ({e}), so NIXL/UCX cannot either: load the kernel's "
                              "verbs module (`modprobe ib_uverbs`), and in a container pass the devices in "
                              "(docker run --device /dev/infiniband)")
    else:
        problem = ("libibverbs lists none of them, so NIXL/UCX cannot use them either: install the NIC's "
                   "libibverbs provider (Debian: ibverbs-providers; or the vendor's OFED)")
    if ports:
        return Scan(ports, "pyverbs")
    # libibverbs fails, rather than lists none, where the kernel has no RDMA at all: sysfs tells that apart
    # from devices it cannot use.
    seen = _read_sysfs_safely(root)
    return Scan(seen, "sysfs", problem) if seen else Scan((), "pyverbs")


def summary(devices: list[RdmaPort] | tuple[RdmaPort, ...], source: Source | None = None) -> str:
    """One line: no device, none ACTIVE (with the fix), or the ACTIVE ports NIXL/UCX can use; and the source."""
    seen_by = {None: "", "pyverbs": " (seen by pyverbs)", "sysfs": f" (read from {SYSFS_ROOT})"}[source]
    if not devices:
        return f"no RDMA device on this host: KV moves over TCP between hosts (shm / cuda-ipc on one host){seen_by}"
    active = [p for p in devices if p.active]
    if not active:
        names = ", ".join(f"{p.device}/{p.port} {p.state}" for p in devices)
        return (f"RDMA port(s) {names}, none ACTIVE, so KV moves over TCP between hosts: {_FIX_DOWN}{seen_by}")
    names = ", ".join(f"{p.device}/{p.port} ({p.fabric})" for p in active)
    return f"RDMA ACTIVE on {names}: NIXL/UCX can move KV over it between hosts (`--kv-transport nixl`){seen_by}"


# -------------------------------------------------------------------------------------------- readers


def _import_pyverbs() -> Any:
    try:
        import pyverbs.device
    except Exception as e:  # ImportError, or a build of it for another Python (an undefined symbol)
        log.debug("pyverbs does not import (%s): RDMA devices are read from %s", e, SYSFS_ROOT)
        return None
    return pyverbs.device


def _read_pyverbs(verbs: Any) -> list[RdmaPort]:
    ports = []
    for device in verbs.get_device_list():
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        ctx = verbs.Context(name=name)
        try:
            for num in range(1, ctx.query_device().phys_port_cnt + 1):
                attr = ctx.query_port(num)
                ethernet = attr.link_layer == _IBV_LINK_LAYER_ETHERNET
                try:
                    gid = str(ctx.query_gid(num, 0))
                except Exception as e:  # a RoCE port whose netdev is gone has no GID 0
                    log.debug("%s/%s: no GID 0 (%s)", name, num, e)
                    gid = None
                lane_gbps, lanes = _LANE_GBPS.get(attr.active_speed), _LANES.get(attr.active_width)
                rate_gbps = lane_gbps * lanes if lane_gbps and lanes else None
                ports.append(RdmaPort(
                    device=name, port=num, state=_PORT_STATES.get(attr.state, str(attr.state)),
                    phys_state=_PHYS_STATES.get(attr.phys_state), link_layer="Ethernet" if ethernet else "InfiniBand",
                    fabric=_fabric(ethernet, device.node_type == _IBV_NODE_RNIC),
                    gid=None if gid == _ZERO_GID else gid, rate_gbps=rate_gbps))
        finally:
            ctx.close()
    return ports


def _read_sysfs_safely(root: Path) -> tuple[RdmaPort, ...]:
    try:
        return tuple(_read_sysfs(root))
    except (OSError, ValueError) as e:  # a device unplugged while read, or a file of an unknown shape
        log.debug("cannot read RDMA devices from %s: %s", root, e)
        return ()


def _read_sysfs(root: Path) -> list[RdmaPort]:
    """<root>/<device>/ports/<n>/{state,phys_state,link_layer,rate,gids/0}, and <root>/<device>/node_type."""
    if not root.is_dir():  # no RDMA driver loaded: the class directory is absent
        return []
    ports = []
    for device in sorted(root.iterdir()):
        if not (device / "ports").is_dir():
            continue
        rnic = _read(device / "node_type", "").endswith("RNIC")  # "4: RNIC"
        for port_dir in sorted((device / "ports").iterdir(), key=lambda p: int(p.name)):
            ethernet = _read(port_dir / "link_layer", "InfiniBand") == "Ethernet"
            gid = _read(port_dir / "gids" / "0", "")
            ports.append(RdmaPort(
                device=device.name, port=int(port_dir.name), state=_after_colon(_read(port_dir / "state", "?")),
                phys_state=_after_colon(_read(port_dir / "phys_state", "")) or None,
                link_layer="Ethernet" if ethernet else "InfiniBand", fabric=_fabric(ethernet, rnic),
                gid=gid if gid and gid != _ZERO_GID else None, rate_gbps=_gbps(_read(port_dir / "rate", ""))))
    return ports


def _read(path: Path, default: str) -> str:
    """A sysfs attribute's text; default where it is absent or unreadable (an empty GID entry reads EINVAL)."""
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _gbps(rate: str) -> float | None:
    try:
        return float(rate.split(" ")[0])  # "100 Gb/sec (4X EDR)"
    except ValueError:
        return None


def _after_colon(value: str) -> str:
    return value.split(":", 1)[-1].strip()  # "4: ACTIVE" -> "ACTIVE"


def _fabric(ethernet: bool, rnic: bool) -> str:
    if not ethernet:
        return "IB"
    return "iWARP" if rnic else "RoCE"
