"""pipesd.tuning: the GP tuner finds good thresholds in <= 16 evaluations, is deterministic, holds
its best point, re-tunes on drift; the online wrapper never blocks its caller and attributes
windows of tokens to the thresholds that were in force."""
from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest

from pipesd.tuning import (DEFAULT_BOX, BayesTuner, FixedTuner, OnlineTuner, SimConfig, grid_search,
                           make_online_tuner, simulate_tpt)

# ----------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ScriptedTuner:
    """A TunerCore fake: proposes scripted points, records tells, optionally blocks in tell()."""

    def __init__(self, points, converge_after: int = 10**9, gate: threading.Event | None = None, fail: bool = False):
        self.points = list(points)
        self.converge_after = converge_after
        self.gate = gate
        self.fail = fail
        self.entered = threading.Event()
        self.tells: list = []
        self.tell_threads: list = []
        self.history: list = []
        self.converged = False
        self.round = 0
        self.restarts = 0

    def ask(self):
        return self.points[min(len(self.tells), len(self.points) - 1)]

    def tell(self, point, objective):
        self.tell_threads.append(threading.current_thread())
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test never released the tuner"
        if self.fail:
            raise RuntimeError("planted failure")
        self.tells.append((tuple(point), objective))
        self.history.append({"round": self.round, "phase": "bo"})
        if len(self.tells) >= self.converge_after:
            self.converged = True

    def restart(self, keep_best_as_seed=True):
        self.restarts += 1
        self.round += 1
        self.converged = False
        self.converge_after = len(self.tells) + 2

    @property
    def best(self):
        return (self.points[0], 1.0) if self.tells else None


def bowl(x0=0.6, y0=0.9, k=5.0):
    """A smooth bowl over the unit square with minimum 1 at (x0, y0); the region within 5% of the
    minimum is ~3% of the square, so 16 random probes would often miss it."""
    return lambda a, b: 1.0 + k * ((a - x0) ** 2 + (b - y0) ** 2)


def run_tuner(tuner: BayesTuner, objective, noise: float = 0.0, noise_seed: int = 0) -> int:
    rng = np.random.default_rng(noise_seed)
    n = 0
    while not tuner.converged:
        p = tuner.ask()
        y = objective(*p) * (math.exp(rng.normal(0.0, noise)) if noise else 1.0)
        tuner.tell(p, y)
        n += 1
    return n


def nines_grid(objective, box, n: int = 15):
    """Grid in the tuner's own coordinates (-log10(1 - tau)), to complement a linear grid."""
    us = [np.linspace(-math.log10(1 - lo), -math.log10(1 - hi), n) for lo, hi in box]
    best = min(((1 - 10 ** -a, 1 - 10 ** -b) for a in us[0] for b in us[1]), key=lambda p: objective(*p))
    return best, objective(*best)


# ----------------------------------------------------------------------------- BayesTuner


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bayes_finds_bowl_minimum_within_5pct_of_grid(seed):
    f = bowl()
    box = ((0.0, 0.95), (0.0, 0.99))
    _, grid_best, _ = grid_search(f, box=box, n=41)
    tuner = BayesTuner(box=box, max_evals=16, seed=seed)
    n = run_tuner(tuner, f, noise=0.02, noise_seed=100 + seed)
    assert n == 16 and tuner.converged
    point, _ = tuner.best
    assert f(*point) <= 1.05 * grid_best, (seed, point, f(*point), grid_best)


def test_bayes_linear_scale_also_finds_bowl():
    f = bowl(0.4, 0.5)
    box = ((0.0, 0.9), (0.0, 0.95))
    _, grid_best, _ = grid_search(f, box=box, n=41)
    tuner = BayesTuner(box=box, seed=0, scale="linear")
    run_tuner(tuner, f, noise=0.02)
    assert f(*tuner.best[0]) <= 1.05 * grid_best


def test_bayes_deterministic_for_a_seed_and_seed_matters():
    f = bowl()

    def history(seed):
        t = BayesTuner(seed=seed, max_evals=7, n_initial=4)
        run_tuner(t, f, noise=0.05, noise_seed=7)
        return [(h["tau_seq"], h["tau_tok"], h["objective"]) for h in t.history], t.best

    h0, b0 = history(0)
    h0b, b0b = history(0)
    h1, _ = history(1)
    assert h0 == h0b and b0 == b0b
    assert h0 != h1


