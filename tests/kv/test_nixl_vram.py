"""The nixl path for GPU KV: the prefill process registers its KV tensors' GPU memory with NIXL and gathers each
batch into one registered device buffer (piece by piece where none is free), the decode side READs it into landing
buffers in its own GPU's memory and copies them into its blocks on the device, and the endpoint confirms the
transfer was held throughout (no checksums on the device). The prefill side runs in a process of its own, as in
production. Skipped where there is no CUDA or no NIXL (CI has neither: run on the GPU machine)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from pdserve.kv import (TransferClient, TransferError, TransferIntegrityError, TransferRefused,  # noqa: E402
                        TransferTimeout, nixl_path)
from pdserve.kv.vllm_pool import make_kv_block_pool  # noqa: E402
from tests.kv.gpu_kv import LAYOUT, NUM_BLOCKS, gpu_caches  # noqa: E402
from tests.kv.test_nixl import raw_pull as host_raw_pull  # noqa: E402

pytestmark = pytest.mark.skipif(nixl_path.why_unavailable() is not None,
                                reason=f"NIXL does not load here: {nixl_path.why_unavailable()}")

BATCH_BLOCKS = 8  # the endpoint's device batches here: a 32-block pull is 4 READs, several in flight

# The prefill process: a GPU pool (seed 3) behind an endpoint that offers nixl; one JSON command per line on stdin.
PREFILL = f"""
import json, sys, threading, time
from pdserve.kv import TransferEndpoint
from pdserve.kv.vllm_pool import make_kv_block_pool
from tests.kv.gpu_kv import LAYOUT, NUM_BLOCKS, gpu_caches
pool = make_kv_block_pool(gpu_caches(3), NUM_BLOCKS, "m", LAYOUT)
ep = TransferEndpoint(pool, bind_host="127.0.0.1", offer_nixl=True)
ep._cutter.device_batch_blocks = {BATCH_BLOCKS}
describe = ep._cutter.describe_device_batch
def release_right_after(pull):  # as if the prefill side released the transfer while the decode side READs it
    message = describe(pull)
    threading.Thread(target=ep.release, args=(pull.transfer_id,)).start()  # once this message is cut
    return message
ep.start()
print(json.dumps([ep.address, ep.host_id, list(ep.transports)]), flush=True)
for line in sys.stdin:
    op, tid, ids = json.loads(line)
    if op == "allow":
        ep.allow(tid, "secret", ids, time.time() + 60)
    elif op == "stage":  # what a tcp pull of GPU KV needs: host slots
        pool.stage_out(ids)
        ep.allow(tid, "secret", ids, time.time() + 60)
    elif op == "release":
        ep.release(tid)
    elif op == "release_during_reads":
        ep._cutter.describe_device_batch = release_right_after
    elif op == "pause":
        ep.pause_for_tests(3.0)
    elif op == "stats":
        print(json.dumps(ep.stats()), flush=True)
        continue
    print("ok", flush=True)
