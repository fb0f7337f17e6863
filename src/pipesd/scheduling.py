"""Token-batch planning: which draft tokens go up the wire together (PipeSD mechanism 1).

Costs, measured online by the edge (:class:`CostModel`): ``g`` seconds to draft a token, ``s``
seconds of startup per message, ``c`` seconds per token on the wire. Batch ``(j, i]`` can
start once token ``i`` is drafted and the previous batch has left, so with ``F(i)`` the time
batch ``(., i]`` has left::

    F(0) = 0,   F(i) = min_{0<=j<i} max(F(j), i*g) + s + (i-j)*c

:func:`plan_batches` returns the argmin path (ties: the smallest ``j``, i.e. fewer, larger
batches) and ``F(n)``; O(n^2), in C++ (``pipesd._native``).

**Expected-cost variant** (:func:`plan_batches_expected`). The run length ``L`` is not known
when the plan is made: the trigger fires after ``L`` tokens with probability
``length_probs[L-1]``, and a triggered token is flushed at once with everything unsent. A plan
is a set of cut points ``0 = c_0 < c_1 < ... < c_m < N``. If the trigger fires at ``L``, the
batches are the planned ones below ``L`` and then ``(c_k, L]`` with ``c_k`` the last cut
below ``L``; the cost is that last batch's finish time
``fin(L) = max(T(c_k), L*g) + s + (L - c_k)*c`` where ``T`` is the recurrence above along
the plan's cuts. The planner minimises ``E[fin(L)] = sum_L P(L) fin(L)`` exactly: a DP over
the last cut ``j`` whose labels are the Pareto-optimal pairs (cost accumulated for
``L <= j``, ``T(j)``) — future cost is additive in the first and non-decreasing in the second,
so a dominated label can never be part of the optimum. ``sizes`` is the plan for the whole
horizon ``N = len(length_probs)``, ``finish_s`` the expected finish time.

The pure-Python reference of both (:func:`plan_batches_reference`,
:func:`plan_batches_expected_reference`) performs the same floating-point operations in the
same order; the tests compare them and check optimality against brute force.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

from pipesd import _native

__all__ = ["BatchPlan", "plan_batches", "plan_batches_expected", "plan_batches_reference",
           "plan_batches_expected_reference", "CostModel", "MAX_PLAN_TOKENS", "MAX_EXPECTED_TOKENS"]

MAX_PLAN_TOKENS: int = int(_native.MAX_PLAN_TOKENS)
MAX_EXPECTED_TOKENS: int = int(_native.MAX_EXPECTED_TOKENS)


@dataclass(frozen=True)
class BatchPlan:
    sizes: list
    finish_s: float


def _check_costs(gen_s: float, startup_s: float, per_token_s: float) -> None:
    for name, v in (("gen_s", gen_s), ("startup_s", startup_s), ("per_token_s", per_token_s)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _check_n(n_tokens: int) -> None:
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool):
        raise ValueError(f"n_tokens must be an int, got {n_tokens!r}")
    if n_tokens < 0 or n_tokens > MAX_PLAN_TOKENS:
        raise ValueError(f"n_tokens must be in [0, {MAX_PLAN_TOKENS}], got {n_tokens}")


def _check_probs(length_probs: Sequence[float]) -> list:
    probs = [float(p) for p in length_probs]
    if len(probs) > MAX_EXPECTED_TOKENS:
        raise ValueError(f"length_probs has {len(probs)} entries; at most {MAX_EXPECTED_TOKENS}")
    if any(not math.isfinite(p) or p < 0 for p in probs):
        raise ValueError("length_probs must be finite and >= 0")
    if probs and abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"length_probs must sum to 1 (got {sum(probs):.6g})")
    return probs


def plan_batches(n_tokens: int, gen_s: float, startup_s: float, per_token_s: float) -> BatchPlan:
    """Optimal batch sizes for ``n_tokens`` drafts (C++)."""
    _check_n(n_tokens)
    _check_costs(gen_s, startup_s, per_token_s)
    sizes, fin = _native.plan_batches(n_tokens, float(gen_s), float(startup_s), float(per_token_s))
    return BatchPlan(list(sizes), float(fin))


def plan_batches_expected(length_probs: Sequence[float], gen_s: float, startup_s: float,
                          per_token_s: float) -> BatchPlan:
    """Plan minimising the expected finish time over the trigger's length distribution (C++)."""
    probs = _check_probs(length_probs)
    _check_costs(gen_s, startup_s, per_token_s)
    sizes, fin = _native.plan_batches_expected(probs, float(gen_s), float(startup_s), float(per_token_s))
    return BatchPlan(list(sizes), float(fin))


# ----------------------------------------------------------------------------- reference
def plan_batches_reference(n_tokens: int, gen_s: float, startup_s: float, per_token_s: float) -> BatchPlan:
    """Pure-Python :func:`plan_batches` (same operations, same order, same ties)."""
    _check_n(n_tokens)
    _check_costs(gen_s, startup_s, per_token_s)
    n, g, s, c = n_tokens, float(gen_s), float(startup_s), float(per_token_s)
    if n == 0:
        return BatchPlan([], 0.0)
    F = [0.0] * (n + 1)
    arg = [0] * (n + 1)
    for i in range(1, n + 1):
        ready = i * g
        best, best_j = math.inf, 0
        for j in range(i):
            v = max(F[j], ready) + s + (i - j) * c
            if v < best:
                best, best_j = v, j
        F[i], arg[i] = best, best_j
    sizes = []
    i = n
    while i > 0:
        sizes.append(i - arg[i])
        i = arg[i]
    return BatchPlan(sizes[::-1], F[n])


