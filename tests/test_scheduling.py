"""DP token-batch planner: optimal against brute force, C++ == Python reference, validation."""
from __future__ import annotations

import itertools
import math
import random
import threading

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


# ----------------------------------------------------------------------------- more planner checks
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402

from pipesd import _native  # noqa: E402
from pipesd import _scheduling_ref as ref  # noqa: E402
from pipesd.scheduling import (MAX_EXPECTED_TOKENS, BatchPlan, CostSnapshot,  # noqa: E402
                               expected_plan_stats)


def _exact_smallest_j_plan(n, g, s, c):
    """The recurrence in exact rational arithmetic, ties to the smallest j (the documented rule)."""
    g, s, c = Fraction(g), Fraction(s), Fraction(c)
    F, arg = [Fraction(0)] * (n + 1), [0] * (n + 1)
    for i in range(1, n + 1):
        vals = [max(F[j], i * g) + s + (i - j) * c for j in range(i)]
        F[i] = min(vals)
        arg[i] = vals.index(F[i])
    sizes, i = [], n
    while i > 0:
        sizes.append(i - arg[i])
        i = arg[i]
    return sizes[::-1], F[n]


@pytest.mark.parametrize("g,s,c", [(1.0, 2.0, 1.0), (0.5, 0.25, 0.125), (0.0, 1.0, 0.5), (1.0, 0.0, 0.0),
                                   (0.25, 1.0, 0.0), (0.0, 0.0, 0.0), (2.0, 1.0, 1.0)])
def test_ties_go_to_the_smallest_j_exactly(g, s, c):
    # Dyadic costs: every float operation is exact, so exact ties really occur and the
    # rational-arithmetic plan with the documented tie rule must be reproduced bit for bit.
    for n in range(0, 40):
        sizes, fin = _exact_smallest_j_plan(n, g, s, c)
        plan = plan_batches(n, g, s, c)
        assert plan.sizes == sizes
        assert plan.finish_s == float(fin)
        assert plan_batches_reference(n, g, s, c) == plan


def test_cpp_equals_reference_up_to_512():
    rng = random.Random(11)
    ns = [512, 511, 300] + [rng.randint(0, 512) for _ in range(9)]
    for n in ns:
        g, s, c = (10 ** rng.uniform(-5, -1) for _ in range(3))
        a, b = plan_batches(n, g, s, c), plan_batches_reference(n, g, s, c)
        assert a.sizes == b.sizes
        assert a.finish_s == pytest.approx(b.finish_s, rel=1e-9)


def test_finish_is_monotone_in_n_and_plans_are_consistent():
    rng = random.Random(5)
    for _ in range(20):
        g, s, c = (10 ** rng.uniform(-4, -1) for _ in range(3))
        prev = 0.0
        for n in range(0, 80):
            plan = plan_batches(n, g, s, c)
            assert plan.finish_s >= prev * (1 - 1e-12)
            assert ref.plan_finish(plan.sizes, g, s, c) == plan.finish_s
            assert plan.cuts == list(itertools.accumulate(plan.sizes))
            prev = plan.finish_s


def _random_probs(rng, N):
    kind = rng.choice(["dirichlet", "geometric", "point", "sparse", "uniform"])
    if kind == "dirichlet":
        w = [rng.expovariate(1.0) for _ in range(N)]
    elif kind == "geometric":
        q = rng.uniform(0.05, 0.5)
        w = [(1 - q) ** i * q for i in range(N)]
    elif kind == "point":
        w = [0.0] * N
        w[rng.randrange(N)] = 1.0
    elif kind == "sparse":
        w = [rng.random() if rng.random() < 0.3 else 0.0 for _ in range(N)]
        w[-1] += 0.1
    else:
        w = [1.0] * N
    total = sum(w)
    return [x / total for x in w]