def test_bayes_holds_best_point_after_convergence():
    f = bowl()
    t = BayesTuner(seed=0, max_evals=10, n_initial=4)
    run_tuner(t, f)
    best = t.best
    assert t.converged and t.evaluations == 10
    for _ in range(5):
        p = t.ask()
        assert p == best[0]
        t.tell(p, 1e6)  # a terrible window at the held point changes nothing
    assert t.best == best and t.ask() == best[0]
    assert [h["phase"] for h in t.history[-5:]] == ["held"] * 5
    assert t.evaluations == 10


def test_bayes_best_is_the_lowest_posterior_mean_among_evaluated_points():
    t = BayesTuner(box=((0.0, 0.9), (0.0, 0.9)), seed=0, max_evals=16, n_initial=5, scale="linear")
    f = bowl(0.3, 0.3, k=2.0)
    run_tuner(t, f, noise=0.15, noise_seed=0)
    point, value = t.best
    evaluated = [(h["tau_seq"], h["tau_tok"]) for h in t.history]
    assert point in evaluated
    model = t._opt.models[-1]  # the GP of log(objective) fitted on all 16 evaluations
    mu = model.predict(t._opt.space.transform(t._opt.Xi))
    assert value == pytest.approx(math.exp(mu.min()))
    assert value != pytest.approx(min(h["objective"] for h in t.history))  # not the luckiest window


def test_bayes_seed_point_first_and_restart_reseeds_with_best():
    f = bowl()
    t = BayesTuner(seed=3, max_evals=6, n_initial=3, x0=(0.35, 0.5))
    assert t.ask() == (0.35, 0.5)
    run_tuner(t, f)
    assert t.history[0]["phase"] == "seed"
    best = t.best
    t.restart()
    assert not t.converged and t.round == 1 and t.evaluations == 0
    assert t.ask() == best[0]  # re-measure the old best first under the new conditions
    run_tuner(t, f)
    assert t.converged and len([h for h in t.history if h["round"] == 1]) == 6
    t.restart(keep_best_as_seed=False)
    p = t.ask()
    t.tell(p, f(*p))
    assert t.history[-1]["phase"] == "initial"  # a fresh design point, no seed


def test_bayes_ask_idempotent_until_tell():
    t = BayesTuner(seed=0)
    assert t.ask() == t.ask()


@pytest.mark.parametrize("kwargs", [
    dict(box=((0.0, 0.9),)), dict(box=((0.5, 0.4), (0.0, 0.9))), dict(box=((0.0, 1.2), (0.0, 0.9))),
    dict(box=((0.0, 1.0), (0.0, 0.9))),  # nines scale cannot reach 1
    dict(max_evals=0), dict(n_initial=0), dict(max_evals=4, n_initial=5), dict(seed=-1), dict(scale="log"),
    dict(x0=(0.5, 2.0)),
])
def test_bayes_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        BayesTuner(**kwargs)


@pytest.mark.parametrize("objective", [0.0, -1.0, math.nan, math.inf, True])
def test_bayes_rejects_bad_objective(objective):
    t = BayesTuner(seed=0)
    with pytest.raises(ValueError):
        t.tell(t.ask(), objective)


def test_bayes_rejects_point_outside_box():
    t = BayesTuner(seed=0)
    with pytest.raises(ValueError):
        t.tell((0.999, 0.1), 1.0)


def test_fixed_tuner_never_moves():
    t = FixedTuner((0.3, 0.6))
    assert t.converged and t.ask() == (0.3, 0.6)
    t.tell((0.3, 0.6), 0.1)
    t.restart()
    assert t.ask() == (0.3, 0.6) and t.best[0] == (0.3, 0.6)


# ----------------------------------------------------------------------------- simulator


def test_simulator_is_deterministic_and_sane():
    a = simulate_tpt(0.35, 0.5)
    assert a == simulate_tpt(0.35, 0.5)
    assert a.tpt_s > 0 and 0 < a.acceptance <= 1 and a.mean_draft_len >= 1
    assert a.wasted_per_token <= a.verified_per_token
    assert simulate_tpt(0.35, 0.5, seed=1) != a
    short = simulate_tpt(0.35, 0.5, max_tokens=64)
    assert 64 <= short.tokens < 64 + SimConfig().max_draft + 1
    with pytest.raises(ValueError):
        simulate_tpt(1.5, 0.5)
    with pytest.raises(ValueError):
        simulate_tpt(0.5, 0.5, gen_s=-1.0)
    with pytest.raises(ValueError):
        SimConfig(hard_frac=2.0)


