"""What goes into vLLM and what comes out of it, for the vLLM engine (vllm_engine.py): a prompt of token ids,
pdserve's sampling as vLLM's (with the KV transfer params the connector reads), vLLM's finish reasons as
pdserve's, and vLLM's outputs merged with the connector's load report into one stream. vLLM is imported only
when a function needs it."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from pdserve.protocol import FinishReason, SamplingParams


def tokens_prompt(token_ids: tuple[int, ...]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(token_ids))


def vllm_request(sampling: SamplingParams, *, max_tokens: int, kv_transfer_params: dict | None) -> Any:
    """vLLM's SamplingParams for pdserve's, streaming deltas, with the connector's kv_transfer_params."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    return VllmSamplingParams(
        max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
        stop=list(sampling.stop) or None, ignore_eos=sampling.ignore_eos, output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
    )


async def with_report(outputs: AsyncIterator[Any], report: asyncio.Task | None) -> AsyncIterator[Any]:
    """vLLM's outputs, with the load report (the result of `report`, unless None) put in the moment it is ready:
    normally before the first output, which vLLM computes only after the load. Neither waits for the other; an
    output and the report both ready go report first. A report still awaited when the outputs end is left to
    its task (it ends the "kv pull" span)."""
    next_output: asyncio.Future | None = None  # the outputs' next item, awaited beside the report
    try:
        while report is not None:
            next_output = next_output or asyncio.ensure_future(anext(outputs))
            await asyncio.wait((next_output, report), return_when=asyncio.FIRST_COMPLETED)
            if report.done():  # cancelled: the engine stops
                if not report.cancelled() and report.result() is not None:
                    yield report.result()
                report = None
            elif next_output.done():
                output, next_output = next_output, None
                try:
                    yield output.result()
                except StopAsyncIteration:
                    return
        if next_output is not None:
            output, next_output = next_output, None
            try:
                yield await output
            except StopAsyncIteration:
                return
        async for output in outputs:
            yield output
    finally:
        if next_output is not None and not next_output.done():  # closed early: vLLM's generate aborts on cancel
            next_output.cancel()
            await asyncio.wait((next_output,))


def finish_reason(reason: str | None) -> FinishReason:
    return reason if reason in ("stop", "length", "abort") else "stop"  # type: ignore[return-value]
