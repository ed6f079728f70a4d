"""Whether a request may start at all, checked before any work is routed: the bus is up, the request fits in
one message on the bus, a decode worker serves its model (with no prefill worker, decode workers serve whole
requests: see policy.RoutePlan's no_prefill_worker), and its deadline can be met."""

from __future__ import annotations

import logging

from pdserve import subjects
from pdserve.bus import Bus
from pdserve.membership import Membership
from pdserve.protocol import DecodeRequest, encode
from services.router.backend import GenerateRequest
from services.router.errors import BusUnavailable, NoWorkerError, Overloaded, PayloadTooLarge
from services.router.policy import LeastLoadPolicy

log = logging.getLogger(__name__)

# What refuse_if_too_large adds to a decode request's encoded size: ids still to come (block ids of at least
# 16 tokens each, resumed tokens) at their longest, and room for the KV location, headers and trace context.
_MAX_ID_BYTES = 11
_MIN_BLOCK_SIZE = 16
_ENVELOPE_BYTES = 4096


def refuse_unless_servable(req: GenerateRequest, bus: Bus, membership: Membership, router_id: str) -> None:
    """BusUnavailable (503) while the router reconnects to NATS; PayloadTooLarge (413) when the request cannot
    travel; NoWorkerError (503) when no live decode worker serves its model."""
    if not bus.connected:
        raise BusUnavailable("The router has lost its connection to NATS and is reconnecting by itself; "
                             "retry after the time in the Retry-After header.")
    refuse_if_too_large(req, bus.max_payload, router_id)
    if not membership.live("decode", req.model):
        raise NoWorkerError(f"no live decode worker serves model {req.model!r}; start one with "
                            f"`pdserve decode-worker --nats URL --model {req.model}` (pdserve up starts one)")


def refuse_if_too_large(req: GenerateRequest, max_payload: int, router_id: str) -> None:
    """PayloadTooLarge (413) when the request's largest message on the bus would exceed the NATS server's
    max_payload: the decode request, with the prompt's token ids, the stop strings, the KV's block ids and,
    on a resume, every token generated (counted at their longest, 10 digits and a comma each). The request is
    encoded only when a cheap upper bound does not already fit: not on every request's path."""
    num_ids_later = req.sampling.max_tokens + len(req.prompt_token_ids) // _MIN_BLOCK_SIZE + 1
    bound = (_MAX_ID_BYTES * (len(req.prompt_token_ids) + num_ids_later) + _ENVELOPE_BYTES
             + 6 * sum(len(s) for s in req.sampling.stop) + len(req.request_id) + len(req.model))
    if bound <= max_payload:  # 6 bytes per character: the longest JSON escape
        return
    probe = DecodeRequest(request_id=req.request_id, model=req.model, prompt_token_ids=req.prompt_token_ids,
                          sampling=req.sampling, stream_subject=subjects.token_stream(router_id, req.request_id),
                          stream_token="0" * 32, deadline=req.deadline)
    size = len(encode(probe)) + _MAX_ID_BYTES * num_ids_later + _ENVELOPE_BYTES
    if size > max_payload:
        raise PayloadTooLarge(
            f"This request needs about {size} bytes as one message on the bus (its prompt as token ids, stop "
            f"strings and up to max_tokens generated tokens), more than the NATS server's max_payload of "
            f"{max_payload} bytes. Shorten the prompt, the stop strings or max_tokens; operators raise "
            "max_payload in nats-server's configuration (pdserve up starts its own with 8 MiB).")


def refuse_if_late(req: GenerateRequest, policy: LeastLoadPolicy) -> None:
    """Overloaded (429) when the prefill queue alone outlasts the request's deadline (--early-refusal)."""
    wait_s = policy.prefill_wait_s(req.model)
    left_s = req.remaining_s()
    if wait_s is not None and wait_s > left_s:
        log.warning("request %s: refused at once: prefill queue ~%.1fs, %.1fs left until its deadline",
                    req.request_id, wait_s, left_s)
        raise Overloaded(f"The prefill queue is about {wait_s:.1f}s long, more than the {left_s:.1f}s this "
                         "request may take; retry after the time in the Retry-After header.",
                         retry_after_s=wait_s - left_s)
