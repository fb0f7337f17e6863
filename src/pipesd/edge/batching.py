"""Where the send thread cuts the stream of draft tokens into messages.

A *segment* is the run of drafts between two NAV triggers. The send thread counts tokens
since the segment began and asks the batcher whether to ship what it holds now. A triggered
token is always flushed at once, whatever the plan says (the send thread does that itself).

- :class:`DPBatcher` (PipeSD): cut points from the exact DP over the online cost model
  ``(g, s, c)``. The run length is unknown when the segment starts, so the plan minimises
  the expected finish time over the empirical distribution of recent run lengths
  (``plan_batches_expected``); until there is history it plans for ``initial_length`` tokens
  (20, as in the paper). Re-plans only when the costs or the length statistics move.
- :class:`FixedBatcher`: a message every ``size`` tokens (the fixed-batch pipeline baseline).
- :class:`TriggerOnlyBatcher`: nothing goes up before the trigger (vanilla SD: draft K, send).
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np

from pipesd.scheduling import CostModel

__all__ = ["Batcher", "DPBatcher", "FixedBatcher", "TriggerOnlyBatcher"]


class Batcher(Protocol):
    def begin_segment(self) -> None: ...

    def cut_now(self, since_segment_start: int) -> bool: ...

    def end_segment(self, length: int) -> None: ...


class TriggerOnlyBatcher:
    def begin_segment(self) -> None:
        pass

    def cut_now(self, since_segment_start: int) -> bool:
        return False

    def end_segment(self, length: int) -> None:
        pass


class FixedBatcher:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.size = size

    def begin_segment(self) -> None:
        pass

    def cut_now(self, since_segment_start: int) -> bool:
        return since_segment_start > 0 and since_segment_start % self.size == 0

    def end_segment(self, length: int) -> None:
        pass


class DPBatcher:
    """Cuts from the DP planner; see the module docstring."""

    def __init__(self, cost_model: CostModel, *, max_length: int = 64, initial_length: int = 20,
                 history: int = 64, replan_rel: float = 0.2, replan_every: int = 8) -> None:
        self.cost = cost_model
        self.max_length = max_length
        self.initial_length = min(initial_length, max_length)
        self.lengths: deque[int] = deque(maxlen=history)
        self.replan_rel = replan_rel
        self._cuts: list[int] = []
        self._next = 0
        self._snapshot = None
        self._seen = 0  # run lengths observed so far
        self._seen_at_plan = 0
        self.replan_every = replan_every
        self.plans = 0

    def _replan(self) -> None:
        if self.lengths:
            hist = np.bincount(np.minimum(np.asarray(self.lengths), self.max_length),
                               minlength=self.max_length + 1)[1:].astype(np.float64)
            hist += 1e-3  # keep every length possible: the trigger can always fire late
            probs = (hist / hist.sum()).tolist()
            plan = self.cost.plan_expected(probs)
        else:
            plan = self.cost.plan(self.initial_length)
        cuts, total = [], 0
        for size in plan.sizes:
            total += size
            cuts.append(total)
        self._cuts = cuts
        self._snapshot = self.cost.snapshot()
        self._seen_at_plan = self._seen
        self.plans += 1

    def begin_segment(self) -> None:
        stale_lengths = self._seen - self._seen_at_plan >= self.replan_every
        if self._snapshot is None or stale_lengths or self.cost.changed_since(self._snapshot, rel=self.replan_rel):
            self._replan()
        self._next = 0

    def cut_now(self, since_segment_start: int) -> bool:
        cuts = self._cuts
        if self._next < len(cuts):
            if since_segment_start >= cuts[self._next]:
                while self._next < len(cuts) and cuts[self._next] <= since_segment_start:
                    self._next += 1
                return True
            return False
        # Past the planned horizon: keep the last planned batch size.
        last = cuts[-1] - (cuts[-2] if len(cuts) > 1 else 0) if cuts else 1
        return (since_segment_start - (cuts[-1] if cuts else 0)) % max(1, last) == 0

    def end_segment(self, length: int) -> None:
        if length > 0:
            self.lengths.append(length)
            self._seen += 1
