"""A cancel that reaches a prefill worker while it still computes the prompt stops that prefill.

The router cancels a prefill it gave up on (its deadline passed, the worker was declared gone after a
freeze, the client left). If the worker only freed the request's blocks and let the computation go on, it
would write the prompt's KV into blocks another request may hold by then, hold a transfer open for blocks it
no longer owns, and announce KV-ready for a request nobody waits for.
"""

import asyncio
import time

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.config import MOCK_MODEL
from pdserve.protocol import (CancelRequest, Heartbeat, KVHeld, KVReady, PrefillRequest, SamplingParams, StatsRequest,
                              WorkerStats)
from tests.e2e.conftest import Service

MS_PER_PROMPT_TOKEN = 5.0  # 200 tokens: a prefill of one second


async def test_a_prefill_cancelled_while_it_computes_stops_and_announces_nothing(nats, tmp_path):
    worker = Service(["prefill-worker", "--nats", nats.url, "--engine", "mock"], str(tmp_path / "prefill.log"),
                     env={"PDSERVE_MOCK_MS_PER_PROMPT_TOKEN": str(MS_PER_PROMPT_TOKEN)})
    bus = await Bus.connect(nats.url, "test", connect_timeout_s=5)
    try:
        joined: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        kv_held: list[KVHeld] = []

        async def on_heartbeat(hb: Heartbeat) -> None:
            if not joined.done():
                joined.set_result(hb.worker_id)

        async def on_kv_held(held: KVHeld) -> None:
            kv_held.append(held)

        await bus.subscribe(subjects.HEARTBEAT_ALL, Heartbeat, on_heartbeat)
        await bus.subscribe(subjects.KV_HELD, KVHeld, on_kv_held)
        worker_id = await asyncio.wait_for(joined, 60)

        async def stats() -> WorkerStats:
            return await bus.request(subjects.worker_stats(worker_id), StatsRequest(), WorkerStats, timeout_s=5)

        def prefill(request_id: str, num_tokens: int) -> PrefillRequest:
            return PrefillRequest(request_id=request_id, model=MOCK_MODEL, prompt_token_ids=tuple(range(num_tokens)),
                                  sampling=SamplingParams(max_tokens=8, temperature=0), deadline=time.time() + 30)

        # The router gives up on `doomed` while the worker computes it, and cancels it.
        doomed = asyncio.ensure_future(bus.request(subjects.prefill_request(worker_id), prefill("doomed", 200),
                                                   KVReady, timeout_s=0.3))
        await asyncio.sleep(0.1)
        assert (await stats()).num_held_blocks > 0  # it computes
        await bus.publish(subjects.CANCEL, CancelRequest(request_id="doomed", worker_id=worker_id))
        await asyncio.gather(doomed, return_exceptions=True)
        assert (await stats()).num_held_blocks == 0

        # Another request comes, and takes the blocks that were freed.
        ready = await bus.request(subjects.prefill_request(worker_id), prefill("next", 10), KVReady, timeout_s=10)
        assert ready.kv_transfer_params is not None

        await asyncio.sleep(200 * MS_PER_PROMPT_TOKEN / 1000 + 0.5)  # when `doomed` would have been computed
        after = await stats()
        assert [r.request_id for r in kv_held] == ["next"], "a cancelled prefill announced KV it does not hold"
        assert after.num_requests_served == 1
        assert after.num_held_blocks == len(ready.kv_transfer_params.block_ids)  # only `next` holds blocks
    finally:
        await bus.close()
        worker.stop()


async def test_a_prefill_whose_cancel_came_first_is_refused_and_holds_nothing(nats, tmp_path):
    """NATS does not order the cancel subject against the request subject: a cancel may overtake its request."""
    worker = Service(["prefill-worker", "--nats", nats.url, "--engine", "mock"], str(tmp_path / "prefill.log"))
    bus = await Bus.connect(nats.url, "test", connect_timeout_s=5)
    try:
        joined: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_heartbeat(hb: Heartbeat) -> None:
            if not joined.done():
                joined.set_result(hb.worker_id)

        await bus.subscribe(subjects.HEARTBEAT_ALL, Heartbeat, on_heartbeat)
        worker_id = await asyncio.wait_for(joined, 60)
        await bus.publish(subjects.CANCEL, CancelRequest(request_id="overtaken", worker_id=worker_id))
        await bus.flush()
        request = PrefillRequest(request_id="overtaken", model=MOCK_MODEL, prompt_token_ids=tuple(range(100)),
                                 sampling=SamplingParams(max_tokens=8, temperature=0), deadline=time.time() + 30)
        from pdserve.bus import RemoteError

        try:
            await bus.request(subjects.prefill_request(worker_id), request, KVReady, timeout_s=10)
            raise AssertionError("a cancelled request was prefilled")
        except RemoteError as e:
            assert e.reply.code == "cancelled"
        stats = await bus.request(subjects.worker_stats(worker_id), StatsRequest(), WorkerStats, timeout_s=5)
        assert stats.num_held_blocks == 0 and stats.num_requests_served == 0
        # Another request with a fresh id is served as usual.
        request = request.model_copy(update={"request_id": "fresh"})
        ready = await bus.request(subjects.prefill_request(worker_id), request, KVReady, timeout_s=10)
        assert ready.kv_transfer_params is not None
    finally:
        await bus.close()
        worker.stop()