def plan_batches_expected_reference(length_probs: Sequence[float], gen_s: float, startup_s: float,
                                    per_token_s: float) -> BatchPlan:
    """Pure-Python :func:`plan_batches_expected` (same Pareto DP, same order)."""
    probs = _check_probs(length_probs)
    _check_costs(gen_s, startup_s, per_token_s)
    g, s, c = float(gen_s), float(startup_s), float(per_token_s)
    n = len(probs)
    if n == 0:
        return BatchPlan([], 0.0)
    front: list[list[tuple]] = [[] for _ in range(n)]  # (acc, t, prev_j, prev_k)
    front[0].append((0.0, 0.0, -1, -1))
    best, best_j, best_k = math.inf, -1, -1
    for j in range(n):
        for k in range(len(front[j])):
            acc, t = front[j][k][0], front[j][k][1]
            for i in range(j + 1, n + 1):
                fin = max(t, i * g) + s + (i - j) * c
                acc += probs[i - 1] * fin
                if i == n:
                    if acc < best:
                        best, best_j, best_k = acc, j, k
                    break
                f = front[i]
                if any(y[0] <= acc and y[1] <= fin for y in f):
                    continue
                f[:] = [y for y in f if not (acc <= y[0] and fin <= y[1])]
                f.append((acc, fin, j, k))
    cuts = [n]
    j, k = best_j, best_k
    while j > 0:
        cuts.append(j)
        _, _, j, k = front[j][k]
    cuts.append(0)
    cuts.reverse()
    return BatchPlan([cuts[i] - cuts[i - 1] for i in range(1, len(cuts))], best)


# ----------------------------------------------------------------------------- cost model
def _theil_sen(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Robust line fit y = a + b x (median of pairwise slopes); O(n^2) on a small window."""
    slopes = []
    n = len(xs)
    for i in range(n):
        for j in range(i + 1, n):
            dx = xs[j] - xs[i]
            if dx != 0:
                slopes.append((ys[j] - ys[i]) / dx)
    if not slopes:
        return _median(ys), 0.0
    b = _median(slopes)
    a = _median([y - b * x for x, y in zip(xs, ys)])
    return a, b


def _median(v: Sequence[float]) -> float:
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


class CostModel:
    """Online estimates of ``g`` (draft seconds per token), ``s`` (seconds per message) and
    ``c`` (wire seconds per token), robust to outliers and drift.

    ``g``: median of the last ``draft_window`` draft steps. ``s``, ``c``: Theil-Sen line fit of
    send time against batch size over the last ``send_window`` sends (refitted at most every
    ``refit_every`` sends, so the send thread pays O(1) amortised). Until there is data the
    priors hold. Writers: one thread per kind of observation; readers: any thread.
    """

    def __init__(self, gen_s: float = 0.02, startup_s: float = 0.002, per_token_s: float = 0.0005, *,
                 draft_window: int = 64, send_window: int = 48, refit_every: int = 4) -> None:
        _check_costs(gen_s, startup_s, per_token_s)
        self.gen_s, self.startup_s, self.per_token_s = float(gen_s), float(startup_s), float(per_token_s)
        self._drafts: deque = deque(maxlen=draft_window)
        self._sends: deque = deque(maxlen=send_window)
        self._refit_every = refit_every
        self._since_fit = 0
        self._lock = threading.Lock()
        self.observations = 0

    def observe_draft(self, seconds: float) -> None:
        if not (seconds >= 0 and math.isfinite(seconds)):
            return
        self._drafts.append(seconds)
        if len(self._drafts) % 8 == 0 or len(self._drafts) < 8:
            self.gen_s = _median(self._drafts)

    def observe_send(self, n_tokens: int, seconds: float) -> None:
        if n_tokens < 1 or not (seconds >= 0 and math.isfinite(seconds)):
            return
        with self._lock:
            self._sends.append((float(n_tokens), float(seconds)))
            self.observations += 1
            self._since_fit += 1
            if self._since_fit < self._refit_every and len(self._sends) > self._refit_every:
                return
            self._since_fit = 0
            xs = [x for x, _ in self._sends]
            ys = [y for _, y in self._sends]
        if len(set(xs)) >= 2:
            a, b = _theil_sen(xs, ys)
            self.startup_s, self.per_token_s = max(0.0, a), max(0.0, b)
        else:  # one batch size seen: split the time with the current slope
            t = _median(ys)
            self.startup_s = max(0.0, t - self.per_token_s * xs[0])

    def snapshot(self) -> dict:
        return {"gen_s": self.gen_s, "startup_s": self.startup_s, "per_token_s": self.per_token_s}

    def changed_since(self, snapshot: Optional[dict], rel: float = 0.3) -> bool:
        """True when any cost moved by more than ``rel`` (relative) since ``snapshot``."""
        if snapshot is None:
            return True
        now = self.snapshot()
        for k, old in snapshot.items():
            new = now[k]
            scale = max(abs(old), 1e-6)
            if abs(new - old) / scale > rel:
                return True
        return False

    def plan(self, n_tokens: int) -> BatchPlan:
        return plan_batches(n_tokens, self.gen_s, self.startup_s, self.per_token_s)

    def plan_expected(self, length_probs: Sequence[float]) -> BatchPlan:
        return plan_batches_expected(length_probs, self.gen_s, self.startup_s, self.per_token_s)
