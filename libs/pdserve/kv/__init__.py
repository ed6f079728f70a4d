"""KV cache data plane: block pools and the block transfer between prefill and decode.

endpoint.py serves a pool's blocks, client.py pulls them; wire.py is their protocol; the bytes take the path
the peers share: TCP frames over ZeroMQ anywhere, or on one host the peer's memory itself (shm.py, host.py),
device to device for GPU KV (cuda_ipc.py, imported only where torch and a GPU are).
"""

from pdserve.kv.client import TRANSPORTS, TransferClient
from pdserve.kv.endpoint import TransferEndpoint, default_batch_blocks
from pdserve.kv.errors import (
    LayoutMismatch,
    PeerUnreachable,
    TransferError,
    TransferIntegrityError,
    TransferRefused,
    TransferResult,
    TransferTimeout,
)
from pdserve.kv.pool import ArrayBlockPool, BlockPool

__all__ = [
    "TRANSPORTS",
    "ArrayBlockPool",
    "BlockPool",
    "LayoutMismatch",
    "PeerUnreachable",
    "TransferClient",
    "TransferEndpoint",
    "TransferError",
    "TransferIntegrityError",
    "TransferRefused",
    "TransferResult",
    "TransferTimeout",
    "default_batch_blocks",
]
