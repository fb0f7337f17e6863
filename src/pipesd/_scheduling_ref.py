"""Pure-Python reference of the native planner and cost-model fit (for tests and readers).

Not used on the hot path. Every function performs the same floating-point operations in the
same order as ``csrc/scheduler.cpp``, so results agree bit for bit (the tests allow 1e-9
relative on times and demand identical batch sizes). Inputs are assumed valid; the checked
entry points are :func:`pipesd.scheduling.plan_batches_reference` and friends.

Also here: the plan *evaluators* :func:`plan_finish` and :func:`expected_finish`, which
define what a plan costs independently of any DP (the brute-force tests use them).
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["plan_batches", "plan_batches_expected", "robust_line_fit", "plan_finish", "expected_finish",
           "cuts_of"]


# ----------------------------------------------------------------------------- evaluators
def plan_finish(sizes: Sequence[int], g: float, s: float, c: float) -> float:
    """Time the cloud holds every token when batches of ``sizes`` are sent in order.

    Batch ``(j, i]`` starts when token ``i`` is drafted (``i*g``) and the previous batch has
    left (``T``), and takes ``s + (i-j)*c``.
    """
    t, j = 0.0, 0
    for size in sizes:
        i = j + size
        t = max(t, i * g) + s + (i - j) * c
        j = i
    return t


def expected_finish(cuts: Sequence[int], probs: Sequence[float], g: float, s: float, c: float) -> float:
    """Expected time the cloud holds the whole triggered run, for planned cut points ``cuts``.

    ``probs[L-1]`` is P(trigger fires at token L). For trigger ``L`` the planned batches
    ending below ``L`` go as planned and ``(j, L]`` (``j`` = last cut below ``L``) is flushed
    at once; the cost is when that last batch has left.
    """
    cut_set = sorted(set(int(x) for x in cuts))
    total = 0.0
    for L in range(1, len(probs) + 1):
        t, j = 0.0, 0
        for cut in cut_set:
            if cut >= L:
                break
            t = max(t, cut * g) + s + (cut - j) * c
            j = cut
        total += probs[L - 1] * (max(t, L * g) + s + (L - j) * c)
    return total


def cuts_of(sizes: Sequence[int]) -> list[int]:
    """Batch ends (cumulative sizes), e.g. ``[2, 3] -> [2, 5]``."""
    out, total = [], 0
    for size in sizes:
        total += size
        out.append(total)
    return out


# ----------------------------------------------------------------------------- planners
def plan_batches(n: int, g: float, s: float, c: float) -> tuple[list[int], float]:
    """``F(i) = min_j max(F(j), i*g) + s + (i-j)*c``; ties to the smallest ``j``."""
    if n == 0:
        return [], 0.0
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
    return sizes[::-1], F[n]


def plan_batches_expected(probs: Sequence[float], g: float, s: float, c: float) -> tuple[list[int], float]:
    """Exact expected-cost plan by a Pareto DP over the last cut (see pipesd.scheduling).

    Label at cut ``j``: ``(acc, t, prev_j, prev_k)``, ``acc`` = sum of ``P(L)*fin(L)`` for
    ``L <= j``, ``t = max(T(j), (j+1)*g)``. A new label is dropped when some label at the
    same cut has ``acc' <= acc and t' <= t``; otherwise it evicts the labels it dominates.
    Fronts are visited in ``t`` order (as the C++ staircase keeps them). A prefix whose
    ``acc`` reaches the best complete plan so far is pruned (it cannot win strictly). The C++
    version also skips prefixes whose ``acc`` plus a lower bound on the rest exceeds the best
    plan by a margin; that changes its work, never its result (the tests compare the two).
    """
    n = len(probs)
    front: list[list[tuple[float, float, int, int]]] = [[] for _ in range(n)]
    front[0].append((0.0, g, -1, -1))
    best, best_j, best_k = math.inf, -1, -1
    for j in range(n):
        front[j].sort(key=lambda lab: lab[1])  # final from here on: back-pointers index it
        for k, (acc, t, _, _) in enumerate(front[j]):
            for i in range(j + 1, n + 1):
                fin = max(t, i * g) + s + (i - j) * c
                acc += probs[i - 1] * fin
                if i == n:
                    if acc < best:
                        best, best_j, best_k = acc, j, k
                    break
                if acc >= best:  # cannot beat the best complete plan strictly: prune
                    break
                te = max(fin, (i + 1) * g)
                f = front[i]
                if any(y[0] <= acc and y[1] <= te for y in f):
                    continue
                f[:] = [y for y in f if not (acc <= y[0] and te <= y[1])]
                f.append((acc, te, j, k))
    cuts = [n]
    j, k = best_j, best_k
    while j > 0:
        cuts.append(j)
        _, _, j, k = front[j][k]
    cuts.append(0)
    cuts.reverse()
    return [cuts[i] - cuts[i - 1] for i in range(1, len(cuts))], best


# ----------------------------------------------------------------------------- line fit
MAX_FIT_ITERS = 50


def _median(v: Sequence[float]) -> float:
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def _wls(x, y, w):
    sw = swx = swy = 0.0
    for xi, yi, wi in zip(x, y, w):
        sw += wi
        swx += wi * xi
        swy += wi * yi
    if not sw > 0.0:
        return None
    xbar = swx / sw
    ybar = swy / sw
    sxx = sxy = 0.0
    for xi, yi, wi in zip(x, y, w):
        dx = xi - xbar
        sxx += wi * dx * dx
        sxy += wi * dx * (yi - ybar)
    if not sxx > 0.0:
        return None
    b = sxy / sxx
    return ybar - b * xbar, b


def robust_line_fit(x: Sequence[float], y: Sequence[float], prior_slope: float) -> tuple[float, float, int]:
    """Robust ``y = a + b*x``: median-split start, Huber IRLS (k=1.345, MAD scale
    re-estimated each step), then up to 10 Tukey-biweight steps (k=4.685, scale fixed).
    With one distinct ``x``: ``b = prior_slope``, ``a = median(y - b*x)``."""
    m = len(x)
    if m == 0:
        raise ValueError("robust_line_fit needs at least one point")
    x, y = [float(v) for v in x], [float(v) for v in y]
    xmin, xmax = min(x), max(x)
    xabs = max(abs(v) for v in x)
    yabs = max(abs(v) for v in y)
    if xmin == xmax:
        return _median([yi - prior_slope * xi for xi, yi in zip(x, y)]), prior_slope, 0
    xm = _median(x)
    upper_open = xmax > xm
    right = [(xi > xm) if upper_open else (xi >= xm) for xi in x]
    xl = [xi for xi, r in zip(x, right) if not r]
    yl = [yi for yi, r in zip(y, right) if not r]
    xr = [xi for xi, r in zip(x, right) if r]
    yr = [yi for yi, r in zip(y, right) if r]
    b = (_median(yr) - _median(yl)) / (_median(xr) - _median(xl))
    a = _median([yi - b * xi for xi, yi in zip(x, y)])
    floor = 1e-9 * yabs + 1e-15

    def scale_of(a0, b0):
        r = [yi - (a0 + b0 * xi) for xi, yi in zip(x, y)]
        sc = 1.4826 * _median([abs(v) for v in r])
        return r, (floor if sc < floor else sc)

    def converged(a0, b0, a1, b1):
        return abs(a1 - a0) + abs(b1 - b0) * xabs <= 1e-10 * (abs(a1) + abs(b1) * xabs) + 1e-300

    def irls(a, b, it, weights, steps):
        """Up to ``steps`` weighted fits from ``(a, b)`` (and none past ``MAX_FIT_ITERS`` in all),
        ``weights(a, b)`` each; stops at a degenerate fit or on convergence."""
        for _ in range(steps):
            if it >= MAX_FIT_ITERS:
                break
            it += 1
            fit = _wls(x, y, weights(a, b))
            if fit is None:
                break
            done = converged(a, b, fit[0], fit[1])
            a, b = fit
            if done:
                break
        return a, b, it

    def huber(a0, b0):
        r, sc = scale_of(a0, b0)
        kc = 1.345 * sc
        return [1.0 if abs(ri) <= kc else kc / abs(ri) for ri in r]

    a, b, it = irls(a, b, 0, huber, MAX_FIT_ITERS)
    _, sc = scale_of(a, b)
    kb = 4.685 * sc

    def biweight(a0, b0):
        w = []
        for xi, yi in zip(x, y):
            u = (yi - (a0 + b0 * xi)) / kb
            w.append((1.0 - u * u) * (1.0 - u * u) if abs(u) < 1.0 else 0.0)
        return w

    return irls(a, b, it, biweight, 10)
