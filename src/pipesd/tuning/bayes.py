"""Ask/tell cores of the threshold tuner: Bayesian optimisation (GP + EI) and a fixed point.

Both are synchronous, single-threaded and deterministic for a seed; :class:`OnlineTuner`
(``pipesd.tuning.online``) drives them from a worker thread so the edge never waits on a fit.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence, Tuple

__all__ = ["Point", "Box", "DEFAULT_BOX", "KNOBS", "TunerCore", "BayesTuner", "FixedTuner", "check_box"]

Point = Tuple[float, float]  # (tau_seq, tau_tok)
Box = Tuple[Tuple[float, float], Tuple[float, float]]  # ((tau_seq lo, hi), (tau_tok lo, hi))

#: Default search box, ``((tau_seq lo, hi), (tau_tok lo, hi))``. It reaches 0.995 because with a
#: pipelined edge the best thresholds sit high (0.95-0.995: verify often, the pipeline hides the
#: round trip) for confident drafts, and it stops short of 1, where every token triggers.
DEFAULT_BOX: Box = ((0.0, 0.995), (0.0, 0.995))

_BOX_TOL = 1e-9

#: The knobs a :class:`BayesTuner` can search, in point order. ``active`` picks a subset; an
#: inactive knob is held at its ``x0`` value (else its box's low end, 0 by default: switched off).
#: Extension point for more knobs (lookahead, a boolean "lookup on/off"): a knob the edge reads
#: per session rather than per draft step, so it would be applied at ``begin_run``; add it here
#: as an ``Integer`` / ``Categorical`` skopt dimension and widen :data:`Point` (docs/tuning.md,
#: "Budgeted tuning").
KNOBS = ("tau_seq", "tau_tok")

#: Default exponent of the budget penalty: a point spending ``r`` times the budget (``r > 1``)
#: is told to the GP as ``objective * r ** 4`` (10% over budget: +46%; 2x: 16x).
DEFAULT_PENALTY_EXP = 4.0


def check_box(box: Sequence[Sequence[float]]) -> Box:
    """Validate a search box; returns it as a tuple of two ``(lo, hi)`` float pairs."""
    try:
        pairs = tuple((float(lo), float(hi)) for lo, hi in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be ((lo, hi), (lo, hi)), got {box!r}") from None
    if len(pairs) != 2:
        raise ValueError(f"box must have two ranges (tau_seq, tau_tok), got {len(pairs)}")
    for name, (lo, hi) in zip(("tau_seq", "tau_tok"), pairs):
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
            raise ValueError(f"{name} range must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    return pairs


def check_budget(budget: Optional[float], name: str = "cloud_budget_ms_per_token") -> Optional[float]:
    """None, or a number >= 0 (a cloud cost per token; ``math.inf``: no limit, as None);
    ValueError naming ``name``."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or budget < 0:
        raise ValueError(f"{name} must be None or a number >= 0, got {budget!r}")
    return float(budget)


def _check_point(point: Sequence[float], box: Box) -> Point:
    try:
        a, b = (float(v) for v in point)
    except (TypeError, ValueError):
        raise ValueError(f"point must be (tau_seq, tau_tok), got {point!r}") from None
    out = []
    for name, v, (lo, hi) in zip(("tau_seq", "tau_tok"), (a, b), box):
        if not (math.isfinite(v) and lo - _BOX_TOL <= v <= hi + _BOX_TOL):
            raise ValueError(f"{name}={v!r} is outside the search box [{lo}, {hi}]")
        out.append(min(max(v, lo), hi))
    return (out[0], out[1])


def _check_objective(objective: float) -> float:
    if isinstance(objective, bool) or not isinstance(objective, (int, float)) or not math.isfinite(objective) \
            or objective <= 0:
        raise ValueError(f"objective must be a finite number > 0 (a time per token), got {objective!r}")
    return float(objective)


class TunerCore(Protocol):
    """What :class:`OnlineTuner` needs from a tuner (``BayesTuner``, ``FixedTuner``, fakes)."""

    converged: bool
    history: list

    def ask(self) -> Point: ...

    def tell(self, point: Point, objective: float, cost: Optional[float] = None) -> None: ...

    def restart(self, keep_best_as_seed: bool = True) -> None: ...

    @property
    def best(self) -> Optional[Tuple[Point, float]]: ...


