"""rdma_devices: this host's RDMA ports, from pyverbs or sysfs, and the line that says what they mean for KV.

This machine has no RDMA device, so the real reads are tested on that case only; a host with a NIC is a stub, a
fake /sys/class/infiniband tree (or a stand-in for pyverbs.device), and each test that uses one says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from pdserve import rdma_devices
from pdserve.protocol import SCHEMA_VERSION, Heartbeat, InvalidMessage, decode
from pdserve.rdma_devices import RdmaPort

ROCE_GID = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
HAS_PYVERBS = importlib.util.find_spec("pyverbs") is not None


def host_has_rdma() -> bool:
    root = rdma_devices.SYSFS_ROOT
    return root.is_dir() and any(root.iterdir())


def add_port(root: Path, device: str, port: int, *, state: str, link_layer: str, gid: str = ROCE_GID,
             phys_state: str = "5: LinkUp", rate: str = "100 Gb/sec (4X EDR)", node_type: str = "1: CA") -> None:
    """One port of a stub sysfs tree, its files written as the kernel writes them."""
    port_dir = root / device / "ports" / str(port)
    (port_dir / "gids").mkdir(parents=True)
    (root / device / "node_type").write_text(f"{node_type}\n")
    for name, text in (("state", state), ("phys_state", phys_state), ("link_layer", link_layer), ("rate", rate),
                       ("gids/0", gid)):
        (port_dir / name).write_text(f"{text}\n")


def stub_host_with_a_nic(root: Path) -> Path:
    """STUB of a host with a NIC: mlx5_0 port 1 ACTIVE on Ethernet (RoCE); mlx5_1 port 1 DOWN on InfiniBand,
    no cable (Polling), its GID table empty."""
    add_port(root, "mlx5_0", 1, state="4: ACTIVE", link_layer="Ethernet")
    add_port(root, "mlx5_1", 1, state="1: DOWN", link_layer="InfiniBand", gid=ZERO_GID, phys_state="2: Polling",
             rate="10 Gb/sec (4X SDR)")
    return root


ACTIVE_ROCE = RdmaPort(device="mlx5_0", port=1, state="ACTIVE", phys_state="LinkUp", link_layer="Ethernet",
                       fabric="RoCE", gid=ROCE_GID, rate_gbps=100.0)
DOWN_IB = RdmaPort(device="mlx5_1", port=1, state="DOWN", phys_state="Polling", link_layer="InfiniBand",
                   fabric="IB", gid=None, rate_gbps=10.0)


# ------------------------------------------------------------------------------------ this real machine


@pytest.mark.skipif(host_has_rdma(), reason="this host has RDMA devices: the no-device case is not here")
def test_this_host_has_no_rdma_device_and_says_kv_moves_over_tcp():
    assert rdma_devices.list_devices() == []
    scan = rdma_devices.scan()
    assert scan.ports == () and scan.note is None
    assert scan.source == ("pyverbs" if HAS_PYVERBS else "sysfs")
    line = rdma_devices.summary(scan.ports, scan.source)
    assert line.startswith("no RDMA device on this host: KV moves over TCP between hosts"), line
    assert line.endswith("(seen by pyverbs)" if HAS_PYVERBS else "(read from /sys/class/infiniband)"), line
    assert not rdma_devices.has_active_port(rdma_devices.list_devices())


@pytest.mark.skipif(not HAS_PYVERBS, reason="pyverbs does not import here (make install as root adds it)")
def test_pyverbs_is_the_source_where_it_imports_and_agrees_with_sysfs():
    by_pyverbs = rdma_devices.scan()
    by_sysfs = rdma_devices.scan(rdma_devices.SYSFS_ROOT)  # a root given: sysfs alone
    assert by_pyverbs.source == "pyverbs" and by_sysfs.source == "sysfs"
    assert [(p.short(), p.gid) for p in by_pyverbs.ports] == [(p.short(), p.gid) for p in by_sysfs.ports]


# ------------------------------------------------------------------------------------- stub sysfs trees


def test_a_stub_host_with_one_active_roce_port_and_one_down_port(tmp_path):
    root = stub_host_with_a_nic(tmp_path)
    devices = rdma_devices.list_devices(root)
    assert devices == [ACTIVE_ROCE, DOWN_IB]
    assert rdma_devices.scan(root).source == "sysfs"
    assert [p.short() for p in devices] == ["mlx5_0/1 ACTIVE RoCE", "mlx5_1/1 DOWN IB"]
    assert rdma_devices.has_active_port(devices)
    line = rdma_devices.summary(devices, "sysfs")
    assert "mlx5_0/1 (RoCE)" in line and "--kv-transport nixl" in line and "mlx5_1" not in line, line
    assert line.endswith("(read from /sys/class/infiniband)")
    assert DOWN_IB.describe() == "mlx5_1/1 DOWN (Polling) IB, 10 Gb/s, GID[0] none"


def test_a_stub_host_whose_only_port_is_down_says_kv_moves_over_tcp_and_the_fix(tmp_path):
    add_port(tmp_path, "mlx5_1", 1, state="1: DOWN", link_layer="InfiniBand", phys_state="2: Polling")
    devices = rdma_devices.list_devices(tmp_path)
    assert [p.short() for p in devices] == ["mlx5_1/1 DOWN IB"]
    assert not rdma_devices.has_active_port(devices)
    line = rdma_devices.summary(devices)
    assert "mlx5_1/1 DOWN" in line and "none ACTIVE, so KV moves over TCP between hosts" in line, line
    assert "ibv_devinfo" in line and "subnet manager" in line


def test_an_iwarp_nic_is_not_called_roce(tmp_path):
    add_port(tmp_path, "iwp1s0", 1, state="4: ACTIVE", link_layer="Ethernet", node_type="4: RNIC")
    assert [p.short() for p in rdma_devices.list_devices(tmp_path)] == ["iwp1s0/1 ACTIVE iWARP"]


def test_an_unreadable_or_odd_tree_is_no_device_not_an_error(tmp_path):
    assert rdma_devices.list_devices(tmp_path / "absent") == []
    (tmp_path / "odd" / "mlx5_0" / "ports" / "not-a-number").mkdir(parents=True)
    assert rdma_devices.list_devices(tmp_path / "odd") == []


# --------------------------------------------------------------------------- a stand-in for pyverbs.device


class StubVerbs:
    """STUB of pyverbs.device: devices and ports as libibverbs would report them, or its failure to list any."""

    def __init__(self, ports: dict[str, list[dict]] | None = None, list_error: Exception | None = None,
                 open_error: Exception | None = None):
        self.ports, self.list_error, self.open_error = ports or {}, list_error, open_error
        self.num_open = 0

    def get_device_list(self):
        if self.list_error is not None:
            raise self.list_error
        return [SimpleNamespace(name=name.encode(), node_type=1) for name in self.ports]

    def Context(self, name: str):  # noqa: N802: pyverbs' name
        if self.open_error is not None:
            raise self.open_error
        stub, ports = self, self.ports[name]
        stub.num_open += 1

        class Context:
            def query_device(self):
                return SimpleNamespace(phys_port_cnt=len(ports))

            def query_port(self, num):
                return SimpleNamespace(**{k: v for k, v in ports[num - 1].items() if k != "gid"})

            def query_gid(self, num, index):
                assert index == 0
                return ports[num - 1]["gid"]

            def close(self):
                stub.num_open -= 1

        return Context()


def test_ports_read_through_a_stub_pyverbs_match_what_sysfs_says_of_them(tmp_path):
    # ibv_port_attr of the stub host's two ports: state 4 ACTIVE / 1 DOWN, link layer 2 Ethernet / 1 InfiniBand,
    # speed 32 (25 Gb/s EDR lane) x width 2 (4X) / speed 1 (2.5, SDR) x 2.
    verbs = StubVerbs({
        "mlx5_0": [dict(state=4, phys_state=5, link_layer=2, active_speed=32, active_width=2, gid=ROCE_GID)],
        "mlx5_1": [dict(state=1, phys_state=2, link_layer=1, active_speed=1, active_width=2, gid=ZERO_GID)],
    })
    scan = rdma_devices.scan(stub_host_with_a_nic(tmp_path), verbs=verbs)
    assert scan == rdma_devices.Scan((ACTIVE_ROCE, DOWN_IB), "pyverbs")
    assert verbs.num_open == 0  # every context closed


def test_a_stub_pyverbs_that_cannot_list_falls_back_to_sysfs_naming_the_fix(tmp_path):
    # libibverbs fails to list (rather than lists none) where the kernel has no verbs interface, as on this machine.
    failing = StubVerbs(list_error=RuntimeError("Failed to get devices list"))
    assert rdma_devices.scan(tmp_path / "absent", verbs=failing) == rdma_devices.Scan((), "pyverbs")
    scan = rdma_devices.scan(stub_host_with_a_nic(tmp_path), verbs=failing)
    assert scan.ports == (ACTIVE_ROCE, DOWN_IB) and scan.source == "sysfs"
    assert "Failed to get devices list" in scan.note and "modprobe ib_uverbs" in scan.note
    # A device it lists but cannot open (no /dev/infiniband in a container) is the same fallback.
    unopenable = StubVerbs({"mlx5_0": []}, open_error=OSError(13, "Permission denied"))
    assert "--device /dev/infiniband" in rdma_devices.scan(tmp_path, verbs=unopenable).note
    # One that lists none of what sysfs has lacks the NIC's provider library.
    assert "ibverbs-providers" in rdma_devices.scan(tmp_path, verbs=StubVerbs({})).note


# ----------------------------------------------------------------------------------- what heartbeats carry


def heartbeat_json(**fields) -> bytes:
    return orjson.dumps({"type": "heartbeat", "schema_version": SCHEMA_VERSION, "worker_id": "p1",
                         "role": "prefill", "interval_s": 1.0, "sent_at": 1.0, "started_at": 0.5, **fields})


def test_a_heartbeat_carries_ports_and_one_without_them_still_decodes():
    assert decode(heartbeat_json(), Heartbeat).rdma_ports == ()  # an older worker's
    ports = [p.short() for p in (ACTIVE_ROCE, DOWN_IB)]
    assert decode(heartbeat_json(rdma_ports=ports), Heartbeat).rdma_ports == tuple(ports)
    with pytest.raises(InvalidMessage, match="invalid field"):
        decode(heartbeat_json(rdma_ports=["x" * 101]), Heartbeat)
