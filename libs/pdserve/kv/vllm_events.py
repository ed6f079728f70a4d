"""vLLM's KV cache events, relayed as pdserve's: subscribe to vLLM's ZMQ event publisher, re-hash the blocks.

With prefix caching and `kv_events_config` on, vLLM's scheduler (in the EngineCore process) publishes every
step's KV cache events on a ZMQ PUB socket: (topic, 8-byte big-endian seq, msgpack KVEventBatch). The worker
process subscribes (an ipc:// socket of its own) and maps each event to pdserve's chained block hashes,
because vLLM's hashes are its own (another algorithm, a per-process random seed for the root):
- BlockStored(block_hashes, parent_block_hash, token_ids, block_size): the pdserve hash of the parent comes
  from the blocks mapped before (None: a prompt's first block, ROOT_HASH), the chain continues from it over
  token_ids. A parent never mapped (skipped, or from before a lost message) cannot be continued: skipped.
- BlockRemoved(block_hashes): one copy of each mapped block is gone.
- AllBlocksCleared (vLLM's prefix cache was reset): every copy in vLLM's cache is gone; the host tier's stay.
  vLLM publishes a step's connector events after its block pool's, so a tier copy made before a reset can come after
  the reset's AllBlocksCleared in one batch: it is applied before it (_tier_stores_in_order).
- BlockStored / BlockRemoved with medium "CPU": pdserve's connector put copies of blocks vLLM had cached into this
  worker's host-memory tier, or dropped them there (kv.connector_host_tier): the relay's stored_host / removed_host.
  A mapped block stays mapped while either vLLM's cache or the tier has it.
vLLM reports one event per cached copy of a block (its cache may hold one hash in several blocks), so each
vLLM hash keeps a count; the relay (kv.events) counts pdserve hashes and tells the broker the net effect.

Blocks whose vLLM identity depends on more than their tokens (LoRA adapters, multimodal inputs, cache salts),
of another KV cache group (hybrid models), another medium (offloading tiers but pdserve's own) or another block size
are skipped: a pdserve prompt of the same tokens could not reuse them. A gap in vLLM's seq (its PUB socket
dropped messages) resets the mapping and tells the relay everything was cleared: the index then under-reports
until prefixes are cached again, and never claims blocks this worker may not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Hashable

from pdserve.kv.connector_host_tier import MEDIUM as _HOST_MEDIUM  # pdserve's host-memory tier
from pdserve.kv.events import KVEventSink
from pdserve.kv.hashing import ROOT_HASH, chain_hashes

log = logging.getLogger(__name__)

TOPIC = "pdserve-kv"
_MEDIA = (None, "GPU")  # vLLM's block pool reports "GPU" on every platform; offloading tiers report others


class VllmKVEventMapper:
    def __init__(self, sink: KVEventSink, block_size: int):
        self._sink = sink
        self._block_size = block_size
        self._mapped: dict[Hashable, list[int]] = {}  # vLLM block hash -> [pdserve hash, cache copies, tier copies]
        self.num_stored = 0
        self.num_skipped = 0
        self.num_resets = 0

    def on_events(self, events: list[Any]) -> None:
        for event in _tier_stores_in_order(events):
            kind = type(event).__name__
            if kind == "BlockStored":
                self._on_stored(event)
            elif kind == "BlockRemoved":
                self._on_removed(event)
            elif kind == "AllBlocksCleared":
                self._cache_cleared()

    def reset(self) -> None:
        self._mapped.clear()
        self.num_resets += 1
        self._sink.cleared()

    def _cache_cleared(self) -> None:
        """vLLM's prefix cache was reset (only its block pool says AllBlocksCleared): its copies are gone, the host
        tier's stay (the connector drops those only when asked to, and then says so block by block)."""
        if not any(entry[2] for entry in self._mapped.values()):
            self.reset()
            return
        gone = []
        for theirs, entry in list(self._mapped.items()):
            gone.extend([entry[0]] * entry[1])
            entry[1] = 0
            if entry[2] == 0:
                del self._mapped[theirs]
        self._sink.removed(gone)

    def _on_stored(self, event: Any) -> None:
        if getattr(event, "medium", None) == _HOST_MEDIUM and getattr(event, "group_idx", None) in (None, 0):
            self._on_host_stored(event)
            return
        bs = self._block_size
        hashes = list(event.block_hashes)
        parent = ROOT_HASH if event.parent_block_hash is None else self._mapped.get(event.parent_block_hash, [None])[0]
        if (parent is None or event.block_size != bs or len(event.token_ids) != bs * len(hashes)
                or getattr(event, "group_idx", None) not in (None, 0) or getattr(event, "medium", None) not in _MEDIA
                or getattr(event, "lora_id", None) is not None or getattr(event, "lora_name", None)
                or any(getattr(event, "extra_keys", None) or ())):
            self.num_skipped += len(hashes)
            return
        ours = chain_hashes(event.token_ids, bs, parent)
        for theirs, mine in zip(hashes, ours):
            entry = self._mapped.get(theirs)
            if entry is None:
                self._mapped[theirs] = [mine, 1, 0]
            else:
                entry[1] += 1
        self.num_stored += len(ours)
        self._sink.stored(ours, parent)

    def _on_removed(self, event: Any) -> None:
        medium = getattr(event, "medium", None)
        if getattr(event, "group_idx", None) not in (None, 0) or (medium not in _MEDIA and medium != _HOST_MEDIUM):
            return
        copies = 2 if medium == _HOST_MEDIUM else 1
        gone = []
        for theirs in event.block_hashes:
            entry = self._mapped.get(theirs)
            if entry is None or entry[copies] == 0:  # skipped when stored
                continue
            gone.append(entry[0])
            entry[copies] -= 1
            if entry[1] == 0 and entry[2] == 0:
                del self._mapped[theirs]
        if gone:
            (self._sink.removed_host if medium == _HOST_MEDIUM else self._sink.removed)(gone)

    def _on_host_stored(self, event: Any) -> None:
        """Copies into the host tier of blocks vLLM cached (and published) before: mapped already."""
        added = []
        for theirs in event.block_hashes:
            entry = self._mapped.get(theirs)
            if entry is None:  # skipped when vLLM cached it, or forgotten in a reset
                self.num_skipped += 1
                continue
            entry[2] += 1
            added.append(entry[0])
        if added:
            self._sink.stored_host(added)


