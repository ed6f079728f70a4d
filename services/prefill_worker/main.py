"""Prefill worker: runs prompts to their first token and serves the KV it produced.

Life: config -> WorkerRuntime (NATS, engine + transfer endpoint, stats, cancel) -> serve prefill requests
and KV releases on this worker's own subjects -> heartbeats -> wait for SIGTERM -> goodbye, drain.
"""

from __future__ import annotations

import logging
import time

from pdserve import subjects
from pdserve.engine.mock import EngineFull
from pdserve.protocol import ErrorReply, KVReady, KVRelease, Message, PrefillRequest
from pdserve.service import shutdown_event
from pdserve.worker import WorkerRuntime
from pdserve.config import WorkerConfig

log = logging.getLogger(__name__)


class PrefillHandlers:
    def __init__(self, rt: WorkerRuntime):
        self.rt = rt

    async def on_prefill(self, req: PrefillRequest) -> Message:
        rt = self.rt
        refusal = rt.refusal(req.model, req.deadline)
        if refusal is not None:
            return refusal
        rt.num_in_flight += 1
        start = time.monotonic()
        try:
            result = await rt.engine.prefill(req.request_id, req.prompt_token_ids, req.sampling, rt.config.kv_lease_s)
        except EngineFull as e:
            return ErrorReply(code="kv_full", message=f"{rt.worker_id}: {e}")
        finally:
            rt.num_in_flight -= 1
        rt.num_requests_served += 1
        prefill_ms = (time.monotonic() - start) * 1000
        ready = KVReady(
            request_id=req.request_id, worker_id=rt.worker_id, first_token_id=result.first_token_id,
            first_text=result.first_text, finish_reason=result.finish_reason,
            kv_transfer_params=result.kv_transfer_params, num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=result.num_cached_tokens, prefill_ms=prefill_ms,
        )
        log.info("request %s: prefilled %d tokens in %.1f ms, %d blocks held for decode", req.request_id,
                 len(req.prompt_token_ids), prefill_ms,
                 len(result.kv_transfer_params.block_ids) if result.kv_transfer_params else 0)
        rt.spawn(rt.bus.publish(subjects.KV_READY, ready, request_id=req.request_id))
        return ready

    async def on_release(self, msg: KVRelease) -> None:
        freed = await self.rt.engine.release_kv(msg.request_id)
        log.info("request %s: decode %s the KV; blocks %s", msg.request_id,
                 "pulled" if msg.ok else "gave up", "freed" if freed else "were already free")


async def serve(config: WorkerConfig) -> None:
    stop = shutdown_event()
    async with WorkerRuntime(config) as rt:
        handlers = PrefillHandlers(rt)
        await rt.bus.serve(subjects.prefill_request(rt.worker_id), PrefillRequest, handlers.on_prefill)
        await rt.bus.subscribe(subjects.kv_release(rt.worker_id), KVRelease, handlers.on_release)
        await rt.announce()
        await stop.wait()