@pytest.mark.parametrize("N", [6, 8, 10])
def test_expected_plan_brute_force_random_distributions(N):
    rng = random.Random(1000 + N)
    all_cut_sets = [[i + 1 for i, b in enumerate(bits) if b] for bits in itertools.product([0, 1], repeat=N - 1)]
    for _ in range(10):
        probs = _random_probs(rng, N)
        g, s, c = (10 ** rng.uniform(-4, -1) for _ in range(3))
        plan = plan_batches_expected(probs, g, s, c)
        best = min(ref.expected_finish(cuts, probs, g, s, c) for cuts in all_cut_sets)
        assert plan.finish_s == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert ref.expected_finish(plan.cuts[:-1], probs, g, s, c) == pytest.approx(plan.finish_s, rel=1e-12)


def test_expected_cpp_equals_reference_larger_horizons():
    rng = random.Random(21)
    for N in [1, 2, 17, 33, 64, 64, 96]:
        probs = _random_probs(rng, N)
        g, s, c = (10 ** rng.uniform(-4, -1) for _ in range(3))
        a = plan_batches_expected(probs, g, s, c)
        b = plan_batches_expected_reference(probs, g, s, c)
        assert a.sizes == b.sizes
        assert a.finish_s == pytest.approx(b.finish_s, rel=1e-9)
        assert sum(a.sizes) == N
        stats = expected_plan_stats()
        assert stats["labels"] >= N and stats["max_front"] >= 1


def test_expected_accepts_numpy_and_the_cap():
    probs = np.full(MAX_EXPECTED_TOKENS, 1.0 / MAX_EXPECTED_TOKENS)
    plan = plan_batches_expected(probs, 0.01, 0.003, 0.0005)
    assert sum(plan.sizes) == MAX_EXPECTED_TOKENS
    with pytest.raises(ValueError, match="length_probs"):
        plan_batches_expected(np.full(MAX_EXPECTED_TOKENS + 1, 1.0 / (MAX_EXPECTED_TOKENS + 1)), 0.01, 0.003, 0.0005)


@pytest.mark.parametrize("n", [1.5, "3", None, True, [3]])
def test_n_tokens_must_be_an_int(n):
    with pytest.raises(ValueError, match="n_tokens"):
        plan_batches(n, 0.01, 0.01, 0.01)
    with pytest.raises(ValueError, match="n_tokens"):
        plan_batches_reference(n, 0.01, 0.01, 0.01)


def test_numpy_ints_and_floats_are_accepted():
    a = plan_batches(np.int64(20), np.float32(0.01), np.float64(0.004), 0.0005)
    assert a == plan_batches(20, float(np.float32(0.01)), 0.004, 0.0005)
    assert plan_batches(0, 1, 1, 1) == BatchPlan([], 0.0)
    with pytest.raises(ValueError, match="n_tokens"):
        plan_batches(10**30, 0.01, 0.01, 0.01)


@pytest.mark.parametrize("name,bad", [("gen_s", "x"), ("startup_s", None), ("per_token_s", -1e-9),
                                      ("gen_s", -math.inf), ("startup_s", math.nan)])
def test_every_entry_point_names_the_bad_cost(name, bad):
    kw = {"gen_s": 0.01, "startup_s": 0.01, "per_token_s": 0.01, name: bad}
    for fn, first in ((plan_batches, 5), (plan_batches_reference, 5),
                      (plan_batches_expected, [0.5, 0.5]), (plan_batches_expected_reference, [0.5, 0.5])):
        with pytest.raises(ValueError, match=name):
            fn(first, **kw)


@pytest.mark.parametrize("probs", [[], [[0.5, 0.5]], ["a", "b"], [0.5, 0.4], [-0.1, 1.1], [math.inf, 0.0]])
def test_bad_length_probs_everywhere(probs):
    for fn in (plan_batches_expected, plan_batches_expected_reference):
        with pytest.raises(ValueError, match="length_probs"):
            fn(probs, 0.01, 0.01, 0.01)


