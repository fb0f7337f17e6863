"""DP token-batch planner: optimal against brute force, C++ == Python reference, validation."""
from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from pipesd.scheduling import (MAX_PLAN_TOKENS, CostModel, plan_batches, plan_batches_expected,
                               plan_batches_expected_reference, plan_batches_reference)


def finish_time(sizes, g, s, c):
    """Simulate a plan: batch (j, i] starts when token i is drafted and the link is free."""
    t, done = 0.0, 0
    for b in sizes:
        done += b
        t = max(t, done * g) + s + b * c
    return t


def compositions(n):
    for cuts in itertools.product([0, 1], repeat=n - 1):
        sizes, run = [], 1
        for cut in cuts:
            if cut:
                sizes.append(run)
                run = 1
            else:
                run += 1
        sizes.append(run)
        yield sizes


@pytest.mark.parametrize("n", range(1, 13))
def test_dp_is_optimal_over_every_composition(n):
    rng = random.Random(n)
    for _ in range(6):
        g, s, c = rng.uniform(0, 0.05), rng.uniform(0, 0.05), rng.uniform(0, 0.01)
        plan = plan_batches(n, g, s, c)
        assert sum(plan.sizes) == n and all(b >= 1 for b in plan.sizes)
        best = min(finish_time(sz, g, s, c) for sz in compositions(n))
        assert plan.finish_s == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert finish_time(plan.sizes, g, s, c) == pytest.approx(plan.finish_s, rel=1e-12, abs=1e-15)


def test_cpp_equals_reference_random():
    rng = random.Random(7)
    for _ in range(60):
        n = rng.randint(0, 512) if rng.random() < 0.3 else rng.randint(0, 64)
        g, s, c = rng.uniform(0, 0.05), rng.uniform(0, 0.05), rng.uniform(0, 0.01)
        a, b = plan_batches(n, g, s, c), plan_batches_reference(n, g, s, c)
        assert a.sizes == b.sizes
        assert a.finish_s == b.finish_s


def expected_cost(cuts, probs, g, s, c):
    """E_L[finish of the batch ending at the trigger L] for a cut set (brute-force definition)."""
    cuts = sorted(cuts)
    total = 0.0
    for L in range(1, len(probs) + 1):
        t, prev = 0.0, 0
        for cut in cuts:
            if cut >= L:
                break
            t = max(t, cut * g) + s + (cut - prev) * c
            prev = cut
        total += probs[L - 1] * (max(t, L * g) + s + (L - prev) * c)
    return total


@pytest.mark.parametrize("N", range(1, 11))
def test_expected_plan_is_optimal_over_every_cut_set(N):
    rng = random.Random(100 + N)
    for _ in range(4):
        w = [rng.random() ** 2 for _ in range(N)]
        probs = [x / sum(w) for x in w]
        g, s, c = rng.uniform(0, 0.05), rng.uniform(0, 0.05), rng.uniform(0, 0.01)
        plan = plan_batches_expected(probs, g, s, c)
        assert sum(plan.sizes) == N
        cuts_plan = list(itertools.accumulate(plan.sizes))[:-1]
        assert expected_cost(cuts_plan, probs, g, s, c) == pytest.approx(plan.finish_s, rel=1e-9)
        best = min(expected_cost([i + 1 for i, b in enumerate(bits) if b], probs, g, s, c)
                   for bits in itertools.product([0, 1], repeat=N - 1))
        assert plan.finish_s == pytest.approx(best, rel=1e-9, abs=1e-15)
        ref = plan_batches_expected_reference(probs, g, s, c)
        assert ref.sizes == plan.sizes and ref.finish_s == plan.finish_s


def test_degenerate_and_known_cases():
    assert plan_batches(0, 0.01, 0.01, 0.01).sizes == []
    assert plan_batches(0, 0.01, 0.01, 0.01).finish_s == 0.0
    # Free messages: send each token as soon as it is drafted.
    assert plan_batches(5, 0.01, 0.0, 0.001).sizes == [1, 1, 1, 1, 1]
    # Expensive messages, instant drafting: one batch.
    assert plan_batches(5, 0.0, 1.0, 0.001).sizes == [5]
    # A certain length L: the expected plan costs what the plain plan for L costs.
    p = [0.0] * 7 + [1.0]
    assert plan_batches_expected(p, 0.01, 0.004, 0.002).finish_s == pytest.approx(
        plan_batches(8, 0.01, 0.004, 0.002).finish_s)


@pytest.mark.parametrize("args,name", [
    ((-1, 0.01, 0.01, 0.01), "n_tokens"),
    ((MAX_PLAN_TOKENS + 1, 0.01, 0.01, 0.01), "n_tokens"),
    ((4, -0.01, 0.01, 0.01), "gen_s"),
    ((4, 0.01, math.nan, 0.01), "startup_s"),
    ((4, 0.01, 0.01, math.inf), "per_token_s"),
])
def test_bad_input_names_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        plan_batches(*args)


@pytest.mark.parametrize("probs", [[0.5, 0.6], [1.5, -0.5], [math.nan, 1.0], [0.2] * 300])
def test_bad_length_probs(probs):
    with pytest.raises(ValueError, match="length_probs"):
        plan_batches_expected(probs, 0.01, 0.01, 0.01)


def test_cost_model_learns_and_ignores_outliers():
    cm = CostModel()
    rng = random.Random(0)
    for i in range(200):
        cm.observe_draft(0.030 + rng.uniform(-0.001, 0.001) + (1.0 if i % 37 == 0 else 0.0))
        n = rng.randint(1, 12)
        t = 0.004 + 0.0015 * n + rng.uniform(-1e-4, 1e-4)
        if i % 29 == 0:
            t += 0.5  # a stalled send
        cm.observe_send(n, t)
    assert cm.gen_s == pytest.approx(0.030, abs=0.002)
    assert cm.startup_s == pytest.approx(0.004, abs=0.001)
    assert cm.per_token_s == pytest.approx(0.0015, abs=0.0003)
    snap = cm.snapshot()
    assert not cm.changed_since(snap)
    for _ in range(200):  # the link slows down 3x: the model follows the drift
        n = rng.randint(1, 12)
        cm.observe_send(n, 0.004 + 0.0045 * n)
    assert cm.per_token_s == pytest.approx(0.0045, rel=0.1)
    assert cm.changed_since(snap, rel=0.3)
    assert sum(cm.plan(20).sizes) == 20
