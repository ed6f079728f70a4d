"""`pdserve status` and `pdserve doctor`: each doctor check on hand-made heartbeats, then both commands against
a real nats-server (hand-published heartbeats) and a real `pdserve up --engine mock`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import orjson
import pytest
import zmq
import zmq.asyncio

from pdserve import doctor, models, netaddr, rdma_devices, status, subjects
from pdserve.bus import Bus
from pdserve.config import BusOptions
from pdserve.kv.endpoint import TransferEndpoint
from pdserve.kv.pool import ArrayBlockPool
from pdserve.protocol import Goodbye, Heartbeat, KVLayout, ModelCard
from tests.e2e.conftest import PdserveUp, Service, free_port
from tests.test_rdma_devices import StubVerbs, add_port, host_has_rdma, stub_host_with_a_nic

NO_RDMA_HERE = "no RDMA device on this host: KV moves over TCP"


def make_heartbeat(worker_id: str, role: str = "prefill", *, model: str | None = "m", tokenizer: str = "byte",
                   transfer_address: str | None = "tcp://127.0.0.1:5555", block_size: int = 32,
                   dtype: str = "float16", max_model_len: int = 4096, interval_s: float = 1.0,
                   sent_at: float | None = None, **fields) -> Heartbeat:
    card = None if model is None else ModelCard(
        name=model, tokenizer=tokenizer, max_model_len=max_model_len,
        kv_layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype, dtype_bytes=2, block_size=block_size))
    now = time.time()
    return Heartbeat(worker_id=worker_id, role=role, model=card, transfer_address=transfer_address,
                     interval_s=interval_s, sent_at=now if sent_at is None else sent_at, started_at=now, **fields)


def make_seen(hb: Heartbeat, received_at: float | None = None) -> status.Seen:
    return status.Seen(hb, time.time() if received_at is None else received_at, time.monotonic())


def make_model_dir(path, *, weights: bool = True):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def parse(module, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


def closed_port() -> int:
    return free_port()  # bound and released at once: nothing listens there


# --------------------------------------------------------------------------------- doctor's checks


def test_loopback_address_with_remote_nats_fails_naming_the_worker_and_the_fix():
    hbs = [make_heartbeat("p1", transfer_address="tcp://127.0.0.1:4000"),
           make_heartbeat("d1", "decode", transfer_address="tcp://10.0.0.7:4001")]
    result = doctor.check_advertised_hosts(hbs, ["nats://10.0.0.2:4222"])
    assert result.status == "FAIL"
    assert "p1" in result.message and "d1" not in result.message
    assert "--advertise-host" in result.message
    # The same addresses on a one-machine setup (NATS on loopback) are right.
    assert doctor.check_advertised_hosts(hbs, ["nats://127.0.0.1:4222"]).status == "OK"
    assert doctor.check_advertised_hosts(hbs, ["nats://localhost:4222"]).status == "OK"


def test_unspecified_or_malformed_address_fails_anywhere():
    for address in ("tcp://0.0.0.0:4000", "tcp://[::]:4000", "10.0.0.5:4000"):
        result = doctor.check_advertised_hosts([make_heartbeat("p1", transfer_address=address)], ["nats://127.0.0.1:4222"])
        assert result.status == "FAIL", address
        assert "p1" in result.message and "--advertise-host" in result.message


@pytest.mark.parametrize("field, a, b", [("block_size", 32, 16), ("dtype", "float16", "bfloat16"),
                                          ("max_model_len", 4096, 2048)])
def test_workers_disagreeing_on_one_model_fail_naming_both_and_the_values(field, a, b):
    hbs = [make_heartbeat("p1", **{field: a}), make_heartbeat("d1", "decode", **{field: b}),
           make_heartbeat("d2", "decode", **{field: a})]
    result = doctor.check_model_agreement(hbs)
    assert result.status == "FAIL"
    assert field in result.message
    assert f"d1 has {b!r}; d2, p1 have {a!r}" in result.message


def test_different_models_may_differ_and_agreeing_workers_pass():
    hbs = [make_heartbeat("p1", model="a", block_size=32), make_heartbeat("d1", "decode", model="a", block_size=32),
           make_heartbeat("p2", model="b", block_size=16), make_heartbeat("broker", "broker", model=None)]
    result = doctor.check_model_agreement(hbs)
    assert result.status == "OK", result.message
    assert "a (2 worker(s)" in result.message and "b (1 worker(s)" in result.message


def test_tokenizer_disagreement_fails_against_byte_and_warns_between_paths():
    byte_vs_path = [make_heartbeat("p1"), make_heartbeat("d1", "decode", tokenizer="/models/m")]
    result = doctor.check_model_agreement(byte_vs_path)
    assert result.status == "FAIL" and "tokenizer" in result.message and "/models/m" in result.message
    # Two paths may be one model copied to two hosts: worth a look, not a failure.
    two_paths = [make_heartbeat("p1", tokenizer="/a/m"), make_heartbeat("d1", "decode", tokenizer="/b/m")]
    result = doctor.check_model_agreement(two_paths)
    assert result.status == "WARN" and "/a/m" in result.message and "/b/m" in result.message


@pytest.mark.parametrize("skew_s, verdict", [(0.05, "OK"), (-0.5, "OK"), (5.0, "WARN"), (-15.0, "FAIL")])
def test_clock_skew(skew_s, verdict):
    now = time.time()
    members = [make_seen(make_heartbeat("p1", sent_at=now), now),
               make_seen(make_heartbeat("d1", "decode", sent_at=now - skew_s), now)]
    result = doctor.check_clock_skew(members)
    assert result.status == verdict, result.message
    if verdict != "OK":
        assert "d1" in result.message and f"{abs(skew_s):.1f}s" in result.message and "NTP" in result.message
        assert ("behind" if skew_s > 0 else "ahead") in result.message
        assert "p1" not in result.message


def test_model_files(tmp_path, monkeypatch):
    good = make_model_dir(tmp_path / "good")
    bad = make_model_dir(tmp_path / "bad", weights=False)
    assert doctor.check_model_files([], str(good)).status == "OK"
    result = doctor.check_model_files([], str(bad))
    assert result.status == "FAIL" and "safetensors" in result.message
    # A worker's model directory found on this machine is checked too; one elsewhere is only mentioned.
    hbs = [make_heartbeat("p1", tokenizer=str(bad)), make_heartbeat("p2", tokenizer="/not/on/this/host")]
    result = doctor.check_model_files(hbs, None)
    assert result.status == "FAIL" and str(bad) in result.message
    result = doctor.check_model_files(hbs[1:] + [make_heartbeat("m1")], None)
    assert result.status == "SKIP" and "/not/on/this/host" in result.message and "1 mock" in result.message
    # The default model is looked for in the cache, never downloaded by doctor.
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path / "cache"))
    result = doctor.check_model_files([], models.DEFAULT_MODEL)
    assert result.status == "FAIL" and "pdserve model pull" in result.message
    assert not (tmp_path / "cache").exists()


async def test_transfer_endpoints_take_a_tcp_connect_from_a_zmq_router():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        up = make_heartbeat("p1", transfer_address=f"tcp://127.0.0.1:{port}")
        down = make_heartbeat("d1", "decode", transfer_address=f"tcp://127.0.0.1:{closed_port()}")
        assert (await doctor.check_transfer_endpoints([up])).status == "OK"
        result = await doctor.check_transfer_endpoints([up, down], timeout_s=1)
        assert result.status == "FAIL"
        assert "1 of 2" in result.message and "d1" in result.message and "p1 " not in result.message
        assert "--advertise-host" in result.message
        # Brokers advertise no endpoint: nothing to probe.
        assert (await doctor.check_transfer_endpoints([make_heartbeat("b", "broker", transfer_address=None)])).status == "SKIP"
    finally:
        router.close(linger=0)
        ctx.term()


def test_members():
    url = "nats://127.0.0.1:4222"
    assert doctor.check_members([], url, 1.5).status == "WARN"
    result = doctor.check_members([make_heartbeat("p1"), make_heartbeat("b", "broker")], url, 1.5)
    assert result.status == "WARN" and "decode" in result.message
    full = [make_heartbeat("p1"), make_heartbeat("d1", "decode"), make_heartbeat("b", "broker")]
    assert doctor.check_members(full, url, 1.5).status == "OK"


@pytest.mark.skipif(host_has_rdma(), reason="this host has RDMA devices: the no-device case is not here")
def test_rdma_on_this_host_without_a_device_is_ok_and_names_the_tcp_path():
    result = doctor.check_rdma(rdma_devices.scan())
    assert result.status == "OK" and result.message.startswith(NO_RDMA_HERE), result
    assert doctor.format_result(result).startswith(f"OK    rdma         {NO_RDMA_HERE}")


def test_rdma_ports_of_a_stub_host_are_listed_and_none_active_warns(tmp_path):
    # STUB hosts (fake sysfs trees, see tests/test_rdma_devices.py): one with an ACTIVE RoCE port and a DOWN port,
    # one whose only port is DOWN.
    result = doctor.check_rdma(rdma_devices.scan(stub_host_with_a_nic(tmp_path / "nic")))
    assert result.status == "OK", result
    summary, *findings = result.message.splitlines()
    assert "mlx5_0/1 (RoCE)" in summary and "--kv-transport nixl" in summary
    assert findings[:2] == ["mlx5_0/1 ACTIVE (LinkUp) RoCE, 100 Gb/s, GID[0] fe80:0000:0000:0000:0202:c9ff:fe00:0001",
                            "mlx5_1/1 DOWN (Polling) IB, 10 Gb/s, GID[0] none"]
    assert "python3-pyverbs" in findings[2]  # read from sysfs: what libibverbs sees is not checked
    add_port(tmp_path / "down", "mlx5_1", 1, state="1: DOWN", link_layer="InfiniBand")
    result = doctor.check_rdma(rdma_devices.scan(tmp_path / "down"))
    assert result.status == "WARN" and "KV moves over TCP" in result.message and "ibv_devinfo" in result.message
    # A STUB pyverbs that cannot list them: the ports are there, but NIXL/UCX could not use them.
    unusable = rdma_devices.scan(tmp_path / "nic", verbs=StubVerbs(list_error=RuntimeError("Failed to get devices list")))
    result = doctor.check_rdma(unusable)
    assert result.status == "WARN" and "modprobe ib_uverbs" in result.message.splitlines()[0], result


# ----------------------------------------------------------------------------------- status output


def test_table_has_one_row_per_member_and_dashes_for_a_brokers_engine_columns():
    members = [make_seen(make_heartbeat("p1", num_queued=3, num_running=2, kv_usage=0.25, num_held_blocks=7,
                                        num_requests_served=11, kv_transports=("tcp", "shm"),
                                        num_kv_pulls={"shm": 4, "tcp": 0})),
               make_seen(make_heartbeat("b1", "broker", model=None, transfer_address=None, num_requests_served=5))]
    text = status.render(members, "nats://x:4222", 1.5, as_json=False)
    header, p1, b1 = text.splitlines()[:3]
    assert header.split() == ["WORKER", "ROLE", "MODEL", "TRANSFER", "QUEUED", "RUNNING", "KV%", "HELD", "LAST_HB",
                              "SERVED", "KV_PATHS", "KV_PULLS"]
    assert p1.split()[:8] == ["p1", "prefill", "m", "tcp://127.0.0.1:5555", "3", "2", "25.0", "7"]
    assert p1.split()[-3:] == ["11", "tcp+shm", "shm:4"]
    assert b1.split()[:8] == ["b1", "broker", "-", "-", "-", "-", "-", "-"] and b1.split()[-3:] == ["5", "-", "-"]
    assert "1 prefill, 1 broker" in text
    rows = json.loads(status.render(members, "nats://x:4222", 1.5, as_json=True))
    assert set(rows[0]) == {"worker_id", "role", "model", "transfer_address", "num_queued", "num_running", "kv_usage",
                            "num_held_blocks", "num_requests_served", "last_heartbeat_s", "kv_transports",
                            "num_kv_pulls", "unreachable_peer_ids", "rdma_ports"}
    assert rows[0]["kv_usage"] == 0.25 and rows[1]["model"] is None
    assert "unreachable KV paths" not in text
    members.append(make_seen(make_heartbeat("d1", "decode", unreachable_peer_ids=("p1", "p9"))))
    assert "\n  d1 cannot reach p1, p9" in status.render(members, "nats://x:4222", 1.5, as_json=False)


def test_each_workers_rdma_ports_or_that_it_has_none_are_shown():
    members = [make_seen(make_heartbeat("p1", rdma_ports=("mlx5_0/1 ACTIVE RoCE", "mlx5_1/1 DOWN IB"))),
               make_seen(make_heartbeat("p2", rdma_ports=("mlx5_0/1 DOWN IB",))),
               make_seen(make_heartbeat("d1", "decode")), make_seen(make_heartbeat("d2", "decode")),
               make_seen(make_heartbeat("b1", "broker", model=None, transfer_address=None))]
    text = status.render(members, "nats://x:4222", 1.5, as_json=False)
    lines = text.split("RDMA ports")[1].splitlines()[1:]
    assert lines == ["  p1: mlx5_0/1 ACTIVE RoCE, mlx5_1/1 DOWN IB",
                     "  p2: mlx5_0/1 DOWN IB (none ACTIVE: KV over TCP)",
                     "  d1, d2: no RDMA device (KV over TCP)"], text
    rows = json.loads(status.render(members, "nats://x:4222", 1.5, as_json=True))
    assert rows[0]["rdma_ports"] == ["mlx5_0/1 ACTIVE RoCE", "mlx5_1/1 DOWN IB"] and rows[2]["rdma_ports"] == []


# ------------------------------------------------------------------------- against a real nats-server


async def test_collector_follows_heartbeats_goodbyes_and_silence(nats):
    bus = await Bus.connect(nats.url, "test")
    try:
        collector = status.HeartbeatCollector()
        await collector.start(bus)
        for hb in (make_heartbeat("p1", interval_s=0.5), make_heartbeat("d1", "decode", interval_s=5)):
            await bus.publish(subjects.heartbeat(hb.role, hb.worker_id), hb)
        await bus.flush()
        await asyncio.sleep(0.2)
        assert [s.heartbeat.worker_id for s in collector.members()] == ["p1", "d1"]
        await bus.publish(subjects.goodbye("decode", "d1"), Goodbye(worker_id="d1", role="decode"))
        await bus.flush()
        await asyncio.sleep(0.2)
        assert [s.heartbeat.worker_id for s in collector.members()] == ["p1"]
        await asyncio.sleep(1.6)  # p1 missed 3 heartbeats of 0.5 s
        assert collector.members() == []
    finally:
        await bus.close()


async def test_doctor_reports_a_broken_cluster_from_its_heartbeats(nats, tmp_path):
    """Heartbeats on real NATS: one endpoint nobody serves, a mismatched block size, a skewed clock."""
    bus = await Bus.connect(nats.url, "test")
    dead_address = f"tcp://127.0.0.1:{closed_port()}"

    async def beat() -> None:
        while True:
            for hb in (make_heartbeat("p1", transfer_address=dead_address, sent_at=time.time() - 20),
                       make_heartbeat("d1", "decode", transfer_address=None, block_size=16)):
                await bus.publish(subjects.heartbeat(hb.role, hb.worker_id), hb)
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(beat())
    try:
        results = await doctor.diagnose(BusOptions(nats=nats.url), str(make_model_dir(tmp_path / "m")), 3, 0.6)
    finally:
        beating.cancel()
        await bus.close()
    verdicts = {r.name: r.status for r in results}
    assert verdicts == {"nats": "OK", "members": "WARN", "transfer": "FAIL", "metrics": "SKIP", "advertise": "OK",
                        "models": "FAIL", "model-files": "OK", "clock": "FAIL",
                        "rdma": "WARN" if host_has_rdma() else "OK"}, results
    by_name = {r.name: r.message for r in results}
    assert dead_address in by_name["transfer"] and "p1" in by_name["clock"]
    assert "p1 has 32" in by_name["models"] and "d1 has 16" in by_name["models"]


def test_no_workers_is_said_and_exits_zero(nats, capsys):
    assert status.run(parse(status, "--nats", nats.url, "--listen-s", "0.3")) == 0
    assert "no workers" in capsys.readouterr().out
    assert status.run(parse(status, "--nats", nats.url, "--listen-s", "0.3", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_unreachable_nats_is_one_line_naming_the_fix(capsys):
    url = f"nats://127.0.0.1:{closed_port()}"
    assert status.run(parse(status, "--nats", url, "--timeout-s", "1")) == 1
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1
    assert url in out.err and "--nats" in out.err and "Traceback" not in out.err
    assert doctor.run(parse(doctor, "--nats", url, "--timeout-s", "1")) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL  nats") and "--nats" in lines[0]
    rdma_line = next(line for line in lines if line.split()[1:2] == ["rdma"])  # needs no NATS
    assert host_has_rdma() or NO_RDMA_HERE in rdma_line, lines
    assert status.run(parse(status, "--nats", "http://nowhere")) == 2


# --------------------------------------------------------------------------------- against pdserve up


@pytest.mark.e2e
def test_status_and_doctor_against_pdserve_up(nats, tmp_path, capsys):
    up = PdserveUp(tmp_path, free_port(), "--nats", nats.url, "--prefill", "1", "--decode", "1")
    try:
        up.wait_ready(1, 1)
        body = json.dumps({"model": "pdserve-mock", "prompt": "hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{up.base_url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200

        assert status.run(parse(status, "--nats", nats.url, "--json")) == 0
        rows = {r["role"]: r for r in json.loads(capsys.readouterr().out)}
        assert set(rows) == {"prefill", "decode", "broker"}
        for role in ("prefill", "decode"):
            assert rows[role]["model"] == "pdserve-mock" and rows[role]["transfer_address"].startswith("tcp://")
            assert rows[role]["last_heartbeat_s"] < 1.5
            assert host_has_rdma() or rows[role]["rdma_ports"] == []  # each worker read its host's ports at start
        assert rows["prefill"]["num_requests_served"] == rows["decode"]["num_requests_served"] == 1

        model_dir = make_model_dir(tmp_path / "model")
        assert doctor.run(parse(doctor, "--nats", nats.url, "--model", str(model_dir))) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[-1] == "9 OK", lines
        assert [line.split()[0] for line in lines[:-2]] == ["OK"] * 9

        # The command line as an operator runs it: --watch redraws until Ctrl-C, which ends it cleanly.
        watch = subprocess.Popen([sys.executable, "-m", "pdserve.status", "--nats", nats.url, "--watch", "0.3"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            seen = ""
            while seen.count("Ctrl-C to stop") < 2 and time.monotonic() < deadline:
                seen += watch.stdout.readline()
            watch.send_signal(signal.SIGINT)
            out, err = watch.communicate(timeout=10)
        finally:
            if watch.poll() is None:
                watch.kill()
        assert watch.returncode == 0 and "Traceback" not in err, err
        assert seen.count("Ctrl-C to stop") >= 2 and "1 prefill, 1 decode, 1 broker" in seen
        workers = f"{rows['prefill']['worker_id']}, {rows['decode']['worker_id']}"
        assert host_has_rdma() or f"\n  {workers}: no RDMA device (KV over TCP)" in seen, seen
    finally:
        up.stop()
        assert not up.kill_leftovers()


# ------------------------------------------------------------------------ doctor's reachability probes


@contextlib.contextmanager
def silent_port():
    """A port whose connects time out, as behind a firewall that drops packets: a listener whose accept queue is
    full (Linux drops further SYNs), held by connections nobody accepts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    time.sleep(0.1)
    try:
        yield port
    finally:
        for s in held:
            s.close()
        listener.close()