# ----------------------------------------------------------------------------- robust fit
def test_robust_fit_cpp_equals_reference():
    r = np.random.default_rng(3)
    for trial in range(40):
        m = int(r.integers(1, 120))
        x = r.integers(0, 40 if trial % 5 else 1, size=m).astype(np.float64)
        y = 0.003 + 0.0004 * x + r.normal(0, 2e-4, size=m)
        y[r.random(m) < 0.25] *= r.uniform(2, 50)
        a = _native.robust_line_fit(x, y, 0.0007)
        b = ref.robust_line_fit(x.tolist(), y.tolist(), 0.0007)
        assert a[2] == b[2]
        assert a[0] == pytest.approx(b[0], rel=1e-9, abs=1e-15)
        assert a[1] == pytest.approx(b[1], rel=1e-9, abs=1e-15)


# ----------------------------------------------------------------------------- cost model
def test_cost_model_priors_until_data():
    cm = CostModel(0.03, 0.004, 0.001)
    assert cm.snapshot() == CostSnapshot(0.03, 0.004, 0.001)
    assert (cm.gen_s, cm.startup_s, cm.per_token_s) == (0.03, 0.004, 0.001)
    assert cm.plan(30) == plan_batches(30, 0.03, 0.004, 0.001)
    probs = [0.1] * 10
    assert cm.plan_expected(probs) == plan_batches_expected(probs, 0.03, 0.004, 0.001)


def test_cost_model_exact_on_noiseless_data():
    cm = CostModel()
    for i in range(300):
        cm.observe_draft(0.012)
        n = 1 + i % 17
        cm.observe_send(n, 0.003 + 0.0007 * n)
    assert cm.gen_s == pytest.approx(0.012, rel=1e-12)
    assert cm.startup_s == pytest.approx(0.003, rel=1e-6)
    assert cm.per_token_s == pytest.approx(0.0007, rel=1e-6)


def test_cost_model_heavy_outliers():
    cm = CostModel()
    rng = random.Random(9)
    for i in range(400):
        cm.observe_draft(0.02 * rng.uniform(0.95, 1.05) * (20 if rng.random() < 0.15 else 1))
        n = rng.randint(1, 40)
        t = (0.002 + 0.0003 * n) * rng.uniform(0.97, 1.03)
        if rng.random() < 0.2:
            t *= rng.uniform(3, 100)  # retransmits, GC pauses
        cm.observe_send(n, t)
    assert cm.gen_s == pytest.approx(0.02, rel=0.05)
    assert cm.startup_s == pytest.approx(0.002, rel=0.1)
    assert cm.per_token_s == pytest.approx(0.0003, rel=0.1)


def test_cost_model_follows_a_step_change_quickly():
    cm = CostModel(send_window=200, drift_run=12)
    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(1, 20)
        cm.observe_send(n, 0.002 + 0.0005 * n)
    assert cm.per_token_s == pytest.approx(0.0005, rel=1e-3)
    for _ in range(30):  # bandwidth drops 4x, startup doubles
        n = rng.randint(1, 20)
        cm.observe_send(n, 0.004 + 0.002 * n)
    assert cm.drift_resets >= 1
    assert cm.startup_s == pytest.approx(0.004, rel=0.05)
    assert cm.per_token_s == pytest.approx(0.002, rel=0.05)


def test_cost_model_single_batch_size_and_empty_messages():
    cm = CostModel(0.01, 0.001, 0.0005)
    for _ in range(20):
        cm.observe_send(8, 0.010)
    assert cm.per_token_s == 0.0005  # not identifiable from one size: the prior stays
    assert cm.startup_s == pytest.approx(0.010 - 8 * 0.0005)
    cm2 = CostModel(0.01, 0.001, 0.0005)
    for i in range(40):
        cm2.observe_send(0 if i % 2 else 10, 0.002 if i % 2 else 0.012)  # empty verify-only messages
    assert cm2.startup_s == pytest.approx(0.002, rel=1e-6)
    assert cm2.per_token_s == pytest.approx(0.001, rel=1e-6)


def test_cost_model_ignores_invalid_observations():
    cm = CostModel(0.01, 0.001, 0.0005)
    before = cm.snapshot()
    for bad in (math.nan, -1.0, math.inf):
        cm.observe_draft(bad)
        cm.observe_send(4, bad)
    cm.observe_send(-3, 0.01)
    assert cm.snapshot() == before
    assert cm.rejected == 7 and cm.n_sends == 0 and cm.n_drafts == 0


