"""Every NATS subject, queue group and header name pdserve uses, in one place.

Operators watch with `nats sub 'pdserve.>'` (as the observer identity, which sees lifecycle events only:
nats_auth.py says which subject each role may use). Subjects that address one worker carry its
`worker_id` so the router can choose the worker (least load, KV-aware) instead of a queue group choosing
at random.
"""

PREFIX = "pdserve"

# Membership: workers announce themselves; a worker missing HEARTBEAT_MISSES heartbeats is gone.
HEARTBEAT_ALL = f"{PREFIX}.heartbeat.>"
GOODBYE_ALL = f"{PREFIX}.goodbye.>"
HEARTBEAT_MISSES = 3


def heartbeat(role: str, worker_id: str) -> str:
    return f"{PREFIX}.heartbeat.{role}.{worker_id}"


def goodbye(role: str, worker_id: str) -> str:
    return f"{PREFIX}.goodbye.{role}.{worker_id}"


def worker_stats(worker_id: str) -> str:
    """Request/reply: a worker's full counters (held blocks, KV bytes moved, recomputes, ...)."""
    return f"{PREFIX}.worker.{worker_id}.stats"


# Request flow.
def prefill_request(worker_id: str) -> str:
    return f"{PREFIX}.prefill.{worker_id}.request"


def prefix_lease(worker_id: str) -> str:
    """Router -> prefill, request/reply: hold the leading blocks of a prompt cached here for a peer to pull."""
    return f"{PREFIX}.prefill.{worker_id}.prefix_lease"


def kv_release(worker_id: str) -> str:
    """Decode -> prefill: the blocks of a transfer may be freed (pulled, or given up)."""
    return f"{PREFIX}.prefill.{worker_id}.release"


def decode_request(worker_id: str) -> str:
    return f"{PREFIX}.decode.{worker_id}.request"


def token_stream(router_id: str, request_id: str) -> str:
    """Decode -> router: the token chunks of one request."""
    return f"{PREFIX}.stream.{router_id}.{request_id}"


def token_streams(router_id: str) -> str:
    """Every token stream of one router (it subscribes once, at start)."""
    return f"{PREFIX}.stream.{router_id}.>"


CANCEL = f"{PREFIX}.request.cancel"

# KV broker.
# Prefill -> broker and observers: a request's KV is held for a decode worker (no token, no transfer secret:
# those go only to the router, in the prefill request's reply).
KV_HELD = f"{PREFIX}.kv.held"
KV_TRANSFER_DONE = f"{PREFIX}.kv.transfer_done"
KV_EVENTS_ALL = f"{PREFIX}.kv.events.>"
KV_LOOKUP = f"{PREFIX}.kv.lookup"
KV_RESYNC = f"{PREFIX}.kv.resync"  # broker -> workers: send a snapshot of your stored blocks
BROKER_QUEUE = "kv_broker"


def kv_events(worker_id: str) -> str:
    return f"{PREFIX}.kv.events.{worker_id}"


# NATS headers.
HEADER_TRACEPARENT = "traceparent"
HEADER_REQUEST_ID = "Pdserve-Request-Id"