def test_simulator_when_pipelining_helps():
    def gain(**kw):  # serial TPT / pipelined TPT at the same thresholds
        return simulate_tpt(0.9, 0.95, pipeline=False, **kw).tpt_s / simulate_tpt(0.9, 0.95, **kw).tpt_s

    base = gain()
    assert base > 1.0
    assert gain(delay_s=0.05) > base  # slower round trip: more latency to hide
    assert gain(gen_s=0.1, per_token_s=0.116) > base  # slow edge + full-q wire (the paper's regime)
    # A slow edge on a cheap, short link: the round trip is shorter than a draft step. Serial SD
    # has the bonus token from the cloud before a pipelined edge has finished drafting that
    # position (and the bonus is always right, the draft there not): serial wins.
    assert gain(gen_s=0.1) < 1.0
    # the trigger matters: verifying on every token is bad serially, fine pipelined
    assert simulate_tpt(0.0, 0.995, pipeline=False).tpt_s > simulate_tpt(0.0, 0.995).tpt_s


def test_simulator_shows_the_tpt_energy_tradeoff():
    often, rare = simulate_tpt(0.0, 0.995), simulate_tpt(0.0, 0.5)
    assert often.tpt_s < rare.tpt_s  # pipelined: verifying often is fast ...
    assert often.cloud_busy_per_token_s > rare.cloud_busy_per_token_s  # ... and costs cloud time


SCENARIOS = {
    # name: (config, energy weight s/J at 400 W busy power)
    "pipelined-tpt": (SimConfig(segments=1000), 0.0),
    "pipelined-tpt+energy": (SimConfig(segments=1000), 2e-3),
    "serial-slow-edge": (SimConfig(segments=1000, pipeline=False, gen_s=0.08), 0.0),
}


def _objective(cfg, w):
    def f(a, b, **kw):
        r = simulate_tpt(a, b, cfg, **kw)
        return r.tpt_s + w * 400.0 * r.cloud_busy_per_token_s
    return f


@pytest.fixture(scope="module")
def grid_refs():
    refs = {}
    for name, (cfg, w) in SCENARIOS.items():
        f = _objective(cfg, w)
        refs[name] = min(grid_search(f, box=DEFAULT_BOX, n=13)[1], nines_grid(f, DEFAULT_BOX, 13)[1])
    return refs


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("seed", [0, 1])
def test_tuner_reaches_5pct_of_grid_search_on_simulator(name, seed, grid_refs):
    cfg, w = SCENARIOS[name]
    f = _objective(cfg, w)
    t = BayesTuner(seed=seed, max_evals=16)
    assert run_tuner(t, f) <= 16
    assert f(*t.best[0]) <= 1.05 * grid_refs[name], (name, seed, t.best)


def test_tuner_with_noisy_64_token_windows(grid_refs):
    # Each evaluation is one simulated 64-token window with fresh randomness: as noisy as a
    # measured window (CV ~10%). The held point is judged on the noise-free landscape. With that
    # much noise 16 evaluations reach 5% in most runs, not all: we require 4 of 5 seeds, and no
    # run worse than 15%.
    cfg, w = SCENARIOS["pipelined-tpt+energy"]
    f = _objective(cfg, w)
    ratios = []
    for seed in range(5):
        t = BayesTuner(seed=seed, max_evals=16)
        k = 0
        while not t.converged:
            p = t.ask()
            t.tell(p, f(*p, seed=1000 * (seed + 1) + k, max_tokens=64, segments=400))
            k += 1
        assert k == 16
        ratios.append(f(*t.best[0]) / grid_refs["pipelined-tpt+energy"])
    assert sum(r <= 1.05 for r in ratios) >= 4 and max(ratios) <= 1.15, ratios


# ----------------------------------------------------------------------------- OnlineTuner


