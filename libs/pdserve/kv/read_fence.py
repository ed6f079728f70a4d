"""What a failed pull leaves writing into its local blocks: the nixl path's READs straight into the blocks that had
not ended when the pull gave up (deadline, cancel, a refusal mid-pull).

Why such READs exist at all: a one-sided READ from a prefill process that froze cannot be called back. Measured
here (UCX over TCP): released without error, its remote agent removed, even the whole agent deleted, its bytes still
landed once that process ran again. A pull that must never leave a writer behind (the default) therefore READs
into landing buffers of the client's own and copies from there (nixl_landing.py), at the cost of one memcpy per
byte. A caller that can keep its blocks out of use until the writers are gone gives the pull a ReadFence instead:
the READs then land in the blocks themselves, and after a failure the fence says when the blocks are free again.

The owner of the blocks holds them (neither recomputes into them nor gives them to another request) until
ended() is True. vLLM's scheduler already does so for a load it was told failed, until the connector lists the
request in finished_recving (connector_worker.py); the mock engine sets them aside (engine/mock_fenced.py).
"""

from __future__ import annotations

import threading
import time

# After a failure the pull waits this long for its READs to end before it hands them to the fence: most end at
# once (the peer died, or refused mid-pull), and a caller whose fence is clear need not set blocks aside.
SETTLE_S = 0.2


class ReadFence:
    """READs (NixlAgent, handle) into a pull's local blocks still running after that pull failed. Thread-safe."""

    def __init__(self) -> None:
        self._reads: list[tuple[object, object]] = []
        self._lock = threading.Lock()

    def add(self, nixl, handle: object) -> None:
        with self._lock:
            self._reads.append((nixl, handle))

    def ended(self) -> bool:
        """Whether every READ has ended (done or failed for good): only then may the blocks be written or reused."""
        with self._lock:
            self._reads = [(nixl, handle) for nixl, handle in self._reads if not nixl.ended(handle)]
            return not self._reads

    def wait(self, timeout_s: float, poll_s: float = 0.002) -> bool:
        """ended(), waiting up to timeout_s for it."""
        deadline = time.monotonic() + timeout_s
        while not self.ended():
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._reads)
