"""What a pull request must be for a transfer endpoint to serve it: well formed (parse_pull, else BadRequest)
and within what the transfer's lease and this endpoint allow (refusal, else the reason it is refused).

Kept apart from endpoint.py because it is the endpoint's judgement of outside input, with no socket, thread or
state of its own: the serving loop hands it a decoded header and the transfer's lease, and acts on the answer.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from pdserve.kv import wire
from pdserve.kv.errors import describe_layout
from pdserve.kv.ledger import Lease
from pdserve.kv.pool import BlockPool
from pdserve.throttled_log import clip


class BadRequest(Exception):
    """Not a request a pdserve client sends: refused as "bad_request"."""


@dataclass(frozen=True)
class PullRequest:
    nonce: str
    transfer_id: str
    token: str
    block_ids: list[int]
    segment_nbytes: list[int]
    layout_tag: str
    window: int  # messages the client takes ahead, clamped to wire.MAX_WINDOW
    timeout_s: float
    path: object  # as sent; refusal() checks it is one this endpoint offers
    stream: object  # tcp: the ticket of the byte stream the bytes should go on, as sent; None for frames
    traceparent: str | None
    nixl_agent: str | None = None  # nixl: the endpoint agent the client already knows (no metadata needed then)
    # nixl from host KV: the client READs straight into its blocks (read_fence.py) and ends the pull with "done"
    # instead of checking checksums in landing buffers
    direct: bool = False


def parse_pull(h: dict) -> PullRequest:
    """A "pull" header as a PullRequest; BadRequest (or KeyError, TypeError, ValueError) if it is malformed."""
    if h.get("v") != wire.PROTOCOL_VERSION:
        raise BadRequest(f"protocol version {h.get('v')!r}, endpoint speaks {wire.PROTOCOL_VERSION}")
    nonce, tid, token = h["nonce"], h["transfer_id"], h.get("token") or ""
    block_ids, segment_nbytes, layout_tag = h["block_ids"], h["segment_nbytes"], h["layout_tag"]
    if not (isinstance(nonce, str) and isinstance(tid, str) and isinstance(token, str)
            and isinstance(layout_tag, str) and isinstance(block_ids, list) and block_ids
            and all(type(b) is int for b in block_ids)
            and isinstance(segment_nbytes, list) and all(type(s) is int for s in segment_nbytes)):
        raise BadRequest("fields of the wrong type, or no block ids")
    window = min(max(int(h.get("window", 2)), 1), wire.MAX_WINDOW)
    timeout_s = min(max(float(h.get("timeout_s", 60.0)), 0.0), 3600.0)
    if len(nonce) > 64 or len(tid) > 256 or len(token) > 256:
        raise BadRequest("nonce, transfer_id or token longer than any pdserve sends")
    tp, agent = h.get("traceparent"), h.get("nixl_agent")
    return PullRequest(nonce, tid, token, block_ids, segment_nbytes, layout_tag, window, timeout_s,
                       h.get("path", "tcp"), h.get("stream"), tp if isinstance(tp, str) else None,
                       agent if isinstance(agent, str) else None, h.get("direct") is True)


def refusal(request: PullRequest, allowed: Lease | None, gone: str | None, pool: BlockPool,
            transports: tuple[str, ...]) -> tuple[str, str] | None:
    """Why the pull may not be served, as (reason, message), given the transfer's lease (None: not allowed,
    `gone` says why) and what this endpoint offers; None if it may."""
    tid, token, block_ids = request.transfer_id, request.token, request.block_ids
    segment_nbytes, layout_tag = request.segment_nbytes, request.layout_tag
    if allowed is None:
        reason = gone or "unknown"
        why = {"unknown": "it was never allowed here (wrong address, or the prefill worker restarted)",
               "released": "the prefill side already released it (pulled, cancelled, or lease ended)",
               "expired": "its lease expired and the prefill side forgot it"}[reason]
        return reason, f"transfer {tid}: {why}; recompute the prefill"
    if not hmac.compare_digest(allowed.token, token.encode()):
        return "bad_token", f"transfer {tid}: wrong or missing token; pass the token from its KV-ready message"
    if time.time() > allowed.expires_at:
        late = time.time() - allowed.expires_at
        return "expired", (f"transfer {tid}: lease expired {late:.3f} s ago; pull before lease_expires_at "
                           "or lengthen the prefill lease")
    if tuple(segment_nbytes) != pool.segment_nbytes or layout_tag != pool.layout_tag:
        msg = (f"transfer {tid}: prefill has {describe_layout(pool.segment_nbytes, pool.layout_tag)}, "
               f"decode has {describe_layout(segment_nbytes, layout_tag)}; "
               "both sides must run the same model, dtype and block size")
        return "layout", msg
    outside = [b for b in block_ids if b not in allowed.block_ids]
    if outside:
        return "bad_block", (f"transfer {tid}: block ids {outside[:8]} were not allowed for it; "
                             "pull only the block_ids from its KV-ready message")
    path = request.path
    if path not in transports:
        return "path", (f"transfer {tid}: path {clip(path)!s} is not offered "
                        f"here (this endpoint offers {', '.join(transports)}); pull over tcp")
    return None