def test_online_observe_never_blocks_on_a_slow_tuner():
    gate = threading.Event()
    core = ScriptedTuner([(0.1, 0.2), (0.3, 0.4)], gate=gate)
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=4, clock=clock)
    try:
        ot.begin_run()
        clock.t = 1.0
        ot.observe(4)  # completes a window: handed to the worker, which blocks in tell()
        assert core.entered.wait(10)
        done = threading.Event()
        seen = []

        def hot_path():  # keeps committing and reading thresholds while the fit "runs"
            for i in range(100):
                clock.t = 2.0 + i
                ot.observe(1, energy_j=0.5)
                seen.append(ot.current())
            done.set()

        threading.Thread(target=hot_path, daemon=True).start()
        assert done.wait(10), "observe()/current() waited for the tuner"
        assert not gate.is_set() and core.tells == []  # the fit was still in progress throughout
        assert set(seen) == {(0.1, 0.2)}
        assert threading.current_thread() not in core.tell_threads
        v0 = ot.version
        gate.set()
        assert ot.sync()
        assert ot.current() == (0.3, 0.4) and ot.published() == (v0 + 1, (0.3, 0.4))
        assert core.tell_threads[0].name == "pipesd-tuner"
        assert ot.stats()["unattributed_tokens"] == 100  # committed between hand-off and swap
    finally:
        gate.set()
        ot.close()


def test_online_windows_attribute_tokens_to_the_point_in_force():
    gate = threading.Event()
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)], gate=gate)
    clock = FakeClock(0.0)
    ot = OnlineTuner(core, window_tokens=10, clock=clock)
    try:
        ot.begin_run()
        clock.t = 1.0
        ot.observe(4)
        clock.t = 2.0
        ot.observe(6)  # window of A: 10 tokens in 2 s
        assert core.entered.wait(10)
        clock.t = 3.0
        ot.observe(5)  # after the hand-off, before the swap: nobody's
        clock.t = 4.0
        gate.set()  # the swap happens at t = 4
        assert ot.sync()
        assert ot.current() == (0.2, 0.2)
        clock.t = 5.0
        ot.observe(4)
        clock.t = 9.0
        ot.observe(6)  # window of B: from the swap (t = 4) to t = 9, 10 tokens
        assert ot.sync()
        assert core.tells == [((0.1, 0.1), pytest.approx(0.2)), ((0.2, 0.2), pytest.approx(0.5))]
        st = ot.stats()
        assert st["unattributed_tokens"] == 5
        assert [h["tokens"] for h in st["history"]] == [10, 10]
        assert st["history"][1]["wall_s"] == pytest.approx(5.0)
        assert st["tau_seq"] == 0.3 and st["evaluations"] == 2
    finally:
        gate.set()
        ot.close()


def test_online_window_straddling_a_run_gap_and_settling():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)])
    clock = FakeClock(0.0)
    ot = OnlineTuner(core, window_tokens=10, clock=clock, settle_tokens=3, energy_weight=0.01)
    try:
        ot.begin_run()
        clock.t = 1.0
        ot.observe(2)  # settling: after the (initial) swap, tokens drafted under older thresholds
        clock.t = 2.0
        ot.observe(2)  # settling ends with this commit: the window clock starts at t = 2
        clock.t = 3.0
        ot.observe(4, energy_j=8.0)
        ot.end_run()
        clock.t = 100.0  # idle between generations: not part of the window
        ot.begin_run()
        clock.t = 102.0
        ot.observe(6, energy_j=2.0)  # 10 tokens in (3 - 2) + (102 - 100) = 3 s, 10 J
        assert ot.sync()
        assert core.tells == [((0.1, 0.1), pytest.approx(0.3 + 0.01 * 1.0))]
        h = ot.stats()["history"][0]
        assert h["tpt_s"] == pytest.approx(0.3) and h["energy_j"] == pytest.approx(10.0)
        # The swap happened at t = 102; a generation that starts later starts the next window.
        ot.end_run()
        clock.t = 200.0
        ot.begin_run()
        clock.t = 201.0
        ot.observe(3)  # settle
        clock.t = 203.0
        ot.observe(10)
        assert ot.sync()
        assert core.tells[1] == ((0.2, 0.2), pytest.approx(0.2 + 0.0))
    finally:
        ot.close()


def test_online_without_begin_run_starts_the_clock_at_first_commit():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2)])
    clock = FakeClock(5.0)
    ot = OnlineTuner(core, window_tokens=4, clock=clock)
    try:
        ot.observe(3)  # no start time known: not attributed
        clock.t = 7.0
        ot.observe(4)
        assert ot.sync()
        assert core.tells == [((0.1, 0.1), pytest.approx(0.5))]
        assert ot.stats()["unattributed_tokens"] == 3
        with pytest.raises(ValueError):
            ot.observe(-1)
    finally:
        ot.close()


