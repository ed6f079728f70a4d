"""Decode handlers: the engine's KV-load report is an item of its stream, acted on there and never streamed.

When the report comes (pulled or recomputed), the prefill worker is told to free its copy (KVRelease) and the
router's broker learns how the transfer went (KVTransferDone); the report is no token: it makes no chunk and
does not count towards the tokens, the TTFT or the usage.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import AsyncIterator

from pdserve import subjects
from pdserve.engine.base import KVLoadReport, TokenOutput
from pdserve.protocol import KVRelease, KVTransferDone, TokenChunk
from services.decode_worker.main import DecodeHandlers
from tests.decode_worker.test_cancel import FakeEngine, FakeRuntime, request


class ReportingEngine(FakeEngine):
    """Yields the load report first when the request came with KV, as the engines do."""

    def __init__(self, report: KVLoadReport) -> None:
        super().__init__()
        self.report = report

    async def generate(self, request_id, prompt_token_ids, sampling, first_token_id, kv_transfer_params,
                       resume_token_ids=(), prefix_kv=None) -> AsyncIterator[TokenOutput | KVLoadReport]:
        if kv_transfer_params is not None:
            yield self.report
        async for out in super().generate(request_id, prompt_token_ids, sampling, first_token_id,
                                          kv_transfer_params, resume_token_ids):
            yield out


def make_runtime(report: KVLoadReport) -> FakeRuntime:
    rt = FakeRuntime()
    rt.engine = ReportingEngine(report)
    observed: list[tuple[str, float]] = []
    histogram = SimpleNamespace(labels=lambda transport: SimpleNamespace(
        observe=lambda seconds: observed.append((transport, seconds))))
    rt.metrics = SimpleNamespace(kv_transfer_seconds=histogram, observed=observed)
    return rt


async def run_one(rt: FakeRuntime, request_id: str = "r1") -> list[tuple[str, object]]:
    handlers = DecodeHandlers(rt)
    await handlers.on_decode(request(request_id, with_kv=True))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if rt.num_in_flight == 0:
            break
    await asyncio.gather(*rt._spawned)
    return rt.bus.published


async def test_a_pulled_kv_releases_prefills_copy_and_is_not_streamed():
    rt = make_runtime(KVLoadReport(2, 4096, 1.5, recomputed=False, transport="tcp"))
    published = await run_one(rt)
    releases = [m for s, m in published if s == subjects.kv_release("prefill-1")]
    assert [(r.request_id, r.ok) for r in releases if isinstance(r, KVRelease)] == [("r1", True)]
    done = [m for _, m in published if isinstance(m, KVTransferDone)]
    assert [(d.ok, d.num_blocks, d.num_bytes) for d in done] == [(True, 2, 4096)]
    assert rt.metrics.observed == [("tcp", 0.0015)]
    chunks = [m for _, m in published if isinstance(m, TokenChunk)]
    assert [c.seq for c in chunks] == list(range(5)) and all(c.token_ids == (97,) for c in chunks)
    assert chunks[-1].usage.completion_tokens == 6  # the first token from prefill + 5 decoded, no report
    assert rt.num_requests_served == 1


async def test_a_recomputed_kv_releases_prefills_copy_as_not_pulled():
    rt = make_runtime(KVLoadReport(0, 0, 0.0, recomputed=True, error="TransferTimeout: too slow"))
    published = await run_one(rt)
    releases = [m for s, m in published if s == subjects.kv_release("prefill-1")]
    assert [(r.request_id, r.ok) for r in releases if isinstance(r, KVRelease)] == [("r1", False)]
    done = [m for _, m in published if isinstance(m, KVTransferDone)]
    assert [(d.ok, d.error) for d in done] == [(False, "TransferTimeout: too slow")]
    assert rt.metrics.observed == []
    assert len([m for _, m in published if isinstance(m, TokenChunk)]) == 5


async def test_an_unreachable_prefill_worker_is_marked_and_later_requests_recompute_without_pulling():
    rt = make_runtime(KVLoadReport(0, 0, 0.0, recomputed=True, error="PeerUnreachable: no connection", unreachable=True))
    calls = []
    generate = rt.engine.generate

    def recording_generate(request_id, prompt_token_ids, sampling, first_token_id, kv_transfer_params,
                           resume_token_ids=(), prefix_kv=None):
        calls.append((request_id, first_token_id, kv_transfer_params is not None, tuple(resume_token_ids)))
        return generate(request_id, prompt_token_ids, sampling, first_token_id, kv_transfer_params, resume_token_ids,
                        prefix_kv)

    rt.engine.generate = recording_generate
    try:
        await run_one(rt)
        assert rt.peer_paths.unreachable_ids == ("prefill-1",) and rt.num_announcements == 1
        await run_one(rt, "r2")
        # r1 tried the pull; r2 did not: the first token the client has is resumed after, as on a resume
        assert calls == [("r1", 97, True, ()), ("r2", None, False, (97,))]
        releases = [(m.request_id, m.ok) for s, m in rt.bus.published if isinstance(m, KVRelease)]
        assert releases == [("r1", False), ("r2", False)]  # prefill frees r2's copy at once, not at lease end
        r2_chunks = [m for _, m in rt.bus.published if isinstance(m, TokenChunk) and m.request_id == "r2"]
        assert r2_chunks[-1].usage.completion_tokens == 6
    finally:
        await rt.peer_paths.stop()