class BayesTuner:
    """Gaussian-process Bayesian optimisation of ``(tau_seq, tau_tok)`` with expected improvement.

    Why these choices:

    - The objective (measured TPT of a window of tokens) is noisy, so the GP has a fitted
      white-noise term (scikit-optimize's ``"GP"`` estimator) and :attr:`best` is the point with
      the lowest **posterior mean** among the evaluated points, not the lowest raw
      observation: the raw minimum of 16 noisy windows is biased towards a lucky window (the
      winner's curse), while the posterior mean pools each point with its neighbours.
    - The GP models ``log(objective)``: EI's ``xi = 0.01`` then means "1% better" whatever the
      unit (seconds, or seconds plus weighted joules), and multiplicative noise (a window of
      unlucky acceptances) becomes additive, which is what the GP assumes.
    - ``n_initial`` Latin-hypercube points, then EI maximised over ``n_candidates`` random
      candidates (``acq_optimizer="sampling"``): cheap on 2 CPU cores and deterministic.
    - After ``max_evals`` evaluations the tuner is *converged*: :meth:`ask` returns the best
      point and further :meth:`tell` calls are recorded (phase ``"held"``) but change nothing,
      until :meth:`restart` (drift) starts a new round.
    - BLAS runs single-threaded during a fit (``threadpoolctl``): a 2-D GP on 16 points gains
      nothing from threads, and on a busy machine OpenBLAS thread spin-up made fits ~10x slower.

    ``x0`` (optional) is evaluated first and counts as one of the initial points: start from the
    configured thresholds so the first window runs at a known-sane setting.

    ``active`` (a subset of :data:`KNOBS`): the knobs searched; the others are held at their
    ``x0`` value, else at their box's low end (0: that threshold switched off). Use it where a
    threshold does nothing on the pair's confidences (docs/tuning.md, "Does the dual threshold
    earn its place?").

    ``cloud_budget`` (optional, in the units of the ``cost`` given to :meth:`tell`, e.g. cloud
    busy ms per generated token): every :meth:`tell` must then carry the point's cost; a point
    over budget is told to the GP as ``objective * (cost / budget) ** penalty_exp`` (an explicit
    penalty, smooth at the budget), and :attr:`best` is chosen among the points whose measured
    cost is within budget (the cheapest point when none is; ``best_feasible`` says which).
    ``None``: unconstrained, exactly as without it.
    """

    def __init__(self, box: Box = DEFAULT_BOX, max_evals: int = 16, n_initial: int = 5, seed: int = 0,
                 x0: Optional[Point] = None, n_candidates: int = 2000, scale: str = "nines", xi: float = 0.01,
                 *, active: Sequence[str] = KNOBS, cloud_budget: Optional[float] = None,
                 penalty_exp: float = DEFAULT_PENALTY_EXP) -> None:
        self.box = check_box(box)
        act = tuple(active) if not isinstance(active, str) else (active,)
        if not act or len(set(act)) != len(act) or any(a not in KNOBS for a in act):
            raise ValueError(f"active must be a non-empty subset of {KNOBS}, got {active!r}")
        self.active = tuple(k for k in KNOBS if k in act)
        self.cloud_budget = check_budget(cloud_budget, "cloud_budget")
        if isinstance(penalty_exp, bool) or not isinstance(penalty_exp, (int, float)) or not math.isfinite(penalty_exp) \
                or penalty_exp <= 0:
            raise ValueError(f"penalty_exp must be a finite number > 0, got {penalty_exp!r}")
        self.penalty_exp = float(penalty_exp)
        if scale not in ("nines", "linear"):
            raise ValueError(f"scale must be 'nines' or 'linear', got {scale!r}")
        if scale == "nines" and max(hi for _, hi in self.box) >= 1.0:
            raise ValueError("with scale='nines' the box must stay below 1 (tau = 1 is infinitely many nines)")
        self.scale = scale
        if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not math.isfinite(xi) or xi < 0:
            raise ValueError(f"xi must be a finite number >= 0, got {xi!r}")
        self.xi = float(xi)
        for name, v, lo in (("max_evals", max_evals, 1), ("n_initial", n_initial, 1), ("n_candidates", n_candidates, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if n_initial > max_evals:
            raise ValueError(f"n_initial ({n_initial}) must be <= max_evals ({max_evals})")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.max_evals = max_evals
        self.n_initial = n_initial
        self.seed = seed
        self.n_candidates = n_candidates
        self.round = 0
        self.history: list[dict] = []
        x0p = None if x0 is None else _check_point(x0, self.box)
        # Inactive knobs are held where x0 puts them (else at the box's low end).
        self._fixed = tuple(x0p[i] if x0p is not None else self.box[i][0] for i in range(len(KNOBS)))
        self._idx = tuple(KNOBS.index(k) for k in self.active)
        self._costs: list = []  # per told point of this round: its cost (None when unbudgeted)
        self._start_round(x0p)

    # ------------------------------------------------------------------ rounds
    def _start_round(self, x0: Optional[Point]) -> None:
        from skopt import Optimizer
        from skopt.space import Real

        dims = [Real(self._fwd(self.box[i][0]), self._fwd(self.box[i][1]), name=KNOBS[i]) for i in self._idx]
        self._opt = Optimizer(dims, base_estimator="GP", acq_func="EI", n_initial_points=self.n_initial,
                              initial_point_generator="lhs", acq_optimizer="sampling",
                              acq_optimizer_kwargs={"n_points": self.n_candidates}, acq_func_kwargs={"xi": self.xi},
                              random_state=self.seed + 7919 * self.round)
        self._x0 = x0
        self._costs = []
        self._pending: Optional[Point] = None
        self._evals = 0
        self._best: Optional[Tuple[Point, float]] = None
        self.converged = False

    def restart(self, keep_best_as_seed: bool = True) -> None:
        """Start a new tuning round (after drift). Old evaluations are stale under the new costs,
        so the GP starts empty; with ``keep_best_as_seed`` the previous best is re-measured first."""
        best = self.best
        self.round += 1
        self._start_round(best[0] if (keep_best_as_seed and best is not None) else None)

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> Point:
        """The thresholds to evaluate next; the best point once converged. Idempotent until
        the next :meth:`tell`."""
        if self.converged:
            return self._best[0]
        if self._pending is None:
            if self._x0 is not None and self._evals == 0:
                self._pending = self._x0
            else:
                self._pending = self._full(self._opt.ask())
        return self._pending

    def _full(self, u: Sequence[float]) -> Point:
        """A point of every knob from the optimiser's coordinates of the active ones."""
        vals = list(self._fixed)
        for i, v in zip(self._idx, u):
            vals[i] = self._inv(v)
        return _check_point(vals, self.box)

    def tell(self, point: Point, objective: float, cost: Optional[float] = None) -> None:
        """Record the measured objective (> 0, e.g. seconds per token) of ``point``; with a
        ``cloud_budget``, also its ``cost`` (>= 0, the budget's units)."""
        p = _check_point(point, self.box)
        y = _check_objective(objective)
        if cost is not None:
            if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
                raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
            cost = float(cost)
        elif self.cloud_budget is not None:
            raise ValueError("this tuner has a cloud_budget: tell() needs the point's cost")
        rec = {"round": self.round, "eval": self._evals, "tau_seq": p[0], "tau_tok": p[1], "objective": y}
        if cost is not None:
            rec["cost"] = cost
        if self.converged:
            rec["phase"] = "held"
            self.history.append(rec)
            return
        rec["phase"] = "seed" if (self._x0 is not None and self._evals == 0) else (
            "initial" if self._evals < self.n_initial else "bo")
        from threadpoolctl import threadpool_limits

        told = math.log(y)
        if self.cloud_budget is not None and cost > self.cloud_budget:
            # the explicit penalty: smooth at the budget, steep beyond (see the class docstring)
            told += self.penalty_exp * math.log(cost / self.cloud_budget) if self.cloud_budget > 0 else 50.0
            rec["penalised"] = math.exp(told)
        with threadpool_limits(limits=1, user_api="blas"):
            self._opt.tell([self._fwd(p[i]) for i in self._idx], told)
        self._costs.append(cost)
        self._evals += 1
        self._pending = None
        self.history.append(rec)
        if self._evals >= self.max_evals:
            self._best = self._compute_best()
            self.converged = True

    # ------------------------------------------------------------------ results
    @property
    def evaluations(self) -> int:
        """Evaluations told in the current round."""
        return self._evals

    @property
    def best(self) -> Optional[Tuple[Point, float]]:
        """``((tau_seq, tau_tok), value)``: the evaluated point of lowest GP posterior mean and that
        mean (objective units); the lowest observation before the GP is fitted; None before any.
        With a ``cloud_budget``: among the points measured within budget (the cheapest point when
        none is)."""
        if self._best is not None:
            return self._best
        return self._compute_best()

    @property
    def best_feasible(self) -> Optional[bool]:
        """With a ``cloud_budget``: whether :attr:`best` was measured within it; None without one
        (or before any evaluation)."""
        if self.cloud_budget is None or not self._costs:
            return None
        b = self.best
        return b is not None and any(c is not None and c <= self.cloud_budget and self._same(p, b[0])
                                     for p, c in zip(self._points(), self._costs))

    def _points(self) -> list:
        return [self._full(x) for x in self._opt.Xi]

    @staticmethod
    def _same(p: Point, q: Point) -> bool:
        return all(abs(a - b) <= 1e-12 for a, b in zip(p, q))

    def _compute_best(self) -> Optional[Tuple[Point, float]]:
        xs, ys = self._opt.Xi, self._opt.yi
        if not xs:
            return None
        idx = list(range(len(xs)))
        if self.cloud_budget is not None:
            ok = [i for i in idx if self._costs[i] is not None and self._costs[i] <= self.cloud_budget]
            if not ok:  # nothing within budget: the cheapest point measured
                i = min(idx, key=lambda j: (self._costs[j], ys[j]))
                return (self._full(xs[i]), math.exp(ys[i]))
            idx = ok
        if self._opt.models:
            import numpy as np

            mu = self._opt.models[-1].predict(self._opt.space.transform([xs[i] for i in idx]))
            k = int(np.argmin(mu))
            i, val = idx[k], math.exp(float(mu[k]))
        else:
            i = min(idx, key=ys.__getitem__)
            val = math.exp(ys[i])
        return (self._full(xs[i]), val)

    # ------------------------------------------------------------------ coordinates
    def _fwd(self, tau: float) -> float:
        return -math.log10(1.0 - tau) if self.scale == "nines" else float(tau)

    def _inv(self, u: float) -> float:
        if self.scale == "nines":
            return float(min(max(1.0 - 10.0 ** (-float(u)), 0.0), 1.0))
        return float(u)


class FixedTuner:
    """Holds one point forever (``tuner="fixed"``): the windows are still measured, so a fixed
    run reports the same per-window TPT history as a tuned one."""

    def __init__(self, point: Point, box: Box = ((0.0, 1.0), (0.0, 1.0))) -> None:
        self.box = check_box(box)
        self.point = _check_point(point, self.box)
        self.converged = True
        self.round = 0
        self.history: list[dict] = []

    def ask(self) -> Point:
        return self.point

    def tell(self, point: Point, objective: float, cost: Optional[float] = None) -> None:
        p = _check_point(point, self.box)
        y = _check_objective(objective)
        rec = {"round": self.round, "eval": len(self.history), "tau_seq": p[0], "tau_tok": p[1],
               "objective": y, "phase": "held"}
        if cost is not None:
            rec["cost"] = float(cost)
        self.history.append(rec)

    def restart(self, keep_best_as_seed: bool = True) -> None:
        self.round += 1

    @property
    def evaluations(self) -> int:
        return 0

    @property
    def best(self) -> Optional[Tuple[Point, float]]:
        ys = [h["objective"] for h in self.history]
        return (self.point, sum(ys) / len(ys) if ys else math.nan)