def test_online_holds_after_convergence_and_records_held_windows():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2), (0.5, 0.5)], converge_after=2)
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=2, clock=clock)
    try:
        ot.begin_run()
        for i in range(8):
            clock.t += 1.0
            ot.observe(2)
            assert ot.sync()
        st = ot.stats()
        assert st["converged"] and st["evaluations"] == 2 and len(core.tells) == 2
        assert ot.current() == (0.5, 0.5)
        assert len(st["held"]) >= 5 and all(h["tau_seq"] == 0.5 for h in st["held"])
    finally:
        ot.close()


def test_online_retunes_when_costs_drift_by_2x():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2), (0.7, 0.7)], converge_after=2)
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=2, clock=clock, retune_rel=0.3)
    costs = {"gen_s": 0.03, "startup_s": 0.004, "per_token_s": 0.0005}
    try:
        ot.begin_run()
        ot.observe_costs({**costs, "gen_s": 0.5})  # while tuning: ignored (no reference yet)
        for _ in range(2):
            ot.observe_costs(costs)
            clock.t += 1.0
            ot.observe(2)
            assert ot.sync()
        assert ot.stats()["converged"] and core.restarts == 0
        ot.observe_costs({**costs, "gen_s": 0.033})  # +10%: noise, not drift
        assert ot.sync() and core.restarts == 0
        ot.observe_costs({**costs, "per_token_s": 0.0005 * 2})  # the link's per-token time doubled
        assert ot.sync()
        assert core.restarts == 1
        st = ot.stats()
        assert not st["converged"] and len(st["retunes"]) == 1
        assert "per_token_s" in st["retunes"][0]["moved"]
        ot.observe_costs({**costs, "gen_s": 0.06})  # re-tuning: no second restart
        assert ot.sync() and core.restarts == 1
    finally:
        ot.close()


def test_online_drift_reference_is_the_snapshot_at_convergence():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2)], converge_after=1)
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=1, clock=clock)
    try:
        ot.begin_run()
        ot.observe_costs({"gen_s": 0.02, "startup_s": 0.002, "per_token_s": 0.001})
        ot.observe_costs({"gen_s": 0.04, "startup_s": 0.002, "per_token_s": 0.001})  # last before convergence
        clock.t = 1.0
        ot.observe(1)
        assert ot.sync() and ot.stats()["converged"]
        ot.observe_costs({"gen_s": 0.045, "startup_s": 0.002, "per_token_s": 0.001})  # +12% of 0.04
        assert ot.sync() and core.restarts == 0
        ot.observe_costs({"gen_s": 0.08, "startup_s": 0.002, "per_token_s": 0.001})  # 2x
        assert ot.sync() and core.restarts == 1
        # tiny absolute moves never count, however large relative to a near-zero cost
        core2 = ScriptedTuner([(0.1, 0.1)], converge_after=0)
        core2.converged = True
        ot2 = OnlineTuner(core2, clock=clock)
        ot2.observe_costs({"gen_s": 0.02, "startup_s": 0.002, "per_token_s": 1e-6})
        ot2.observe_costs({"gen_s": 0.02, "startup_s": 0.002, "per_token_s": 5e-6})
        assert ot2.sync() and core2.restarts == 0
        ot2.close()
    finally:
        ot.close()


def test_online_worker_error_keeps_point_and_reports():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2)], fail=True)
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=2, clock=clock)
    try:
        ot.begin_run()
        clock.t = 1.0
        ot.observe(2)
        assert ot.sync()
        st = ot.stats()
        assert ot.current() == (0.1, 0.1) and st["errors"] and "planted failure" in st["errors"][0]
        v = ot.version
        clock.t = 2.0
        ot.observe(2)  # a new window started at the re-publication: measured and handed again
        assert ot.sync() and ot.version == v + 1
    finally:
        ot.close()


def test_online_drives_bayes_to_a_good_point_on_the_simulator(grid_refs):
    """End to end with the real GP core: windows timed by the simulator at the thresholds in force."""
    cfg, w = SCENARIOS["pipelined-tpt"]
    f = _objective(cfg, w)
    clock = FakeClock()
    ot = make_online_tuner("bayes", (0.35, 0.5), seed=0, window_tokens=64, clock=clock)
    try:
        ot.begin_run()
        k = 0
        while not ot.stats()["converged"]:
            r = simulate_tpt(*ot.current(), cfg, seed=500 + k, max_tokens=64, segments=200)
            clock.t += r.tpt_s * r.tokens
            ot.observe(r.tokens)
            assert ot.sync()
            k += 1
            assert k <= 16
        st = ot.stats()
        assert st["evaluations"] == 16 and st["history"][0]["tau_seq"] == 0.35  # seeded with the config
        assert f(*ot.current()) <= 1.05 * grid_refs["pipelined-tpt"]
        assert (st["best"]["tau_seq"], st["best"]["tau_tok"]) == ot.current()
    finally:
        ot.close()