class VllmKVEventSubscriber:
    """A SUB socket on vLLM's KV event publisher, feeding a mapper from the worker's event loop."""

    def __init__(self, endpoint: str, mapper: VllmKVEventMapper, topic: str = TOPIC):
        self.endpoint = endpoint
        self.mapper = mapper
        self._topic = topic
        self._task: asyncio.Task | None = None
        self._socket: Any = None
        self.num_batches = 0
        self.num_gaps = 0

    def start(self) -> None:
        """Connect (before vLLM binds is fine: ZMQ connects when it can, and nothing published is missed
        once connected) and read in a task."""
        import zmq
        import zmq.asyncio

        self._socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, self._topic.encode())
        self._socket.setsockopt(zmq.RCVHWM, 0)  # never drop here; vLLM's PUB side has its own high-water mark
        self._socket.connect(self.endpoint)
        self._task = asyncio.create_task(self._run(), name="vllm-kv-events")

    async def _run(self) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        expected: int | None = None
        while True:
            _, seq_bytes, payload = await self._socket.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if expected is not None and seq != expected:
                self.num_gaps += 1
                log.warning("vLLM KV events %d..%d lost; the KV index forgets this worker's blocks until they are "
                            "cached again", expected, seq - 1)
                self.mapper.reset()
            expected = seq + 1
            try:
                batch = decoder.decode(payload)
            except msgspec.DecodeError as e:
                log.warning("vLLM KV event batch %d not readable (%s); skipped", seq, e)
                continue
            self.num_batches += 1
            try:
                self.mapper.on_events(batch.events)
            except Exception:  # one bad event must not end the relay
                log.exception("vLLM KV event batch %d could not be relayed", seq)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


def _kind(event: Any) -> str:
    return type(event).__name__


def _is_tier_store(event: Any) -> bool:
    return _kind(event) == "BlockStored" and getattr(event, "medium", None) == _HOST_MEDIUM


def _tier_stores_in_order(events: list[Any]) -> list[Any]:
    """The batch, with each store into the host tier that vLLM published after an AllBlocksCleared moved before the
    first clear it was made before. vLLM appends a step's connector events (the tier's) after its block pool's, so
    [AllBlocksCleared, tier store of K] can mean the tier copied K before the reset (K then stays listed, as host
    tier), which is certain when vLLM's cache did not store K again in between: the tier copies only blocks vLLM had
    cached. Without the move K would leave the index while the tier still holds it."""
    if not any(_kind(e) == "AllBlocksCleared" for e in events):
        return events
    ordered: list[Any] = []
    for event in events:
        if _is_tier_store(event):
            hashes = set(event.block_hashes)
            at = len(ordered)
            for i in range(len(ordered) - 1, -1, -1):  # back to the last store of these blocks in vLLM's cache
                e = ordered[i]
                if _kind(e) == "BlockStored" and not _is_tier_store(e) and hashes & set(e.block_hashes):
                    break
                if _kind(e) == "AllBlocksCleared":
                    at = i
            ordered.insert(at, event)
        else:
            ordered.append(event)
    return ordered
