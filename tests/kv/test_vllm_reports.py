"""Load reports pushed from the connector's thread to the pdserve worker over a real ipc:// ZMQ socket.

The sender runs on its own thread (as in vLLM's worker process: the connector's pull loop); the receiver is
the worker's asyncio loop. Reports are matched on pdserve's id or vLLM's "<id>-<8 chars>", unexpected ones
are dropped, a wait ends at its deadline, and a sender nobody reads never blocks.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
import uuid

import pytest

from pdserve.kv.vllm_reports import LoadReports, LoadReportSender, report_endpoint

REPORT = dict(num_blocks=3, num_bytes=300, transfer_ms=1.5, recomputed=False, error=None, transport="shm")


def endpoint() -> str:
    return report_endpoint(f"test-{uuid.uuid4().hex[:8]}")


def send_from_thread(address: str, *reports: tuple[str, dict]) -> None:
    def run() -> None:
        sender = LoadReportSender(address)
        for rid, report in reports:
            sender.send(rid, report)
        time.sleep(0.2)  # linger 0: give ZMQ time to hand the messages over before the socket closes
        sender.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


async def test_reports_reach_their_waiters_under_either_id():
    reports = LoadReports(endpoint())
    reports.start()
    try:
        plain, suffixed, other = reports.expect("req-1"), reports.expect("req-2"), reports.expect("req-3")
        send_from_thread(reports.endpoint, ("req-1", REPORT), ("req-2-abcd1234", {**REPORT, "num_blocks": 7}),
                         ("nobody-waits", REPORT), ("req-3-toolongsuffix", REPORT))
        assert await reports.wait("req-1", plain, 5) == REPORT
        assert (await reports.wait("req-2", suffixed, 5))["num_blocks"] == 7
        started = time.monotonic()
        assert await reports.wait("req-3", other, 0.3) is None  # not vLLM's suffix: not req-3's report
        assert time.monotonic() - started < 2
        assert not reports._waiting  # every wait, ended either way, forgot its request
    finally:
        await reports.stop()
    assert not os.path.exists(reports.endpoint.removeprefix("ipc://"))


async def test_a_report_sent_before_the_listener_is_up_still_arrives():
    """vLLM's connector may come up (and, in principle, report) before the worker reads: ZMQ queues."""
    address = endpoint()
    sender = LoadReportSender(address)
    try:
        sender.send("early", REPORT)
        reports = LoadReports(address)
        reports.start()
        try:
            waiter = reports.expect("early")
            sender.send("early", REPORT)  # the one queued before bind may race the waiter; this one cannot
            assert await reports.wait("early", waiter, 5) == REPORT
        finally:
            await reports.stop()
    finally:
        sender.close()


def test_a_sender_nobody_reads_never_blocks():
    address = f"ipc://{os.path.join(tempfile.gettempdir(), f'pdserve-nobody-{uuid.uuid4().hex[:8]}.sock')}"
    sender = LoadReportSender(address)
    try:
        started = time.monotonic()
        for i in range(20000):  # far past the high-water mark
            sender.send(f"r{i}", REPORT)
        assert time.monotonic() - started < 5
        assert sender.num_dropped > 0
    finally:
        sender.close()


async def test_stop_cancels_the_waits():
    reports = LoadReports(endpoint())
    reports.start()
    waiter = reports.expect("never")
    task = asyncio.create_task(reports.wait("never", waiter, 30))
    await asyncio.sleep(0.05)
    await reports.stop()
    with pytest.raises(asyncio.CancelledError):
        await task
