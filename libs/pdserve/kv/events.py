"""A worker's KV events, from its engine to the KV broker's index (pdserve.kv_events.<worker_id> on NATS).

The engine reports block copies as it makes and frees them: `stored(chain, parent_hash)` when blocks are
computed or received, `removed(hashes)` when they are freed or evicted, `cleared()` when its cache is reset;
hashes are pdserve's chained block hashes (kv.hashing), whatever the engine's own are. An engine may hold a
block more than once (two requests with one prompt, or vLLM's duplicate cache entries), so the relay counts
copies and tells the broker only when a block starts or stops being held: the wire is idempotent.

Copies in the worker's host-memory tier (kv.host_tier) count as held too (`stored_host` / `removed_host`): a
block evicted from the engine into that tier stays in the index, and the broker is told only that its tier
changed (KVEvent.to_host when the engine's last copy goes, to_device when the engine has one again).

The relay also keeps what the worker holds (hash -> parent, copies), which is what a snapshot re-sends when
a broker asks (KVResync: a broker that restarted or missed events). Events are numbered (seq 1, 2, 3, ...)
and published in order by one task: NATS keeps one publisher's order on one subject, so the broker sees them
in order and knows a gap when one is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Awaitable, Callable, Iterator, Protocol, Sequence

from pdserve.kv.hashing import ROOT_HASH
from pdserve.protocol import KVEvent, KVResync

log = logging.getLogger(__name__)

MAX_BLOCKS_PER_EVENT = 4096  # ~90 KB of JSON: far below NATS' default 1 MiB max_payload


class KVEventSink(Protocol):
    """What an engine reports its KV blocks to (given to the engine's constructor by the worker)."""

    def stored(self, block_hashes: Sequence[int], parent_hash: int) -> None:
        """Copies of the chain block_hashes were computed or received (parent_hash: the first's parent)."""

    def removed(self, block_hashes: Sequence[int]) -> None:
        """One copy of each of these blocks was freed or evicted."""

    def cleared(self) -> None:
        """Every block was dropped (the engine's cache was reset)."""

    def stored_host(self, block_hashes: Sequence[int]) -> None:
        """Copies of these held blocks were put in the host-memory tier."""

    def removed_host(self, block_hashes: Sequence[int]) -> None:
        """The host-memory tier dropped its copies of these blocks."""

    def holds(self, block_hash: int) -> bool:
        """Whether a copy of the block was reported and not removed since."""

    def absent(self, block_hashes: Sequence[int]) -> None:
        """The index was seen to list these blocks here, and this engine holds none of them (an event lost, an
        eviction under way): the broker forgets them here, so that nobody is sent here for them again."""


class KVEventRelay:
    def __init__(self, worker_id: str, model: str, publish: Callable[[KVEvent], Awaitable[None]]):
        self.worker_id = worker_id
        self.model = model
        self._publish = publish
        self._blocks: dict[int, list[int]] = {}  # hash -> [parent hash, engine copies, host-tier copies]
        self._queue: asyncio.Queue[KVEvent] = asyncio.Queue()
        self._seq = 0
        self.sent_seq = 0  # seq of the last event handed to NATS (or lost trying): heartbeats carry it
        self.num_snapshots = 0
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------------------- engine side

    def stored(self, block_hashes: Sequence[int], parent_hash: int = ROOT_HASH) -> None:
        new: list[int] = []  # a run of blocks held for the first time, sent as one chain
        back: list[int] = []  # blocks held only in the host tier until now
        new_parent = parent = parent_hash
        for h in block_hashes:
            entry = self._blocks.get(h)
            if entry is None:
                self._blocks[h] = [parent, 1, 0]
                if not new:
                    new_parent = parent
                new.append(h)
            else:
                entry[1] += 1
                if entry[1] == 1:
                    back.append(h)
                if new:
                    self._send_chain(new, new_parent)
                    new = []
            parent = h
        if new:
            self._send_chain(new, new_parent)
        self._send_each(back, "to_device")

    def removed(self, block_hashes: Sequence[int]) -> None:
        gone, to_host = [], []
        for h in block_hashes:
            entry = self._blocks.get(h)
            if entry is None or entry[1] == 0:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                if entry[2]:
                    to_host.append(h)
                else:
                    del self._blocks[h]
                    gone.append(h)
        self._send_each(gone, "removed")
        self._send_each(to_host, "to_host")

    def stored_host(self, block_hashes: Sequence[int]) -> None:
        to_host = []
        for h in block_hashes:
            entry = self._blocks.get(h)
            if entry is None:  # the tier only takes blocks the engine held: an engine reset raced it
                log.debug("worker %s: host-tier copy of unheld block %x not reported", self.worker_id, h)
                continue
            entry[2] += 1
            if entry[1] == 0 and entry[2] == 1:
                to_host.append(h)
        self._send_each(to_host, "to_host")

    def removed_host(self, block_hashes: Sequence[int]) -> None:
        gone = []
        for h in block_hashes:
            entry = self._blocks.get(h)
            if entry is None or entry[2] == 0:
                continue
            entry[2] -= 1
            if entry[1] == 0 and entry[2] == 0:
                del self._blocks[h]
                gone.append(h)
        self._send_each(gone, "removed")

    def cleared(self) -> None:
        self._blocks.clear()
        self._send(cleared=True)

    def holds(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def absent(self, block_hashes: Sequence[int]) -> None:
        self._send_each([h for h in block_hashes if h not in self._blocks], "removed")

    # ------------------------------------------------------------------------------- broker side

    async def on_resync(self, msg: KVResync) -> None:
        if msg.worker_id in (None, self.worker_id):
            self.snapshot()

    def snapshot(self) -> None:
        """Queue a cleared event, then every held block (chains from the roots of what is held), then which of them
        only the host tier holds."""
        self.num_snapshots += 1
        self._send(cleared=True)
        num_events = 1
        for parent, chain in self._chains():
            self._send(stored=tuple(chain), parent_hash=parent)
            num_events += 1
        num_events += self._send_each([h for h, entry in self._blocks.items() if entry[1] == 0], "to_host")
        log.info("worker %s: KV snapshot of %d blocks in %d events", self.worker_id, len(self._blocks), num_events)

    def _chains(self) -> Iterator[tuple[int, list[int]]]:
        """The held blocks as chains (parent hash, blocks): each held block once, parents before children."""
        children: dict[int, list[int]] = defaultdict(list)
        for h, (parent, *_) in self._blocks.items():
            children[parent].append(h)
        starts = [(h, parent) for h, (parent, *_) in self._blocks.items() if parent not in self._blocks]
        while starts:
            h, parent = starts.pop()
            chain = [h]
            while True:
                below = children.get(h, ())
                if len(below) == 1 and len(chain) < MAX_BLOCKS_PER_EVENT:
                    h = below[0]
                    chain.append(h)
                    continue
                starts.extend((k, h) for k in below)
                break
            yield parent, chain

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def held(self) -> dict[int, int]:
        """hash -> parent hash of every held block."""
        return {h: parent for h, (parent, *_) in self._blocks.items()}

    # ---------------------------------------------------------------------------------- publishing

    def _send_chain(self, chain: list[int], parent: int) -> None:
        for start in range(0, len(chain), MAX_BLOCKS_PER_EVENT):
            self._send(stored=tuple(chain[start:start + MAX_BLOCKS_PER_EVENT]),
                       parent_hash=chain[start - 1] if start else parent)

    def _send_each(self, block_hashes: list[int], field: str) -> int:
        """Send block_hashes in the one field, in as many events as it takes; returns their number."""
        num_events = 0
        for start in range(0, len(block_hashes), MAX_BLOCKS_PER_EVENT):
            self._send(**{field: tuple(block_hashes[start:start + MAX_BLOCKS_PER_EVENT])})
            num_events += 1
        return num_events

    def _send(self, **fields) -> None:
        self._seq += 1
        self._queue.put_nowait(KVEvent(worker_id=self.worker_id, model=self.model, seq=self._seq, **fields))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kv-events")

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._publish(event)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # lost: the broker sees the gap in seq and asks for a snapshot
                log.warning("worker %s: KV event %d not sent: %s", self.worker_id, event.seq, e)
            finally:
                self.sent_seq = event.seq
                self._queue.task_done()

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (the engine's last removals), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
