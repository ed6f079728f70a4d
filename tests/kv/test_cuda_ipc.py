"""The cuda-ipc path: a decode process copies a prefill process's GPU KV device to device (CUDA IPC handles and
one copy kernel). The prefill side runs in a process of its own, as in production (CUDA IPC handles cannot be
opened by the process that made them). Skipped where there is no CUDA."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from pdserve.kv import TransferClient, TransferIntegrityError, TransferRefused  # noqa: E402
from pdserve.kv.cuda_ipc import CHUNK_NBYTES, copy, copy_table  # noqa: E402
from pdserve.kv.vllm_pool import make_kv_block_pool  # noqa: E402
from tests.kv.gpu_kv import LAYOUT, NUM_BLOCKS, gpu_caches  # noqa: E402


# The prefill process: a GPU pool (seed 3) behind an endpoint; one JSON command per line on stdin.
PREFILL = """
import json, sys, threading, time
from pdserve.kv import TransferEndpoint
from pdserve.kv.vllm_pool import make_kv_block_pool
from tests.kv.gpu_kv import LAYOUT, NUM_BLOCKS, gpu_caches
pool = make_kv_block_pool(gpu_caches(3), NUM_BLOCKS, "m", LAYOUT)
ep = TransferEndpoint(pool, bind_host="127.0.0.1")
describe = ep._describe_device
def release_right_after(pull):  # as if the prefill side released the transfer during the decode side's copy
    message = describe(pull)
    threading.Thread(target=ep.release, args=(pull.transfer_id,)).start()  # once this message is cut
    return message
ep.start()
print(json.dumps([ep.address, ep.host_id, list(ep.transports)]), flush=True)
for line in sys.stdin:
    op, tid, ids = json.loads(line)
    if op == "allow":
        ep.allow(tid, "secret", ids, time.time() + 60)
    elif op == "release":
        ep.release(tid)
    elif op == "release_during_copy":
        ep._describe_device = release_right_after
    print("ok", flush=True)
"""


@pytest.fixture
def prefill():
    proc = subprocess.Popen([sys.executable, "-c", PREFILL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    address, host, transports = json.loads(proc.stdout.readline())

    def command(op: str, tid: str, ids=()):
        proc.stdin.write(json.dumps([op, tid, list(ids)]) + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"

    yield address, host, tuple(transports), command
    proc.stdin.close()
    proc.kill()
    proc.wait(timeout=30)


async def pull(client, peer, dst, remote, local, token="secret", tid="t"):
    address, host, transports, _ = peer
    return await client.pull(address, tid, token, remote, dst, local, timeout_s=30, peer_host_id=host,
                             peer_transports=transports)


def test_the_copy_kernel_moves_scattered_rows_of_every_segment_array():
    src = [torch.randint(0, 255, (50, n), dtype=torch.uint8, device="cuda") for n in (16, 4096, 3 * CHUNK_NBYTES + 48)]
    dst = [torch.zeros_like(t) for t in src]
    rows_from, rows_to = [3, 17, 4, 49], [0, 48, 5, 20]
    table = copy_table([t.data_ptr() for t in src], [t.stride(0) for t in src], [t.data_ptr() for t in dst],
                       [t.stride(0) for t in dst], [t.shape[1] for t in src], rows_from, rows_to)
    copy(table, src[0].device)
    for s, d in zip(src, dst):
        assert torch.equal(d[rows_to], s[rows_from])
        untouched = [r for r in range(50) if r not in rows_to]
        assert not d[untouched].any()


async def test_pull_over_cuda_ipc_between_two_processes(prefill):
    *_, command = prefill
    target = gpu_caches(4)
    dst = make_kv_block_pool(target, NUM_BLOCKS, "m", LAYOUT)
    remote, local = list(range(10, 42)), list(range(50, 18, -1))
    command("allow", "t", remote)
    client = TransferClient(transport="cuda-ipc")
    try:
        result = await pull(client, prefill, dst, remote, local)
        again = list(range(0, 8))
        command("allow", "t2", again)
        second = await pull(client, prefill, dst, again, list(range(56, 64)), tid="t2")  # handles opened once
    finally:
        client.close()
    assert result.transport == second.transport == "cuda-ipc" and result.num_blocks == len(remote)
    source = gpu_caches(3)  # the prefill process's bytes (same seed)
    for name in source:
        assert torch.equal(source[name][:, remote], target[name][:, local])
        assert torch.equal(source[name][:, again], target[name][:, 56:64])


async def test_cuda_ipc_refuses_as_tcp_does(prefill):
    *_, command = prefill
    dst = make_kv_block_pool(gpu_caches(5), NUM_BLOCKS, "m", LAYOUT)
    command("allow", "t", [1, 2])
    client = TransferClient(transport="cuda-ipc")
    try:
        with pytest.raises(TransferRefused) as bad_token:
            await pull(client, prefill, dst, [1, 2], [1, 2], token="wrong")
        command("release", "t")
        with pytest.raises(TransferRefused) as released:
            await pull(client, prefill, dst, [1, 2], [1, 2])
    finally:
        client.close()
    assert (bad_token.value.reason, released.value.reason) == ("bad_token", "released")


async def test_a_release_during_the_copy_fails_the_pull(prefill):
    *_, command = prefill
    dst = make_kv_block_pool(gpu_caches(6), NUM_BLOCKS, "m", LAYOUT)
    command("allow", "t", [1, 2, 3])
    command("release_during_copy", "t")
    client = TransferClient(transport="cuda-ipc")
    try:
        with pytest.raises(TransferIntegrityError, match="released it while its blocks were being copied"):
            await pull(client, prefill, dst, [1, 2, 3], [1, 2, 3])
    finally:
        client.close()
