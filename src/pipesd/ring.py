"""The lock-free ring between the edge's compute thread (producer) and send thread (consumer).

Why: the compute thread must never wait for the wire. It pushes each draft token into this
ring (a few hundred nanoseconds, no lock, no allocation, never blocks) and the send thread
drains it in batches, blocking in :meth:`TokenRing.pop_batch` *without the GIL*, so the
drafting thread keeps the interpreter while the sender waits. The ring is the *only* channel
from the compute thread to the send thread: what the sender must do with a token (verify
now, expect no more drafts) travels with the token, in its ``flags``.

A thin face over the C++ SPSC ring in ``pipesd._native`` (``csrc/ring.hpp``): fixed-layout
records (position int64, token int32, draft probability float32, rollback epoch uint32,
flags uint32, and up to ``topk_max`` (id, prob) pairs of the draft's top-k distribution q
with their count). Exactly one producer thread and one consumer thread; a second concurrent
consumer gets a ``RuntimeError`` instead of corrupted data.

Flags: a uint32 bit set per record, given to :meth:`TokenRing.push` (``flags=``, default 0)
and returned unchanged by :meth:`TokenRing.try_pop` (``TokenRecord.flags``) and
:meth:`TokenRing.pop_batch` (``TokenBatch.flags``). The ring never interprets them; the edge
uses these bits (the others are free, and carried just the same):

``FLAG_VERIFY`` (1)
    The trigger fired at this token: verify everything pending through it now.
``FLAG_STOP`` (2)
    The edge stops drafting after this token until a verdict arrives (lookahead cap reached,
    end of generation, EOS, or a serial method that drafts one round at a time).
``FLAG_HINT`` (4)
    Reserved: this record is the draft at the bonus position of a verification in flight.

A record made stale by :meth:`TokenRing.bump_epoch` is dropped whatever its flags.

Rollback without locks: :meth:`TokenRing.bump_epoch` advances the ring's epoch (one thread,
e.g. the one applying a verdict); records are stamped with the epoch in force when pushed
and the consumer drops every record older than the current epoch (counted in
``stale_dropped``).

Waiting: a consumer blocked in ``pop_batch`` spins for a moment, then sleeps on a condition
variable until a push or ``close()`` wakes it (naps capped at 1 ms as a backstop), so it costs
almost no CPU while it waits; ``push`` stays lock-free and only takes a lock to wake a
consumer that is actually asleep.

Full ring: ``push`` returns ``False``; back off with ``time.sleep(0)`` or a short sleep before
retrying. A bare Python retry loop holds the GIL, and the consumer needs the GIL to hand its
batch back, so the two threads would convoy on the interpreter's 5 ms switch interval.

Close: after :meth:`TokenRing.close`, ``push`` returns ``False``; a consumer blocked in
``pop_batch`` wakes at once, drains what is left, then gets ``None``. A push racing
with ``close()`` from another thread may be dropped; to deliver everything, close from the
producer after its last push.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from pipesd import _native

__all__ = ["TokenRing", "TokenBatch", "TokenRecord", "MAX_RING_CAPACITY", "MAX_TOPK", "FLAG_VERIFY", "FLAG_STOP",
           "FLAG_HINT"]

MAX_RING_CAPACITY: int = int(_native.MAX_RING_CAPACITY)
MAX_TOPK: int = int(_native.MAX_TOPK)

#: The trigger fired at this token: verify everything pending through it now.
FLAG_VERIFY: int = 1
#: The edge stops drafting after this token until a verdict (lookahead cap, end, EOS, or a
#: serial method).
FLAG_STOP: int = 2
#: Reserved: this record is the draft at the bonus position of a verification in flight.
FLAG_HINT: int = 4

ArrayLike = Union[np.ndarray, Sequence[float], Sequence[int]]


@dataclass
class TokenBatch:
    """Records popped together; every field is a numpy array with one row per record."""

    position: np.ndarray  # int64 [n]
    token: np.ndarray  # int32 [n]
    prob: np.ndarray  # float32 [n]
    epoch: np.ndarray  # uint32 [n]
    topk_ids: np.ndarray  # int32 [n, topk_max], zero past topk_count
    topk_probs: np.ndarray  # float32 [n, topk_max], zero past topk_count
    topk_count: np.ndarray  # int32 [n]
    flags: np.ndarray  # uint32 [n], FLAG_* bits as pushed

    def __len__(self) -> int:
        return len(self.position)


class TokenRecord(NamedTuple):
    """One record (:meth:`TokenRing.try_pop`); top-k arrays have exactly ``topk_count`` entries.
    ``flags`` is last so unpacking the leading fields keeps working."""

    position: int
    token: int
    prob: float
    epoch: int
    topk_ids: np.ndarray  # int32 [count]
    topk_probs: np.ndarray  # float32 [count]
    flags: int  # FLAG_* bits as pushed


class TokenRing:
    """SPSC ring of draft-token records (see the module docstring).

    ``capacity``: a power of two in [2, ``MAX_RING_CAPACITY``]; ``topk_max``: in [0, 256].
    Storage for ``capacity`` records with ``topk_max`` pairs each is allocated here, once.
    """

    __slots__ = ("_r", "_push")

    def __init__(self, capacity: int, topk_max: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise ValueError(f"capacity must be an int (a power of two >= 2), got {capacity!r}")
        if isinstance(topk_max, bool) or not isinstance(topk_max, (int, np.integer)):
            raise ValueError(f"topk_max must be an int in [0, {MAX_TOPK}], got {topk_max!r}")
        if not 0 <= topk_max <= MAX_TOPK:
            raise ValueError(f"topk_max must be in [0, {MAX_TOPK}], got {topk_max}")
        if capacity < 2 or capacity > MAX_RING_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two in [2, {MAX_RING_CAPACITY}], got {capacity}")
        self._r = _native.TokenRing(int(capacity), int(topk_max))
        self._push = self._r.pusher()  # = self._r.push, bound: cheaper per call (see bindings.cpp)

    def push(self, position: int, token: int, prob: float, topk_ids: Optional[ArrayLike] = None,
             topk_probs: Optional[ArrayLike] = None, flags: int = 0) -> bool:
        """Producer: append a record stamped with the current epoch. Returns ``False`` when the
        ring is full or closed (never blocks). ``topk_ids``/``topk_probs``: both or neither, 1-D,
        at most ``topk_max`` long (``ValueError`` otherwise). ``flags``: an int in [0, 2**32)
        (``FLAG_*`` bits; ``TypeError`` outside that range), carried unchanged to the consumer."""
        return self._push(position, token, prob, topk_ids, topk_probs, flags)

    def try_pop(self) -> Optional[TokenRecord]:
        """Consumer: the next current-epoch record, or ``None`` if there is none (never blocks)."""
        t = self._r.try_pop()
        return None if t is None else TokenRecord(*t)

    def pop_batch(self, max_n: int, timeout_s: float) -> Optional[TokenBatch]:
        """Consumer: wait up to ``timeout_s`` (GIL released) until at least one record is
        available and return up to ``max_n`` of them; an empty batch on timeout; ``None`` once
        the ring is closed and drained. ``timeout_s=0`` polls; ``math.inf`` waits for data or
        close."""
        t = self._r.pop_batch(max_n, timeout_s)
        return None if t is None else TokenBatch(*t)

    def close(self) -> None:
        """Refuse further pushes and wake a blocked consumer (it drains, then gets ``None``)."""
        self._r.close()

    def bump_epoch(self) -> int:
        """Make every record pushed so far stale (rollback); returns the new epoch."""
        return self._r.bump_epoch()

    @property
    def epoch(self) -> int:
        """The epoch new records are stamped with."""
        return self._r.epoch

    @property
    def closed(self) -> bool:
        """True after :meth:`close` (pushes are refused)."""
        return self._r.closed

    @property
    def capacity(self) -> int:
        """Records the ring holds at most (a power of two)."""
        return self._r.capacity

    @property
    def topk_max(self) -> int:
        """Width of each record's top-k (id, prob) storage."""
        return self._r.topk_max

    @property
    def stale_dropped(self) -> int:
        """Records the consumer has dropped as stale so far."""
        return self._r.stale_dropped

    def __len__(self) -> int:
        """Records in the ring now (stale ones included; a snapshot under concurrency)."""
        return len(self._r)

    def __repr__(self) -> str:
        return (f"TokenRing(capacity={self.capacity}, topk_max={self.topk_max}, len={len(self)}, "
                f"epoch={self.epoch}, closed={self.closed})")