async def test_every_dead_endpoint_is_named_with_its_reason_within_one_timeout():
    with silent_port() as port:
        hbs = [make_heartbeat(f"p{i}", transfer_address=f"tcp://127.0.0.1:{port}") for i in range(20)]
        hbs.append(make_heartbeat("d1", "decode", transfer_address=f"tcp://127.0.0.1:{closed_port()}"))
        started = time.monotonic()
        result = await doctor.check_transfer_endpoints(hbs, timeout_s=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 4, f"probes ran one after another: {elapsed:.1f}s"
    assert result.status == "FAIL"
    lines = result.message.splitlines()
    assert "21 of 21" in lines[0]
    timed_out = [line for line in lines[1:] if "timed out after 1s" in line]
    assert len(timed_out) == 20 and all("firewall" in line and "--advertise-host" in line for line in timed_out)
    [refused] = [line for line in lines[1:] if line.startswith("d1 ")]
    assert "Connection refused (ECONNREFUSED)" in refused and "--bind-host 0.0.0.0" in refused


async def test_an_endpoint_whose_byte_stream_is_unreachable_warns_naming_its_port():
    """A ROUTER that answers hello as an endpoint does, naming a stream port where nothing listens."""
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dead_stream_port = closed_port()

    async def answer_hello() -> None:
        while True:
            identity, raw = await router.recv_multipart()
            hello = orjson.loads(raw)
            await router.send_multipart([identity, orjson.dumps(
                {"k": "hello", "nonce": hello["nonce"], "port": dead_stream_port, "ticket": "00" * 16})])

    answering = asyncio.create_task(answer_hello())
    try:
        hb = make_heartbeat("p1", transfer_address=f"tcp://127.0.0.1:{port}")
        result = await doctor.check_transfer_endpoints([hb])
    finally:
        answering.cancel()
        router.close(linger=0)
        ctx.term()
    assert result.status == "WARN", result.message
    assert f"p1 byte stream 127.0.0.1:{dead_stream_port}" in result.message
    assert "Connection refused" in result.message and "ZeroMQ frames" in result.message


async def test_a_real_transfer_endpoint_is_reachable_with_its_byte_stream():
    endpoint = TransferEndpoint(ArrayBlockPool([np.zeros((4, 64), np.uint8)]), bind_host="127.0.0.1",
                                tune_malloc=False, offer_shm=False)
    endpoint.start()
    try:
        result = await doctor.check_transfer_endpoints([make_heartbeat("p1", transfer_address=endpoint.address)])
    finally:
        endpoint.stop()
    assert result.status == "OK" and "not checked" not in result.message, result.message


async def test_unreachable_metrics_endpoints_warn_naming_each():
    with socket.socket() as up:
        up.bind(("127.0.0.1", 0))
        up.listen()
        hbs = [make_heartbeat("p1", metrics_address=f"http://127.0.0.1:{up.getsockname()[1]}/metrics"),
               make_heartbeat("p2", metrics_address=f"http://127.0.0.1:{closed_port()}/metrics"),
               make_heartbeat("d1", "decode", metrics_address="ftp://x/metrics")]
        result = await doctor.check_metrics_endpoints(hbs)
    assert result.status == "WARN"
    assert "2 of 3" in result.message and "p1 " not in result.message
    assert "p2 metrics" in result.message and "Connection refused" in result.message and "d1:" in result.message
    assert (await doctor.check_metrics_endpoints([make_heartbeat("p1")])).status == "SKIP"


async def test_each_unreachable_nats_server_of_a_list_is_named(nats):
    dead = f"nats://127.0.0.1:{closed_port()}"
    result, bus = await doctor.check_nats(BusOptions(nats=f"{nats.url},{dead}"), 3)
    try:
        assert result.status == "WARN" and "1 of 2" in result.message, result.message
        assert f"{dead}: Connection refused" in result.message and nats.url + ":" not in result.message
    finally:
        await bus.close()


def test_doctor_names_both_workers_that_advertise_an_address_they_do_not_listen_on(nats, tmp_path, capsys):
    """Real workers listening on 127.0.0.1 and advertising 127.0.0.2 (where, on Linux, nothing listens: refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        refused = asyncio.run(netaddr.tcp_unreachable("127.0.0.2", probe.getsockname()[1], 1.0))
    if refused is None or refused.kind != "refused":
        pytest.skip(f"127.0.0.2 does not refuse connections here ({refused})")
    workers = [Service(["prefill-worker", "--nats", nats.url, "--engine", "mock", "--worker-id", f"p{i}",
                        "--bind-host", "127.0.0.1", "--advertise-host", "127.0.0.2", "--num-kv-blocks", "256"],
                       str(tmp_path / f"p{i}.log")) for i in (1, 2)]
    try:
        deadline = time.monotonic() + 30
        while not all("prefill worker" in w.output() for w in workers):
            assert time.monotonic() < deadline and all(w.process.poll() is None for w in workers), \
                [w.output() for w in workers]
            time.sleep(0.1)
        started = time.monotonic()
        assert doctor.run(parse(doctor, "--nats", nats.url, "--listen-s", "1.5")) == 1
        elapsed = time.monotonic() - started
    finally:
        for w in workers:
            w.stop()
    out = capsys.readouterr().out
    transfer = out[out.index("FAIL  transfer"):out.index("WARN  metrics")]
    assert "2 of 2" in transfer
    for worker_id in ("p1", "p2"):
        assert f"- {worker_id} transfer endpoint tcp://127.0.0.2:" in transfer
    assert transfer.count("Connection refused (ECONNREFUSED)") == 2 and "--bind-host 0.0.0.0" in transfer
    assert "WARN  metrics" in out and out.count("metrics http://127.0.0.2:") == 2
    assert elapsed < 8, f"doctor took {elapsed:.1f}s"