def test_make_online_tuner_kinds():
    assert make_online_tuner(None, (0.3, 0.5)) is None
    fixed = make_online_tuner("fixed", (0.3, 0.5), window_tokens=2, clock=FakeClock())
    try:
        assert fixed.current() == (0.3, 0.5) and fixed.stats()["converged"] and fixed.stats()["tuner"] == "fixed"
    finally:
        fixed.close()
    bayes = make_online_tuner("bayes", (0.3, 1.0), max_evals=8)  # clipped into the box
    try:
        assert bayes.current() == (0.3, DEFAULT_BOX[1][1]) and bayes.tuner.max_evals == 8
    finally:
        bayes.close()
    with pytest.raises(ValueError):
        make_online_tuner("grid", (0.3, 0.5))
    with pytest.raises(ValueError):
        OnlineTuner(FixedTuner((0.1, 0.1)), window_tokens=0)
    with pytest.raises(ValueError):
        OnlineTuner(FixedTuner((0.1, 0.1)), energy_weight=-1.0)


def test_online_drift_restart_drops_the_open_held_window():
    # Holding after convergence; a drift restart re-publishes while a held window is half full.
    # Those tokens were measured as "held", not as the new round's evaluation: the new round's
    # first window starts at the restart's swap.
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2)], converge_after=1)
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=4, clock=clock)
    costs = {"gen_s": 0.03, "startup_s": 0.004, "per_token_s": 0.0005}
    try:
        ot.begin_run()
        ot.observe_costs(costs)
        clock.t = 1.0
        ot.observe(4)
        assert ot.sync() and ot.stats()["converged"] and len(core.tells) == 1  # held from t = 1
        clock.t = 2.0
        ot.observe(2)  # half a held window
        ot.observe_costs({**costs, "gen_s": 0.09})  # drift: the worker restarts and swaps at t = 2
        assert ot.sync() and core.restarts == 1 and not ot.stats()["converged"]
        clock.t = 3.0
        ot.observe(2)
        clock.t = 7.0
        ot.observe(4)  # the new round's window: 6 tokens from t = 2 to t = 7
        assert ot.sync()
        assert core.tells[1] == ((0.2, 0.2), pytest.approx(5.0 / 6.0))
        assert ot.stats()["history"][1]["tokens"] == 6
    finally:
        ot.close()


def test_online_settling_across_a_run_gap_adds_no_time():
    core = ScriptedTuner([(0.1, 0.1), (0.2, 0.2)])
    clock = FakeClock()
    ot = OnlineTuner(core, window_tokens=4, clock=clock, settle_tokens=4)
    try:
        ot.begin_run()
        clock.t = 1.0
        ot.observe(2)  # settling
        ot.end_run()
        clock.t = 10.0
        ot.begin_run()
        clock.t = 11.0
        ot.observe(2)  # settling ends: the window clock starts at t = 11
        clock.t = 13.0
        ot.observe(4)
        assert ot.sync()
        assert core.tells == [((0.1, 0.1), pytest.approx(0.5))]
    finally:
        ot.close()


# ----------------------------------------------------------------------------- budgeted tuning
# The model of the replayed real pair (Qwen2.5-Coder 0.5B -> 1.5B): the recording's own trace
# (6 HumanEval prompts x 64 tokens) at S1's costs (20 ms draft step, 25 ms verification, the
# paper link). Unconstrained, the best points verify almost every token (~8.5 cloud ms/token).
REPLAY_FILE = Path(__file__).resolve().parents[1] / "bench" / "results" / "replay" / "qwen2.5-coder-0.5b-1.5b.jsonl.gz"
S1 = SimConfig(gen_s=0.020, verify_base_s=0.025, verify_per_token_s=0.0, max_new=64, lookahead=48,
               startup_s=0.0005, per_token_s=3.2e-6, hint_s=3.2e-6, delay_s=0.010)
BUDGET_MS = 5.0  # cloud busy ms per generated token: binding (the unconstrained optimum spends more)


