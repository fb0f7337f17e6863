"""Token-batch planning: which draft tokens go up the wire together (PipeSD mechanism 1).

Why: sending every draft token alone pays the per-message startup each time; sending them
all at the end serialises drafting and sending. The planner picks the batch cuts that get
the tokens to the cloud soonest, from three costs the edge measures online
(:class:`CostModel`): ``g`` seconds to draft a token, ``s`` seconds of startup per message,
``c`` seconds per token on the wire.

**Exact plan** (:func:`plan_batches`). Batch ``(j, i]`` can start once token ``i`` is drafted
(time ``i*g``) and the previous batch has left (``F(j)``); it takes ``s + (i-j)*c``::

    F(0) = 0,   F(i) = min_{0<=j<i} max(F(j), i*g) + s + (i-j)*c

``finish_s = F(n)`` and ``sizes`` is the argmin path. Optimal: any plan's last batch
``(j, n]`` finishes no earlier than ``max(T(j), n*g) + s + (n-j)*c`` with ``T(j) >= F(j)`` by
induction, and the right-hand side is non-decreasing in ``T(j)``. *Ties* (exact
floating-point equality of two candidates in a row of the recurrence) go to the smallest
``j``, i.e. the largest last batch; the reference evaluates the identical expression in the
identical order, so native and reference plans agree exactly. Several plans can share the
optimal finish (when drafting is the bottleneck, early batches have slack); the planner
returns the argmin path above, which sends each token as early as the optimum allows.
O(n^2) time, ``n <= MAX_PLAN_TOKENS`` (4096).

**Expected-cost plan** (:func:`plan_batches_expected`). The run length ``L`` (tokens until
the NAV trigger fires) is unknown when the plan is made; ``length_probs[L-1] = P(L)`` for
``L = 1..N``. A plan is a set of cut points ``0 < c_1 < ... < c_m < N``. When the trigger
fires at ``L`` the planned batches that end below ``L`` go as planned, and everything
unsent, ``(j, L]`` with ``j`` the last cut below ``L``, goes at once (the paper's rule 1). With
``T(j)`` the recurrence above evaluated along the plan's cuts (``T(0) = 0``), the cost of
``L`` is when that last batch has left, ``fin(L) = max(T(j), L*g) + s + (L-j)*c``, and the
planner minimises ``E[fin(L)] = sum_L P(L) fin(L)`` exactly.

The DP runs over the last cut ``j``. The prefix's contribution ``acc(j) = sum_{L<=j} P(L)
fin(L)`` and ``T(j)`` depend only on the cuts up to ``j``; the rest of the cost depends only on
``j``, the later cuts and ``t = max(T(j), (j+1)*g)`` (every later ``max(T(j), L*g)`` has ``L >
j``), and is non-decreasing in ``t``. So a prefix ``(acc, t)`` is useless when another prefix
ending at the same ``j`` has ``acc' <= acc`` and ``t' <= t``: the DP keeps, per cut point, the
Pareto front of ``(acc, t)`` labels and extends each by every next cut (or by the end ``N``).
This is exact (the tests check it against all ``2^(N-1)`` cut sets for ``N <= 10``). Two
prunings cut the work without changing the result: a prefix whose ``acc`` reaches the best
complete plan found so far is dropped, and (C++ only) so is one whose ``acc`` plus a lower
bound on the remaining cost (every later ``fin(L) >= max(t + (L-j)*c, L*g + c) + s``) exceeds
it. Fronts stay small in practice (at most a few dozen labels up to ``N = 256`` on varied
distributions and costs; see :func:`expected_plan_stats`): ``N = 64`` plans take well under a
millisecond, ``N = 256`` a few milliseconds. The front is not bounded polynomially in the
worst case (the slowest ``N = 512`` case we met took ~0.1 s), hence the cap
``N <= MAX_EXPECTED_TOKENS`` (512). Ties: a label equal to an existing one in both
coordinates is dropped; fronts are extended in ``t`` order; the final choice is the first
strict minimum. ``sizes`` is the plan for the full horizon ``N``; ``finish_s`` the expected
finish time.

The pure-Python reference (:mod:`pipesd._scheduling_ref`, exposed checked as
:func:`plan_batches_reference` and :func:`plan_batches_expected_reference`) performs the same
floating-point operations in the same order; it is for tests and readers, never the hot path.

**Cost model** (:class:`CostModel`): ``g`` = median of the last ``draft_window`` draft steps;
``(s, c)`` = robust line fit of send time against batch size over the last ``send_window``
sends (C++: median-split start, Huber IRLS with MAD scale, Tukey-biweight polish; O(window)
per fit), so isolated outliers (a GC pause, a retransmit) do not move it; a run of
``drift_run`` consecutive sends all far off the model (a bandwidth step) drops the older
window so it follows the new regime at once. Priors hold until there is data; with a
single batch size seen, ``c`` keeps its prior and ``s`` is fitted.

Bad input to the planners (negative ``n`` or ``n`` above the cap, negative/NaN/inf costs,
probabilities negative, NaN or not summing to 1 within ``PROB_SUM_TOL``) raises
``ValueError`` naming the argument; ``n = 0`` gives an empty plan finishing at 0.
"""
from __future__ import annotations