def test_changed_since():
    cm = CostModel(0.01, 0.002, 0.0005)
    snap = cm.snapshot()
    assert cm.changed_since(None)
    assert not cm.changed_since(snap)
    assert not cm.changed_since(dict(snap))  # a plain mapping works too
    assert set(snap) == {"gen_s", "startup_s", "per_token_s"} and "gen_s" in snap  # dict semantics
    assert snap.gen_s == snap["gen_s"] == 0.01 and snap.astuple() == (0.01, 0.002, 0.0005)
    for _ in range(8):
        cm.observe_draft(0.012)  # +20%: below rel=0.3
    assert not cm.changed_since(snap, rel=0.3)
    assert cm.changed_since(snap, rel=0.1)
    # Tiny absolute moves never count, even from zero.
    z = CostModel(0.01, 0.0, 0.0005)
    zs = z.snapshot()
    for _ in range(20):
        z.observe_send(1, 0.0005 + 1e-8)
    assert not z.changed_since(zs)


def test_snapshot_feeds_the_online_tuner_contract():
    # pipesd.tuning.online reads snapshots as {gen_s, startup_s, per_token_s} dicts.
    snap = CostModel(0.02, 0.003, 0.0004).snapshot()
    got = {k: float(snap[k]) for k in ("gen_s", "startup_s", "per_token_s") if k in snap}
    assert got == {"gen_s": 0.02, "startup_s": 0.003, "per_token_s": 0.0004}


def test_cost_model_constructor_validation():
    with pytest.raises(ValueError, match="gen_s"):
        CostModel(-1.0)
    with pytest.raises(ValueError, match="send_window"):
        CostModel(send_window=1)
    with pytest.raises(ValueError, match="drift_run"):
        CostModel(send_window=10, drift_run=20)


def test_cost_model_one_writer_per_kind_and_readers():
    cm = CostModel()
    stop = threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                snap = cm.snapshot()
                assert all(math.isfinite(v) and v >= 0 for v in snap.values())
                assert sum(cm.plan(16).sizes) == 16
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def draft_writer():
        for i in range(5000):
            cm.observe_draft(0.01 + (i % 7) * 1e-4)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writer = threading.Thread(target=draft_writer)
    for t in readers + [writer]:
        t.start()
    rng = random.Random(4)
    for _ in range(3000):  # this thread is the send-side writer
        n = rng.randint(1, 30)
        cm.observe_send(n, 0.002 + 0.0004 * n + rng.uniform(0, 1e-4))
    writer.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert cm.n_sends == 3000 and cm.n_drafts == 5000


@pytest.mark.parametrize("g,s,c", [(0.0, 0.004, 0.001), (0.01, 0.0, 0.001), (0.01, 0.004, 0.0), (0.0, 0.0, 0.0),
                                   (0.002, 0.004, 0.002), (0.001, 0.05, 0.004), (0.02, 0.001, 1e-5)])
def test_expected_plan_in_edge_cost_regimes(g, s, c):
    # The C++ DP's pruning bound splits on g > c vs g <= c and divides by g - c: cover the
    # edges (zero costs, g == c, link-bound, compute-bound) against brute force and reference.
    rng = random.Random(hash((g, s, c)) & 0xFFFF)
    N = 8
    cut_sets = [[i + 1 for i, b in enumerate(bits) if b] for bits in itertools.product([0, 1], repeat=N - 1)]
    for _ in range(6):
        probs = _random_probs(rng, N)
        plan = plan_batches_expected(probs, g, s, c)
        best = min(ref.expected_finish(cuts, probs, g, s, c) for cuts in cut_sets)
        assert plan.finish_s == pytest.approx(best, rel=1e-12, abs=1e-15)
    for N in (30, 60):
        probs = _random_probs(rng, N)
        a, b = plan_batches_expected(probs, g, s, c), plan_batches_expected_reference(probs, g, s, c)
        assert a.sizes == b.sizes and a.finish_s == pytest.approx(b.finish_s, rel=1e-9, abs=1e-300)