@pytest.fixture(scope="module")
def replay_model():
    """``f(tau_seq, tau_tok) -> (tpt_s, cloud ms/token, drafts per verification)`` on the replay, cached."""
    from pipesd.models.replay import load_recording

    rec = load_recording(str(REPLAY_FILE))
    traces = [{"confidence": [float(e[1]) for e in r.draft[:64]],
               "accepted": [e[0] == t for e, t in zip(r.draft[:64], r.target[:64])]} for r in rec.prompts[:6]]
    cache = {}

    def f(a, b):
        key = (round(a, 12), round(b, 12))
        if key not in cache:
            r = simulate_tpt(a, b, S1, trace=traces)
            cache[key] = (r.tpt_s, r.cloud_busy_per_token_s * 1e3, r.mean_draft_len)
        return cache[key]
    return f


def _budget_grid_best(f, budget, active=("tau_seq", "tau_tok")):
    """The reference: best TPT over a nines grid (with 0) of the active knobs, within ``budget``."""
    us = [0.0] + [1 - 10 ** -(-math.log10(1 - 0.995) * i / 14) for i in range(1, 15)]
    pts = [(a if "tau_seq" in active else 0.0, b if "tau_tok" in active else 0.0) for a in us for b in us]
    ok = [f(*p)[0] for p in set(pts) if budget is None or f(*p)[1] <= budget]
    return min(ok)


def _run_budgeted(tuner, f):
    while not tuner.converged:
        p = tuner.ask()
        tpt, cost, _ = f(*p)
        tuner.tell(p, tpt, cost=cost)
    return tuner.best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budgeted_tuner_respects_the_budget_and_nears_the_grid_optimum_under_it(seed, replay_model):
    f = replay_model
    ref = _budget_grid_best(f, BUDGET_MS)
    unconstrained = _budget_grid_best(f, None)
    assert ref > unconstrained  # the budget binds: the fastest points spend more cloud time
    t = BayesTuner(seed=seed, max_evals=16, x0=(0.35, 0.5), cloud_budget=BUDGET_MS)
    (point, _) = _run_budgeted(t, f)
    tpt, cost, drafts_per_verification = f(*point)
    assert len(t.history) == 16 and t.best_feasible
    assert cost <= BUDGET_MS  # never settles over budget ...
    assert drafts_per_verification > 2  # ... so not on verify-every-token
    assert tpt <= 1.03 * ref, (point, tpt, ref)


def test_budgeted_tuner_penalises_over_budget_points_and_reports_when_nothing_fits(replay_model):
    f = replay_model
    t = BayesTuner(seed=0, max_evals=6, x0=(0.99, 0.0), cloud_budget=BUDGET_MS)
    p = t.ask()
    tpt, cost, _ = f(*p)
    assert cost > BUDGET_MS  # (0.99, 0): verify after about every token
    t.tell(p, tpt, cost=cost)
    assert t.history[0]["penalised"] == pytest.approx(tpt * (cost / BUDGET_MS) ** 4)
    with pytest.raises(ValueError, match="needs the point's cost"):
        t.tell(t.ask(), 0.03)
    # A budget below every point's cost: the cheapest point measured, flagged infeasible.
    tiny = BayesTuner(seed=0, max_evals=5, cloud_budget=0.5)
    (point, _) = _run_budgeted(tiny, f)
    assert tiny.best_feasible is False
    assert f(*point)[1] == min(h["cost"] for h in tiny.history)


def test_without_a_budget_costs_change_nothing(replay_model):
    f = replay_model
    told_costs, plain = BayesTuner(seed=3, max_evals=10), BayesTuner(seed=3, max_evals=10, cloud_budget=None)
    while not plain.converged:
        p, q = told_costs.ask(), plain.ask()
        assert p == q
        told_costs.tell(p, f(*p)[0], cost=f(*p)[1])
        plain.tell(q, f(*q)[0])
    assert told_costs.best == plain.best
    # and unconstrained, the tuner goes where the cloud cost is high (verify often): the old optimum
    assert f(*plain.best[0])[1] > BUDGET_MS