import math
import operator
import threading
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from pipesd import _native
from pipesd import _scheduling_ref as _ref

__all__ = ["BatchPlan", "plan_batches", "plan_batches_expected", "plan_batches_reference",
           "plan_batches_expected_reference", "expected_plan_stats", "CostModel", "CostSnapshot",
           "MAX_PLAN_TOKENS", "MAX_EXPECTED_TOKENS", "PROB_SUM_TOL"]

MAX_PLAN_TOKENS: int = int(_native.MAX_PLAN_TOKENS)
MAX_EXPECTED_TOKENS: int = int(_native.MAX_EXPECTED_TOKENS)
PROB_SUM_TOL: float = float(_native.PROB_SUM_TOL)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Consecutive batch sizes and the (expected) time the cloud holds every token."""

    sizes: list[int]
    finish_s: float

    @property
    def cuts(self) -> list[int]:
        """Batch ends, e.g. sizes ``[2, 3]`` -> ``[2, 5]``: the send thread cuts there."""
        return _ref.cuts_of(self.sizes)


# ----------------------------------------------------------------------------- validation
def _as_n(n_tokens) -> int:
    if type(n_tokens) is int:
        return n_tokens
    if isinstance(n_tokens, bool):
        raise ValueError(f"n_tokens must be an int, got {n_tokens!r}")
    try:
        return operator.index(n_tokens)
    except TypeError:
        raise ValueError(f"n_tokens must be an int, got {n_tokens!r}") from None


def _as_cost(name: str, v) -> float:
    if type(v) is float:
        return v
    if isinstance(v, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


def _checked_n(n_tokens) -> int:
    n = _as_n(n_tokens)
    if not 0 <= n <= MAX_PLAN_TOKENS:
        raise ValueError(f"n_tokens must be in [0, {MAX_PLAN_TOKENS}], got {n}")
    return n


def _checked_costs(gen_s, startup_s, per_token_s) -> tuple[float, float, float]:
    out = []
    for name, v in (("gen_s", gen_s), ("startup_s", startup_s), ("per_token_s", per_token_s)):
        x = _as_cost(name, v)
        if not (x >= 0.0 and math.isfinite(x)):
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
        out.append(x)
    return out[0], out[1], out[2]


def _checked_probs(length_probs) -> list[float]:
    try:
        probs = [float(p) for p in length_probs]
    except (TypeError, ValueError):
        raise ValueError("length_probs must be a sequence of numbers") from None
    if not probs:
        raise ValueError("length_probs must not be empty")
    if len(probs) > MAX_EXPECTED_TOKENS:
        raise ValueError(f"length_probs has {len(probs)} entries; at most {MAX_EXPECTED_TOKENS}")
    for i, p in enumerate(probs):
        if not (p >= 0.0 and math.isfinite(p)):
            raise ValueError(f"length_probs[{i}] must be finite and >= 0, got {p!r}")
    total = math.fsum(probs)
    if not abs(total - 1.0) <= PROB_SUM_TOL:
        raise ValueError(f"length_probs must sum to 1 (within {PROB_SUM_TOL:g}), got sum {total!r}")
    return probs


# ----------------------------------------------------------------------------- planners
def plan_batches(n_tokens: int, gen_s: float, startup_s: float, per_token_s: float) -> BatchPlan:
    """Optimal batch sizes for the next ``n_tokens`` drafts and the time the cloud holds them
    all (C++, microseconds): the send thread cuts the token stream where the plan says."""
    n = _as_n(n_tokens)
    if not 0 <= n <= MAX_PLAN_TOKENS:
        raise ValueError(f"n_tokens must be in [0, {MAX_PLAN_TOKENS}], got {n}")
    sizes, fin = _native.plan_batches(n, _as_cost("gen_s", gen_s), _as_cost("startup_s", startup_s),
                                      _as_cost("per_token_s", per_token_s))
    return BatchPlan(sizes, fin)


def plan_batches_expected(length_probs: Union[Sequence[float], np.ndarray], gen_s: float, startup_s: float,
                          per_token_s: float) -> BatchPlan:
    """Plan minimising the expected time the cloud holds the whole triggered run, when the
    trigger fires after ``L`` tokens with probability ``length_probs[L-1]`` (C++)."""
    try:
        probs = np.asarray(length_probs, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("length_probs must be a sequence of numbers") from None
    if probs.ndim != 1:
        raise ValueError(f"length_probs must be 1-D, got shape {probs.shape}")
    sizes, fin = _native.plan_batches_expected(probs, _as_cost("gen_s", gen_s), _as_cost("startup_s", startup_s),
                                               _as_cost("per_token_s", per_token_s))
    return BatchPlan(sizes, fin)


def plan_batches_reference(n_tokens: int, gen_s: float, startup_s: float, per_token_s: float) -> BatchPlan:
    """Pure-Python :func:`plan_batches` (same operations, same order, same ties); slow."""
    n = _checked_n(n_tokens)
    sizes, fin = _ref.plan_batches(n, *_checked_costs(gen_s, startup_s, per_token_s))
    return BatchPlan(sizes, fin)


def plan_batches_expected_reference(length_probs: Sequence[float], gen_s: float, startup_s: float,
                                    per_token_s: float) -> BatchPlan:
    """Pure-Python :func:`plan_batches_expected` (same Pareto DP, same order); slow."""
    probs = _checked_probs(length_probs)
    sizes, fin = _ref.plan_batches_expected(probs, *_checked_costs(gen_s, startup_s, per_token_s))
    return BatchPlan(sizes, fin)


def expected_plan_stats() -> dict:
    """Pareto-front sizes of this thread's last :func:`plan_batches_expected` call
    (``labels`` kept in all, ``max_front`` at one cut point): the DP's real cost."""
    return dict(_native.expected_stats())


