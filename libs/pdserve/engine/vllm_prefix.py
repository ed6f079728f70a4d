"""The vLLM engine's part in prefix reuse across workers (services/router/prefix_reuse.py), through pdserve's KV
connector the way vLLM's external KV loaders work.

Loading (the worker the request was sent to: a prefill worker, or a decode worker that prefills locally): the
request runs with kv_transfer_params that offer the peer's lease as a remote prefix ("do_remote_prefill" with the
lease's KVTransferParams) and, on a prefill worker, ask for a hold afterwards ("do_remote_decode"). The connector's scheduler half reports the lease's tokens past vLLM's own prefix-cache hit as
externally available (get_num_new_matched_tokens), its worker half pulls exactly those blocks into the blocks vLLM
allocated, and vLLM computes only the rest. A failed pull is recomputed by vLLM (kv_load_failure_policy
"recompute"). The connector's load report says what moved.

Leasing (the worker whose cache holds the blocks): vLLM's blocks are not addressable from outside its scheduler,
so the lease is a request: the prefix's tokens, one output token, held for a puller like a prefill's KV. vLLM's
prefix cache serves it, computing only the last block (vLLM always computes a prompt's last token). The blocks
are leased only as far as this worker's KV events say its cache holds them; if they were evicted in the moment
between, the lease computes them, and says so in a WARNING.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from opentelemetry.trace import SpanKind

from pdserve import tracecontext, tracing
from pdserve.engine.base import KVLoadReport
from pdserve.engine.vllm_io import tokens_prompt, vllm_request
from pdserve.protocol import KVTransferParams, SamplingParams

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

_LEASE_SAMPLING = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)  # ignore_eos: EOS would hold nothing
# The load report comes before vLLM computes the rest of the prompt; once the prefill's output is in, a report
# still missing is not waited for longer than this (the load is then counted as none).
_LATE_REPORT_S = 1.0


class VllmPeerPrefixes:
    @property
    def reuses_peer_prefixes(self) -> bool:
        return self.config.prefix_caching and self.kv_events is not None

    def _prefix_load(self, request_id: str, prefix_kv: KVTransferParams, *,
                     hold_after: bool = True) -> tuple[dict, asyncio.Task]:
        """The kv_transfer_params of a prefill that loads prefix_kv's blocks (hold_after: and holds its KV for a
        decode worker after, as prefill() does; a decode worker prefilling locally does not), and the task
        awaiting the load's report (it ends the "kv pull" span)."""
        pull_span = tracing.tracer().start_span("kv pull", kind=SpanKind.CLIENT, attributes={
            "request_id": request_id, "worker_id": self.worker_id, "prefill_worker_id": prefix_kv.worker_id,
            "transfer_id": prefix_kv.transfer_id, "kv_prefix": True})
        kv = {"do_remote_prefill": True, "pdserve": prefix_kv.model_dump(mode="json"),
              "traceparent": tracecontext.of_span(pull_span)}
        if hold_after:
            kv["do_remote_decode"] = True
        return kv, self._spawn_report(request_id, pull_span, self._load_reports.expect(request_id))

    async def _prefix_loaded(self, request_id: str, report_task: asyncio.Task, prefix_kv: KVTransferParams,
                             num_cached_tokens: int) -> tuple[int, int, KVLoadReport | None]:
        """(prompt tokens loaded from the peer, prompt tokens the load was to bring and vLLM computed instead, the
        load's report) once the first output is in; vLLM's num_cached_tokens counts its own prefix-cache hit and
        the tokens planned to load together, loaded or not."""
        done, _ = await asyncio.wait({report_task}, timeout=_LATE_REPORT_S)
        if not done:
            report_task.cancel()
            log.warning("request %s: no report of the prefix load from %s; counted as not loaded", request_id,
                        prefix_kv.worker_id)
            return 0, 0, None
        report = report_task.result()
        if report is None or report.recomputed:
            self._prefix_counters["num_prefix_peer_load_failures"] += 1
            log.warning("request %s: prefix from %s's cache not loaded (%s); vLLM computed it", request_id,
                        prefix_kv.worker_id, report.error if report else "no report")
            return 0, report.num_tokens if report else 0, report
        loaded = report.num_tokens or min(report.num_blocks * self._block_size, num_cached_tokens)
        self._prefix_counters["num_prefix_peer_loaded_tokens"] += loaded
        self._prefix_counters["num_prefix_peer_loaded_bytes"] += report.num_bytes
        if loaded:
            log.info("request %s: loaded %d prompt tokens (%d blocks) from %s's cache over %s in %.2f ms", request_id,
                     loaded, report.num_blocks, prefix_kv.worker_id, report.transport, report.transfer_ms)
        return loaded, 0, report

    async def lease_prefix(self, lease_id: str, block_hashes: tuple[int, ...], lease_s: float,
                           prefix_token_ids: tuple[int, ...] = ()) -> KVTransferParams | None:
        if not self.reuses_peer_prefixes:
            return None
        bs = self._block_size
        num_blocks = 0
        for h in block_hashes[:len(prefix_token_ids) // bs]:
            if not self.kv_events.holds(h):
                break
            num_blocks += 1
        self.kv_events.absent(block_hashes[num_blocks:])  # those the index listed here and this cache lacks
        if not num_blocks:
            return None
        params = vllm_request(_LEASE_SAMPLING, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        final: Any = None
        self._running.add(lease_id)
        try:
            async for output in self._llm.generate(tokens_prompt(prefix_token_ids[:num_blocks * bs]), params, lease_id):
                final = output
        finally:
            self._running.discard(lease_id)
        kv = (final.kv_transfer_params or {}).get("pdserve") if final is not None else None
        if not kv:
            return None
        num_computed = num_blocks * bs - (final.num_cached_tokens or 0)
        if num_computed > bs:
            log.warning("lease %s: %d of the %d prefix tokens were no longer in vLLM's cache; computed to hold them",
                        lease_id, num_computed, num_blocks * bs)
        return KVTransferParams.model_validate(kv)