def test_tuner_can_switch_a_threshold_off(replay_model):
    """``active=("tau_seq",)``: tau_tok is held at its x0 value (0: off) and the search is 1-D; on
    the replay it reaches the tau_seq-only grid optimum, with or without a budget."""
    f = replay_model
    for budget in (None, BUDGET_MS):
        t = BayesTuner(seed=0, max_evals=10, n_initial=4, x0=(0.35, 0.0), active=("tau_seq",), cloud_budget=budget)
        while not t.converged:
            p = t.ask()
            assert p[1] == 0.0
            t.tell(p, f(*p)[0], cost=f(*p)[1])
        ref = _budget_grid_best(f, budget, active=("tau_seq",))
        assert f(*t.best[0])[0] <= 1.02 * ref and (budget is None or f(*t.best[0])[1] <= budget)
    assert BayesTuner(active="tau_tok", x0=(0.3, 0.5)).ask() == (0.3, 0.5)  # x0 first, tau_seq held at 0.3
    for bad in ((), ("lookahead",), ("tau_seq", "tau_seq")):
        with pytest.raises(ValueError, match="active"):
            BayesTuner(active=bad)
    for kw in ({"cloud_budget": -1.0}, {"cloud_budget": math.nan}, {"penalty_exp": 0.0}):
        with pytest.raises(ValueError):
            BayesTuner(**kw)


def test_online_budgeted_tuner_measures_cloud_cost_per_window_and_respects_the_budget(replay_model):
    """End to end on the model: 64-token windows of the replay, each told with the cloud busy time
    its verdicts reported (``observe(..., cloud_s=)``); converges in 16 windows within budget."""
    from pipesd.models.replay import load_recording

    rec = load_recording(str(REPLAY_FILE))
    traces = [{"confidence": [float(e[1]) for e in r.draft[:64]],
               "accepted": [e[0] == t for e, t in zip(r.draft[:64], r.target[:64])]} for r in rec.prompts[:6]]
    clock = FakeClock()
    ot = make_online_tuner("bayes", (0.35, 0.5), seed=0, window_tokens=64, clock=clock,
                           cloud_budget_ms_per_token=BUDGET_MS)
    try:
        assert ot.tuner.cloud_budget == BUDGET_MS
        ot.begin_run()
        k = 0
        while not ot.stats()["converged"]:
            r = simulate_tpt(*ot.current(), S1, trace=traces[k % 6])  # one prompt's generation: one window
            clock.t += r.wall_s
            ot.observe(r.tokens, cloud_s=r.cloud_busy_per_token_s * r.tokens)
            assert ot.sync()
            k += 1
            assert k <= 16
        st = ot.stats()
    finally:
        ot.close()
    assert st["evaluations"] == 16 and st["cloud_budget_ms_per_token"] == BUDGET_MS
    assert all(h["cloud_ms_per_token"] > 0 for h in st["history"])
    assert any(h["cloud_ms_per_token"] > BUDGET_MS for h in st["history"])  # it looked past the budget
    assert st["best"]["within_budget"] and st["best"]["cloud_ms_per_token"] <= BUDGET_MS
    assert replay_model(st["tau_seq"], st["tau_tok"])[1] <= 1.1 * BUDGET_MS  # on the whole replay too
    with pytest.raises(ValueError, match="cloud_budget_ms_per_token"):
        OnlineTuner(FixedTuner((0.1, 0.1)), cloud_budget_ms_per_token=-2.0)
    with pytest.raises(ValueError, match="cloud_s"):
        OnlineTuner(FixedTuner((0.1, 0.1))).observe(1, cloud_s=-1.0)


def test_edge_client_passes_the_configured_cloud_budget_to_its_tuner():
    """``EdgeClient(tuner="bayes")`` reads ``config.cloud_budget_ms_per_token``; the windows carry the
    cloud busy time the verdicts report; output stays the target's greedy tokens."""
    from pipesd.edge import EdgeClient, EdgeConfig
    from runtime_helpers import reference_greedy, running_server, tiny_pair

    draft, target, target_m = tiny_pair()
    cfg = EdgeConfig.for_method("pipesd")
    cfg.cloud_budget_ms_per_token = 50.0  # the field the adaptive schedule adds; an attribute before it
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    with running_server(target) as (_, url):
        with EdgeClient(url, draft, cfg, tuner="bayes", tuner_window_tokens=8) as client:
            for p in prompts:
                g = client.generate(p, 24)
                assert g.token_ids == reference_greedy(target_m, p, 24)
            client.tuner.sync()
            st = client.tuner.stats()
    assert st["cloud_budget_ms_per_token"] == 50.0 and st["evaluations"] >= 3
    assert all(h["cloud_ms_per_token"] > 0 for h in st["history"])