# ----------------------------------------------------------------------------- cost model
class CostSnapshot(dict):
    """The three costs at one moment (seconds): a plain dict ``{gen_s, startup_s,
    per_token_s}`` (what other modules store and compare) that also reads as attributes."""

    __slots__ = ()
    KEYS = ("gen_s", "startup_s", "per_token_s")

    def __init__(self, gen_s: float, startup_s: float, per_token_s: float) -> None:
        super().__init__(gen_s=gen_s, startup_s=startup_s, per_token_s=per_token_s)

    @property
    def gen_s(self) -> float:
        return self["gen_s"]

    @property
    def startup_s(self) -> float:
        return self["startup_s"]

    @property
    def per_token_s(self) -> float:
        return self["per_token_s"]

    def astuple(self) -> tuple[float, float, float]:
        return self["gen_s"], self["startup_s"], self["per_token_s"]


class CostModel:
    """Online estimates of ``g`` (draft seconds per token), ``s`` (seconds per message) and
    ``c`` (wire seconds per token), robust to outliers and drift (see the module docstring).

    Why: the DP plan is only as good as its costs, and the edge's costs move (thermal
    throttling, bandwidth traces). Cheap enough for the send thread to call per batch:
    ``observe_draft`` is amortised O(1) (a median of ``draft_window`` values every 8 steps),
    ``observe_send`` O(``send_window``) in C++ at most every ``refit_every`` sends.

    Threads: ``observe_draft`` and ``observe_send`` may be called from different threads (each
    kind is serialised by its own lock); readers (the properties, :meth:`snapshot`,
    :meth:`plan`) never block and always see a consistent ``(startup_s, per_token_s)`` pair.
    Invalid observations (negative, NaN, inf) are ignored and counted in ``rejected``.
    """

    def __init__(self, gen_s: float = 0.02, startup_s: float = 0.002, per_token_s: float = 0.0005, *,
                 draft_window: int = 64, send_window: int = 200, refit_every: int = 4,
                 drift_run: int = 12) -> None:
        g, s, c = _checked_costs(gen_s, startup_s, per_token_s)
        for name, v, lo in (("draft_window", draft_window, 1), ("send_window", send_window, 2),
                            ("refit_every", refit_every, 1), ("drift_run", drift_run, 2)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if drift_run > send_window:
            raise ValueError(f"drift_run ({drift_run}) must be <= send_window ({send_window})")
        self.prior = CostSnapshot(g, s, c)
        self._g = g
        self._sc = (s, c)  # replaced as one tuple: readers never see half an update
        self._drafts: deque[float] = deque(maxlen=draft_window)
        self._draft_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._xs = np.zeros(send_window, dtype=np.float64)
        self._ys = np.zeros(send_window, dtype=np.float64)
        self._pos = 0  # next slot
        self._count = 0  # valid slots
        self._since_fit = 0
        self._refit_every = refit_every
        self._drift_run = drift_run
        self._off_run = 0  # consecutive sends far off the model, same direction (signed)
        self.n_drafts = 0
        self.n_sends = 0
        self._rejected_drafts = 0  # one counter per writer kind: each is updated under its lock
        self._rejected_sends = 0
        self.fits = 0
        self.drift_resets = 0

    # ------------------------------------------------------------------ estimates
    @property
    def rejected(self) -> int:
        """Observations ignored as invalid (negative, NaN, inf)."""
        return self._rejected_drafts + self._rejected_sends

    @property
    def gen_s(self) -> float:
        """Draft seconds per token (g)."""
        return self._g

    @property
    def startup_s(self) -> float:
        """Seconds of per-message overhead (s)."""
        return self._sc[0]

    @property
    def per_token_s(self) -> float:
        """Wire seconds per token (c)."""
        return self._sc[1]

    def snapshot(self) -> CostSnapshot:
        """The current costs, for :meth:`changed_since` and for planning with one set."""
        s, c = self._sc
        return CostSnapshot(self._g, s, c)

    def changed_since(self, snapshot: Optional[Mapping[str, float]], rel: float = 0.3,
                      abs_tol_s: float = 1e-6) -> bool:
        """True when any cost moved by more than ``rel`` relative to ``snapshot`` (changes
        below ``abs_tol_s`` seconds never count): re-plan or re-tune only then."""
        if snapshot is None:
            return True
        now = self.snapshot()
        for key in CostSnapshot.KEYS:
            old, new = float(snapshot[key]), now[key]
            diff = abs(new - old)
            if diff > abs_tol_s and diff > rel * abs(old):
                return True
        return False

    # ------------------------------------------------------------------ observations
    def observe_draft(self, seconds: float) -> None:
        """One draft step took ``seconds`` (compute thread)."""
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            with self._draft_lock:
                self._rejected_drafts += 1
            return
        with self._draft_lock:
            d = self._drafts
            d.append(float(seconds))
            self.n_drafts += 1
            if self.n_drafts <= 8 or self.n_drafts % 8 == 0:
                s = sorted(d)
                m = len(s) // 2
                self._g = s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])

    def observe_send(self, n_tokens: int, seconds: float) -> None:
        """A message of ``n_tokens`` draft tokens took ``seconds`` to send (send thread).
        Empty messages (``n_tokens = 0``) are valid observations of the startup cost."""
        if not (seconds >= 0.0 and math.isfinite(seconds)) or not (n_tokens >= 0):
            with self._send_lock:
                self._rejected_sends += 1
            return
        with self._send_lock:
            x, y = float(n_tokens), float(seconds)
            s, c = self._sc
            self._track_drift(x, y, s, c)
            self._xs[self._pos] = x
            self._ys[self._pos] = y
            self._pos = (self._pos + 1) % len(self._xs)
            self._count = min(self._count + 1, len(self._xs))
            self.n_sends += 1
            self._since_fit += 1
            if self._count <= 16 or self._since_fit >= self._refit_every:
                self._refit(c)

    def _track_drift(self, x: float, y: float, s: float, c: float) -> None:
        """Count consecutive sends far off the model in one direction; after ``drift_run`` of
        them the regime has changed: keep only those and refit."""
        pred = s + c * x
        if y > 1.5 * pred + 1e-6:
            step = 1
        elif y < pred / 1.5 - 1e-6:
            step = -1
        else:
            self._off_run = 0
            return
        self._off_run = self._off_run + step if self._off_run * step > 0 else step
        if abs(self._off_run) >= self._drift_run:
            keep = self._drift_run - 1  # this send is added by the caller
            idx = [(self._pos - 1 - k) % len(self._xs) for k in range(min(keep, self._count))][::-1]
            xs, ys = self._xs[idx].copy(), self._ys[idx].copy()
            self._xs[:len(idx)] = xs
            self._ys[:len(idx)] = ys
            self._pos, self._count = len(idx) % len(self._xs), len(idx)
            self._off_run = 0
            self._since_fit = self._refit_every  # refit now
            self.drift_resets += 1

    def _refit(self, c_prior: float) -> None:
        m = self._count
        a, b, _ = _native.robust_line_fit(self._xs[:m], self._ys[:m], c_prior)
        if b < 0.0:  # no size dependence in the data: all startup
            b, a = 0.0, float(np.median(self._ys[:m]))
        self._sc = (max(a, 0.0), b)
        self._since_fit = 0
        self.fits += 1

    # ------------------------------------------------------------------ planning
    def plan(self, n_tokens: int) -> BatchPlan:
        """:func:`plan_batches` with the current costs."""
        g, (s, c) = self._g, self._sc
        return plan_batches(n_tokens, g, s, c)

    def plan_expected(self, length_probs: Union[Sequence[float], np.ndarray]) -> BatchPlan:
        """:func:`plan_batches_expected` with the current costs."""
        g, (s, c) = self._g, self._sc
        return plan_batches_expected(length_probs, g, s, c)
