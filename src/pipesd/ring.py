"""The lock-free ring between the edge's compute thread (producer) and send thread (consumer).

A thin face over the C++ SPSC ring in ``pipesd._native``: fixed-layout records (position,
token, draft probability, epoch, top-k q), no locks and no allocation on push/pop, and a
blocking ``pop_batch`` that waits without holding the GIL. One producer and one consumer
only. Rollback: the producer calls :meth:`TokenRing.bump_epoch`; records pushed before are
stale and the consumer never sees them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipesd import _native

__all__ = ["TokenRing", "TokenBatch"]


@dataclass
class TokenBatch:
    """Records popped together; every field a numpy array of the same length."""

    position: np.ndarray  # int64 [n]
    token: np.ndarray  # int32 [n]
    prob: np.ndarray  # float32 [n]
    epoch: np.ndarray  # uint32 [n]
    topk_ids: np.ndarray  # int32 [n, topk_max], zero padded past topk_count
    topk_probs: np.ndarray  # float32 [n, topk_max]
    topk_count: np.ndarray  # int32 [n]

    def __len__(self) -> int:
        return len(self.position)


class TokenRing:
    """SPSC ring of draft-token records. ``capacity`` must be a power of two >= 2."""

    def __init__(self, capacity: int, topk_max: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= 2, got {capacity!r}")
        if not isinstance(topk_max, int) or not (0 <= topk_max <= 256):
            raise ValueError(f"topk_max must be an int in [0, 256], got {topk_max!r}")
        self._r = _native.TokenRing(capacity, topk_max)

    def push(self, position: int, token: int, prob: float, topk_ids=None, topk_probs=None) -> bool:
        """Producer: add a record stamped with the current epoch. False when full or closed."""
        return self._r.push(position, token, prob, topk_ids, topk_probs)

    def try_pop(self) -> Optional[TokenBatch]:
        """Consumer: one current-epoch record as a batch of one, or None."""
        t = self._r.try_pop()
        return None if t is None else TokenBatch(*t)

    def pop_batch(self, max_n: int, timeout_s: float) -> Optional[TokenBatch]:
        """Consumer: wait up to ``timeout_s`` for records; returns up to ``max_n`` of them, an
        empty batch on timeout, or None once the ring is closed and drained."""
        t = self._r.pop_batch(max_n, timeout_s)
        return None if t is None else TokenBatch(*t)

    def close(self) -> None:
        """Wake a blocked consumer; later pushes return False."""
        self._r.close()

    def bump_epoch(self) -> int:
        """Producer: make every record pushed so far stale; returns the new epoch."""
        return self._r.bump_epoch()

    @property
    def epoch(self) -> int:
        return self._r.epoch

    @property
    def closed(self) -> bool:
        return self._r.closed

    @property
    def capacity(self) -> int:
        return self._r.capacity

    @property
    def topk_max(self) -> int:
        return self._r.topk_max

    def __len__(self) -> int:
        return len(self._r)
