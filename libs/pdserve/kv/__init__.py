"""KV cache data plane: block pools and the ZeroMQ block transfer between prefill and decode."""

from pdserve.kv.pool import ArrayBlockPool, BlockPool
from pdserve.kv.transfer import (
    LayoutMismatch,
    TransferClient,
    TransferEndpoint,
    TransferError,
    TransferIntegrityError,
    TransferRefused,
    TransferResult,
    TransferTimeout,
)

__all__ = [
    "ArrayBlockPool",
    "BlockPool",
    "LayoutMismatch",
    "TransferClient",
    "TransferEndpoint",
    "TransferError",
    "TransferIntegrityError",
    "TransferRefused",
    "TransferResult",
    "TransferTimeout",
]