"""


@pytest.fixture
def prefill():
    proc = subprocess.Popen([sys.executable, "-c", PREFILL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    address, host, transports = json.loads(proc.stdout.readline())

    def command(op: str, tid: str = "", ids=()):
        proc.stdin.write(json.dumps([op, tid, list(ids)]) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline().strip()
        if op == "stats":
            return json.loads(answer)
        assert answer == "ok"

    yield address, host, tuple(transports), command
    proc.stdin.close()
    proc.kill()
    proc.wait(timeout=30)


async def pull(client, peer, dst, remote, local, token="secret", tid="t", timeout_s=30.0):
    address, host, transports, _ = peer
    return await client.pull(address, tid, token, remote, dst, local, timeout_s=timeout_s, peer_host_id=host,
                             peer_transports=transports)


def assert_moved(target: dict, remote, local) -> None:
    source = gpu_caches(3)  # the prefill process's bytes (same seed)
    for name in source:
        assert torch.equal(source[name][:, remote], target[name][:, local]), name


async def test_gpu_kv_moves_device_to_device_over_nixl(prefill):
    *_, transports, command = prefill
    assert "nixl" in transports
    target = gpu_caches(4)
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    # consecutive rows there, reversed here; 5 batches: the fifth goes piece by piece (4 gather buffers, all held)
    remote, local = list(range(10, 50)), list(range(50, 10, -1))
    command("allow", "t", remote)
    client = TransferClient(transport="nixl")
    try:
        result = await pull(client, prefill, dst, remote, local)
        scattered = [1, 63, 7, 8, 9, 30]
        command("allow", "t2", scattered)
        second = await pull(client, prefill, dst, scattered, [0, 2, 4, 6, 60, 61], tid="t2")  # the agent known now
    finally:
        client.close()
    assert (result.transport, second.transport) == ("nixl", "nixl")
    assert result.landed_on_device and second.landed_on_device
    assert result.num_bytes == len(remote) * LAYOUT.bytes_per_block
    assert dst.num_bytes_to_device == 0  # nothing went through the host staging slots
    assert_moved(target, remote, local)
    assert_moved(target, scattered, [0, 2, 4, 6, 60, 61])
    stats = command("stats")
    assert stats["num_transfers_served"] == 2 and stats["num_bytes_sent"] == (40 + 6) * LAYOUT.bytes_per_block


async def test_nixl_refuses_gpu_kv_as_tcp_does(prefill):
    *_, command = prefill
    dst = make_kv_block_pool(gpu_caches(5), NUM_BLOCKS, "m", LAYOUT)
    command("allow", "t", [1, 2])
    client = TransferClient(transport="nixl")
    try:
        with pytest.raises(TransferRefused) as bad_token:
            await pull(client, prefill, dst, [1, 2], [1, 2], token="wrong")
        command("release", "t")
        with pytest.raises(TransferRefused) as released:
            await pull(client, prefill, dst, [1, 2], [1, 2])
    finally:
        client.close()
    assert (bad_token.value.reason, released.value.reason) == ("bad_token", "released")


async def test_a_release_during_the_reads_fails_the_pull(prefill):
    *_, command = prefill
    dst = make_kv_block_pool(gpu_caches(6), NUM_BLOCKS, "m", LAYOUT)
    command("allow", "one-batch", [1, 2, 3])
    command("allow", "four-batches", list(range(32)))
    command("release_during_reads")
    client = TransferClient(transport="nixl")
    try:
        with pytest.raises(TransferIntegrityError, match="released it while its blocks were being copied"):
            await pull(client, prefill, dst, [1, 2, 3], [1, 2, 3], tid="one-batch")  # the endpoint's "done": not held
        # Refused at its next description, or, where every description was out before the release took hold,
        # failed by the endpoint's "done".
        with pytest.raises((TransferRefused, TransferIntegrityError)) as later_batch:
            await pull(client, prefill, dst, list(range(32)), list(range(32)), tid="four-batches")
    finally:
        client.close()
    assert getattr(later_batch.value, "reason", "released") == "released"


async def test_a_stalled_prefill_fails_the_pull_at_its_deadline(prefill):
    *_, command = prefill
    dst = make_kv_block_pool(gpu_caches(7), NUM_BLOCKS, "m", LAYOUT)
    command("allow", "t", list(range(16)))
    client = TransferClient(transport="nixl")
    try:
        command("pause")
        started = time.monotonic()
        with pytest.raises(TransferTimeout, match="timeout_s=1.0"):
            await pull(client, prefill, dst, list(range(16)), list(range(16)), timeout_s=1.0)
        assert time.monotonic() - started < 1.5
    finally:
        client.close()


async def test_a_puller_with_host_kv_takes_tcp_instead(prefill, caplog):
    *_, command = prefill
    target = {name: t.cpu() for name, t in gpu_caches(8).items()}
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)  # the same layout in host memory
    command("stage", "t", [5, 6, 7])
    client = TransferClient(transport="nixl")
    try:
        with caplog.at_level(logging.WARNING, logger="pdserve.kv.client"):
            result = await pull(client, prefill, dst, [5, 6, 7], [9, 10, 11])
    finally:
        client.close()
    assert result.transport == "tcp" and not result.landed_on_device
    assert "nixl moves GPU KV between GPU workers" in caplog.text
    source = gpu_caches(3)
    for name in source:
        assert torch.equal(source[name][:, [5, 6, 7]].cpu(), target[name][:, [9, 10, 11]])


def raw_pull(address: str, block_ids: list[int]) -> list[dict]:
    """A nixl pull of GPU KV by hand (test_nixl.raw_pull): every header the endpoint answers with."""
    like = make_kv_block_pool(gpu_caches(9), NUM_BLOCKS, "m", LAYOUT)  # the prefill side's layout
    return host_raw_pull(address, "secret", transfer_id="t", block_ids=block_ids,
                         segment_nbytes=list(like.segment_nbytes), layout_tag=like.layout_tag)


def test_a_peer_without_the_metadata_reads_no_gpu_memory(prefill):
    """The device descriptors alone do not let a NIXL agent read the prefill side's GPU memory: it needs the
    metadata, which the endpoint hands only to a puller with a valid token."""
    address, *_, command = prefill
    command("allow", "t", [2, 3])
    (description,) = raw_pull(address, [2, 3])
    assert description["k"] == "nixl" and description["mem"] == "VRAM" and "h" not in description
    assert len(description["iov"]) == 1  # the batch gathered into one device buffer (nixl_gather.py)
    remote = np.asarray(description["iov"], dtype=np.uint64)
    landing = torch.zeros(int(remote[:, 1].sum()), dtype=torch.uint8, device="cuda")
    ends = np.cumsum(remote[:, 1])
    local = np.stack([landing.data_ptr() + ends - remote[:, 1], remote[:, 1]], axis=1).astype(np.uint64)
    thief = nixl_path.NixlAgent("thief")
    try:
        registration = thief.register_region(landing.data_ptr(), landing.nbytes, "VRAM", 0)
        with pytest.raises(TransferError, match="could not prepare"):
            thief.post_read(description["agent"], local, remote, local_kind="VRAM", remote_kind="VRAM",
                            remote_device=description["dev"])
        assert not landing.any()
        name = thief.know(address, description["agent"], description["md"])  # what a puller with the token gets
        handle = thief.post_read(name, local, remote, local_kind="VRAM", remote_kind="VRAM",
                                 remote_device=description["dev"])
        thief.wait(handle, time.monotonic() + 10, lambda: None)
        assert landing.any()  # with the metadata, the descriptors do read (they point at the blocks)
        thief.deregister_region(registration)
    finally:
        thief.close()
