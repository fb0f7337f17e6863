"""The adaptive schedule (``pipesd-adaptive``, :mod:`pipesd.edge.schedule`): the model's pick
follows the physics (a fast edge pipelines, a slow one goes serial and takes the free bonus, a
cloud faster than the edge streams when the budget allows), never spends more than the budget,
and every schedule it can pick stays lossless with two edges in one launch: greedy output is the
target's, sampled output follows the target's distribution (with a planted wrong rule caught)."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import subprocess
import sys
import pytest
import torch

from pipesd.cloud.verifier import Verifier
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.edge.config import HSL_TAU_TOK
from pipesd.edge.schedule import SERIAL_K, AdaptiveSchedule, Candidate, Choice, Costs, candidates, choose

import _stats
from runtime_helpers import reference_greedy, running_server, tiny_pair
from test_baselines import DEPTH, N_PLANTED, _TemperatureTwice, _sampled_counts, _two_edges, exact, spair  # noqa: F401

PROMPTS = [[1, 2, 3], [7], [5, 9, 11, 13, 2, 4], [30, 31]]
N_NEW = 16
PAPER_LINK = dict(delay_s=0.010, verify_base_s=0.025, agreement=0.9)  # 10 ms each way, a 25 ms verification


# --------------------------------------------------------------------------- the model's pick
def test_a_fast_edge_pipelines():
    c = choose(Costs(gen_s=0.010, **PAPER_LINK))
    assert c.chosen.method in ("pipesd", "dual-no-pipeline")
    assert c.chosen.name == "pipelined"


def test_a_slow_edge_goes_serial_and_takes_the_free_bonus():
    """g = 80 ms > round trip + verification (45 ms): serial rounds beat one draft per step."""
    c = choose(Costs(gen_s=0.080, **PAPER_LINK))
    assert c.chosen.method == "vanilla-sd"
    piped = next(x for x in c.candidates if x.name == "pipelined")
    assert c.chosen.tpt_ms < piped.tpt_ms


def test_the_default_budget_is_what_vanilla_sd_at_its_best_k_spends():
    c = choose(Costs(gen_s=0.040, **PAPER_LINK))
    serial = [x for x in c.candidates if x.method == "vanilla-sd"]
    assert [x.name for x in serial] == [f"serial-{k}" for k in SERIAL_K]
    best = min(serial, key=lambda x: x.tpt_ms)
    assert c.budget_ms == best.cloud_ms_per_token and c.asked is None
    assert c.chosen.tpt_ms <= best.tpt_ms  # never slower than vanilla SD at its best K, by the model
    assert c.chosen.cloud_ms_per_token <= c.budget_ms * 1.02 + 1e-6


def test_with_no_limit_a_cloud_faster_than_the_edge_streams():
    c = choose(Costs(gen_s=0.080, **PAPER_LINK), math.inf)
    assert c.chosen.name == "cloud-stream"
    assert c.chosen.tpt_ms == pytest.approx(25.0)


@pytest.mark.parametrize("g_ms", [5, 20, 40, 80])
@pytest.mark.parametrize("budget", [2.0, 5.0, 10.0, 30.0])
def test_the_pick_respects_the_budget_or_is_the_cheapest(g_ms, budget):
    c = choose(Costs(gen_s=g_ms / 1e3, **PAPER_LINK), budget)
    fits = [x for x in c.candidates if x.cloud_ms_per_token <= budget * 1.02 + 1e-6]
    if fits:
        assert c.chosen.cloud_ms_per_token <= budget * 1.02 + 1e-6
        assert c.chosen.tpt_ms == min(x.tpt_ms for x in fits)
    else:
        assert c.chosen.cloud_ms_per_token == min(x.cloud_ms_per_token for x in c.candidates)
        assert "no schedule fits" in c.reason


def test_costs_are_validated_and_drift_is_relative():
    with pytest.raises(ValueError, match="gen_s"):
        Costs(gen_s=-1, delay_s=0, verify_base_s=0)
    with pytest.raises(ValueError, match="agreement"):
        Costs(gen_s=0.01, delay_s=0, verify_base_s=0, agreement=1.5)
    a = Costs(gen_s=0.020, **PAPER_LINK)
    assert not a.drifted(Costs(gen_s=0.021, **PAPER_LINK), 0.15)
    assert a.drifted(Costs(gen_s=0.040, **PAPER_LINK), 0.15)


TREES = dict(unsure=0.4, rescue_w2=0.35, rescue_w3=0.5)  # measured rescues: a tree would have helped


def test_a_tree_is_offered_only_once_rescues_are_measured_and_wins_on_a_slow_edge():
    slow = dict(gen_s=0.080, verify_per_token_s=0.0005, **PAPER_LINK)
    assert not [c for c in choose(Costs(**slow)).candidates if c.method == "tree-sd"]
    c = choose(Costs(**slow, **TREES))
    assert c.chosen.method == "tree-sd" and c.chosen.name.startswith("tree-")
    serial = next(x for x in c.candidates if x.name == f"serial-{dict(c.chosen.overrides)['k']}")
    assert c.chosen.tpt_ms < serial.tpt_ms  # the same rounds, plus the rescued tokens
    assert c.chosen.cloud_ms_per_token <= c.budget_ms * 1.02


def test_rescues_are_folded_from_chain_runs_and_from_tree_runs():
    from pipesd.edge.stats import GenerationStats
    from pipesd.scheduling import CostModel

    s = AdaptiveSchedule(background=False)
    chain = GenerationStats(verifications=10, verified_drafts=40, accepted_drafts=30, rejections=10, drafted=100,
                            unsure_drafts=40, rescued_w2=3, rescued_w3=5, cloud_busy_s=0.25)
    s.observe(chain, CostModel(), EdgeConfig.for_method("pipesd-adaptive"))
    got = s.costs(CostModel())
    assert (got.unsure, got.rescue_w2, got.rescue_w3) == pytest.approx((0.4, 0.3, 0.5))
    tree = GenerationStats(verifications=10, verified_drafts=50, accepted_drafts=30, rejections=4, drafted=50,
                           tree_sibling_hits=6, cloud_busy_s=0.25, schedule="tree-3x2")
    s.observe(tree, CostModel(), EdgeConfig.for_method("pipesd-adaptive"))
    got = s.costs(CostModel())
    assert got.rescue_w2 == pytest.approx((3 + 6) / (10 + 10)) and got.rescue_w3 == pytest.approx(0.5)
    assert got.unsure == pytest.approx(0.4)  # a tree run's drafts include its siblings: not counted


def _calibrating(g_s: float = 0.020):
    """An inline AdaptiveSchedule, a cost model at draft step ``g_s`` and the paper link's round trip."""
    from pipesd.scheduling import CostModel

    s, cm = AdaptiveSchedule(background=False), CostModel()
    for _ in range(10):
        cm.observe_draft(g_s)
    s.observe_rtt(2 * PAPER_LINK["delay_s"])
    return s, cm


def _generation(schedule: str, s, cm, tpt_of, accepted: int = 74, rejections: int = 6):
    """One generation of ``schedule`` whose measured TPT is ``tpt_of(model's prediction)``, the
    prediction made the way the schedule makes it (at this generation's own agreement)."""
    from pipesd.edge.stats import GenerationStats

    st = GenerationStats(new_tokens=64, verifications=20, verified_drafts=accepted + rejections,
                         accepted_drafts=accepted, rejections=rejections, drafted=100, unsure_drafts=40,
                         rescued_w2=2, rescued_w3=3, cloud_busy_s=20 * 0.025, schedule=schedule)
    cfg = EdgeConfig.for_method("pipesd-adaptive")
    # the costs this generation will be folded into (a copy folds it, unnamed: no calibration),
    # then the model's prediction at the generation's own agreement
    probe = AdaptiveSchedule(background=False)
    probe._obs, probe.delay_s = copy.deepcopy(s._obs), s.delay_s
    probe.observe(dataclasses.replace(st, schedule=""), cm, cfg)
    own = dataclasses.replace(probe.costs(cm), agreement=accepted / (accepted + rejections))
    pred = candidates(own, (cfg.trigger.tau_seq, cfg.trigger.tau_tok), only=schedule,
                      max_draft=cfg.trigger.max_draft, lookahead=cfg.lookahead)[0]
    st.tpt_s = tpt_of(pred.tpt_ms) / 1e3
    s.observe(st, cm, cfg)
    return pred


def test_a_schedule_that_measures_as_modelled_keeps_the_pick_and_the_model_is_not_rerun():
    s, cm = _calibrating()
    _generation("pipelined", s, cm, lambda p: p)
    first = s.choice
    assert first is not None and s.calibration()["pipesd"][0] == pytest.approx(1.0, abs=1e-9)
    _generation(first.chosen.name, s, cm, lambda p: p)
    assert s.choice is first, "nothing drifted and no factor moved: the model is not re-run"
    assert "measured/modelled TPT pipesd 1.00" in first.reason


def test_a_schedule_slower_than_modelled_is_measured_once_and_dropped():
    s, cm = _calibrating()
    _generation("pipelined", s, cm, lambda p: p)
    picked = s.choice.chosen
    _generation(picked.name, s, cm, lambda p: 1.3 * p)  # it runs 30% slower than the model says
    t, _ = s.calibration()[picked.method]
    assert t > 1.1, "one generation 30% slow moves the factor most of the way (shrunk by one pseudo-generation)"
    assert s.choice.chosen.method != picked.method, s.choice.reason
    assert s.choice.chosen.tpt_ms < next(c for c in s.choice.candidates if c.name == picked.name).tpt_ms
    assert f"{picked.method} {t:.2f}" in s.choice.reason


def test_calibration_compares_a_generation_with_the_model_at_its_own_agreement():
    """An easy prompt (79 of 80 drafts accepted) is faster than the running agreement predicts;
    predicted at its own agreement it reads as the model's error it is (none), not as a fast
    schedule."""
    s, cm = _calibrating()
    _generation("pipelined", s, cm, lambda p: p)
    pred = _generation("pipelined", s, cm, lambda p: p, accepted=79, rejections=1)
    assert s.calibration()["pipesd"][0] == pytest.approx(1.0, abs=1e-9)
    at_running = candidates(s.costs(cm), only="pipelined")[0]
    assert pred.tpt_ms < at_running.tpt_ms  # the easy prompt's own prediction is the faster one


def test_factors_are_clamped_and_the_knob_is_validated():
    s, cm = _calibrating()
    _generation("pipelined", s, cm, lambda p: 50 * p)  # a measurement gone wrong (a stall)
    assert s.calibration()["pipesd"][0] == AdaptiveSchedule.CAL_CLAMP[1]
    with pytest.raises(ValueError, match="recalibrate"):
        AdaptiveSchedule(recalibrate=0)
    assert candidates(Costs(gen_s=0.02, **PAPER_LINK), only="no-such-schedule") == []


def test_a_chain_run_measures_what_a_tree_would_have_rescued(pair):
    with running_server(pair[1]) as (srv, url):
        with EdgeClient(url, pair[0], EdgeConfig.for_method("vanilla-sd", k=4)) as c:
            st = [c.generate(p, N_NEW).stats for p in PROMPTS]
    assert sum(x.unsure_drafts for x in st) > 0
    for x in st:
        assert x.rescued_w2 <= x.rescued_w3 <= x.rejections and x.unsure_drafts <= x.drafted
    assert sum(x.rescued_w3 for x in st) > 0, "the tiny pair's corrections are often its 2nd-3rd choice"


def test_the_budget_is_validated():
    with pytest.raises(ValueError, match="cloud_budget_ms_per_token"):
        EdgeConfig.for_method("pipesd-adaptive", cloud_budget_ms_per_token=-1.0)
    assert EdgeConfig.for_method("pipesd-adaptive", cloud_budget_ms_per_token=math.inf).cloud_budget_ms_per_token \
        == math.inf


def test_the_cli_refuses_a_bad_budget():
    r = subprocess.run([sys.executable, "-m", "pipesd", "generate", "--method", "pipesd-adaptive",
                        "--cloud-budget", "cheap", "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--cloud-budget" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- lossless, every pick
_CANDIDATES = {c.name: c for c in candidates(Costs(gen_s=0.02, delay_s=0.01, verify_base_s=0.02, unsure=0.4,
                                                  rescue_w2=0.35, rescue_w3=0.5, lookup_rate=0.3,
                                                  lookup_precision=0.9), segments=20, lookup="auto")}


def _choice(name: str) -> Choice:
    """The model's own candidate ``name`` (its method and overrides), picked by script."""
    return Choice(_CANDIDATES[name], 0.0, f"{name}: scripted", asked=None)


def test_a_candidate_keeps_its_own_thresholds():
    """serial-hsl runs HSL's rule (tau_tok 0.99), whatever thresholds the adaptive config has."""
    s = AdaptiveSchedule(background=False)
    s.choice = _choice("serial-hsl")
    cfg, name, _ = s.config_for(EdgeConfig.for_method("pipesd-adaptive", tau_tok=0.5))
    assert name == "serial-hsl" and cfg.method == "hsl" and cfg.trigger.tau_tok == HSL_TAU_TOK and not cfg.pipeline


class _Scripted(AdaptiveSchedule):
    """Picks the schedules of ``names`` in turn, one per generation (the model is not run)."""

    def __init__(self, names) -> None:
        super().__init__(background=False)
        self.names, self.i = list(names), 0

    def config_for(self, cfg):
        self.choice = _choice(self.names[self.i % len(self.names)])
        self.i += 1
        return super().config_for(cfg)

    def observe(self, stats, cost_model, cfg, **kw) -> None:
        pass


def _scripted(names):
    """A ``setup`` for the two-edge harness: each client picks ``names`` in turn."""
    def setup(client) -> None:
        client.schedule = _Scripted(names)
    return setup


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def refs(pair):
    return {tuple(p): reference_greedy(pair[2], p, N_NEW) for p in PROMPTS}


def _gather_before_each_launch(srv, window_s: float = 0.03) -> None:
    """Each launch waits ``window_s`` before it takes the queued sessions: two serial edges
    would otherwise alternate (one drafts while the other is verified) and never share one."""
    verify_round = srv._verify_round

    async def gathered(loop, first):
        await asyncio.sleep(window_s)
        await verify_round(loop, first)
    srv._verify_round = gathered


EVERY = ["pipelined", "serial-1", "serial-3", "serial-dual", "serial-hsl", "tree-3x3", "cloud-stream"]


def test_greedy_is_the_targets_whatever_the_schedule_with_two_edges_at_once(pair, refs):
    prompts = [PROMPTS + PROMPTS[:1], PROMPTS[::-1] + PROMPTS[1:2]]
    with running_server(pair[1]) as (srv, url):
        _gather_before_each_launch(srv)
        cfg = EdgeConfig.for_method("pipesd-adaptive")
        out = _two_edges(url, [cfg, cfg], prompts, N_NEW, setup=_scripted(EVERY))
        assert srv.stats.max_batch >= 2, "the two edges were never verified in one launch"
    for e in (0, 1):
        assert [g.stats.schedule for g in out[e]] == [EVERY[i % len(EVERY)] for i in range(len(prompts[e]))]
        for g, p in zip(out[e], prompts[e]):
            assert g.token_ids == refs[tuple(p)], f"{g.stats.schedule} diverged from the target's greedy output on {p}"
            assert g.stats.method == "pipesd-adaptive"


def test_the_schedule_follows_a_slowed_edge_and_stays_exact(pair, refs):
    """The model really runs: a fast edge first, then the same edge padded to 90 ms per draft
    step (a cloud at 25 ms per verification): the pick moves to serial rounds."""
    with running_server(pair[1], verify_pad_s=0.025) as (srv, url):
        with EdgeClient(url, pair[0], EdgeConfig.for_method("pipesd-adaptive")) as c:
            c.schedule = AdaptiveSchedule(background=False)
            fast = EdgeConfig.for_method("pipesd-adaptive", draft_step_s=0.0)
            slow = EdgeConfig.for_method("pipesd-adaptive", draft_step_s=0.090)
            gens = [c.generate(p, N_NEW, config=fast) for p in PROMPTS[:2]]
            gens += [c.generate(p, N_NEW, config=slow) for p in PROMPTS]
            history = c.schedule.history
    for g, p in zip(gens, PROMPTS[:2] + PROMPTS):
        assert g.token_ids == refs[tuple(p)]
    assert gens[0].stats.schedule == "pipelined" and "until this connection's costs are measured" in \
        gens[0].stats.schedule_reason
    assert gens[-1].stats.schedule.startswith(("serial-", "tree-")), [g.stats.schedule for g in gens]  # serial rounds
    assert "fastest within the cloud budget" in gens[-1].stats.schedule_reason
    assert len(history) >= 1
    cal = c.schedule.calibration()
    assert "pipesd" in cal, "the client's generations reach the calibration (tokens and TPT set before it reads them)"
    assert all(AdaptiveSchedule.CAL_CLAMP[0] <= f <= AdaptiveSchedule.CAL_CLAMP[1] for fs in cal.values() for f in fs)
    assert "measured/modelled TPT" in gens[-1].stats.schedule_reason


def test_a_cancelled_or_offline_generation_is_not_calibrated():
    s, cm = _calibrating()
    _generation("pipelined", s, cm, lambda p: p)
    before = dict(s.calibration())
    from pipesd.edge.stats import GenerationStats
    st = GenerationStats(new_tokens=5, tpt_s=1.0, verifications=2, verified_drafts=4, accepted_drafts=2,
                         rejections=1, cloud_busy_s=0.05, schedule=s.choice.chosen.name)
    s.observe(st, cm, EdgeConfig.for_method("pipesd-adaptive"), calibrate=False)
    s.observe(dataclasses.replace(st, offline_episodes=1), cm, EdgeConfig.for_method("pipesd-adaptive"))
    assert s.calibration() == before


# --------------------------------------------------------------------------- sampling
@pytest.mark.slow
def test_sampling_follows_the_targets_distribution_whatever_the_schedule(spair, exact):
    counts = _sampled_counts(spair, "pipesd-adaptive", setup=_scripted(EVERY))
    for d in range(DEPTH):
        _stats.check(torch.tensor(counts[d]), torch.tensor(exact[d]), f"pipesd-adaptive, position {d}")


class _TemperatureTwiceForDrafts(Verifier):
    """Planted: the target's logits of every drafting job scaled by 1/T once more (drafts are
    judged against a sharper target than the one sampled alone)."""

    def _score(self, sessions, jobs):
        logits = super()._score(sessions, jobs)
        for i, (s, j) in enumerate(zip(sessions, jobs)):
            if not j.stream and not s.params.greedy:
                logits[i] /= s.params.temperature
        return logits


@pytest.mark.parametrize("planted,names", [(_TemperatureTwiceForDrafts, ["serial-2", "pipelined"]),
                                           (_TemperatureTwice, ["cloud-stream"])],
                         ids=["drafting-schedules", "cloud-stream"])
def test_the_sampling_check_catches_a_wrong_rule_in_the_schedules(spair, exact, planted, names):
    counts = _sampled_counts(spair, "pipesd-adaptive", planted, N_PLANTED, setup=_scripted(names))
    assert any(_stats.fails(torch.tensor(counts[d]), torch.tensor(exact[d])) for d in range(DEPTH))


# --------------------------------------------------------------------------- prompt-lookup candidates
LOOKUP = dict(lookup_rate=0.3, lookup_precision=0.95)  # measured: lookup would propose 30% of drafts, 95% right


def test_the_model_without_lookup_is_unchanged_and_lookup_cuts_a_pipelined_edges_draft_time():
    from pipesd.tuning.sim import SimConfig, simulate_tpt

    base = SimConfig(gen_s=0.030, delay_s=0.010, verify_base_s=0.025, segments=200)
    off = simulate_tpt(0.35, 0.5, base)
    assert simulate_tpt(0.35, 0.5, dataclasses.replace(base, lookup_precision=0.1)) == off  # rate 0: no lookup
    good = simulate_tpt(0.35, 0.5, dataclasses.replace(base, lookup_rate=0.3, lookup_precision=1.0))
    bad = simulate_tpt(0.35, 0.5, dataclasses.replace(base, lookup_rate=0.3, lookup_precision=0.2))
    assert good.tpt_s < 0.85 * off.tpt_s  # a third of the draft steps cost nothing
    assert bad.tpt_s > off.tpt_s and bad.rollbacks > off.rollbacks  # wrong copies cost round trips
    for k in ("lookup_rate", "lookup_precision", "lookup_confidence"):
        with pytest.raises(ValueError, match=k):
            SimConfig(**{k: 1.5})
    with pytest.raises(ValueError, match="lookup_s"):
        SimConfig(lookup_s=-1.0)


def test_lookup_candidates_are_offered_only_when_measured_and_asked_for():
    fast = dict(gen_s=0.010, **PAPER_LINK)
    names = lambda cands: {c.name for c in cands}  # noqa: E731
    assert not any(n.endswith("+lookup") for n in names(candidates(Costs(**fast), lookup="auto", segments=50)))
    assert not any(n.endswith("+lookup") for n in names(candidates(Costs(**fast, **LOOKUP), segments=50)))
    got = candidates(Costs(**fast, **LOOKUP), lookup="auto", segments=50)
    assert {"pipelined+lookup"} | {f"serial-{k}+lookup" for k in SERIAL_K} <= names(got)
    for c in got:
        assert (("lookup", "ngram") in c.overrides) == c.name.endswith("+lookup")
    c = choose(Costs(**fast, **LOOKUP), lookup="auto", segments=200)
    assert c.chosen.name == "pipelined+lookup", c.reason  # a fast edge, accurate copies: lookup pays
    assert not choose(Costs(**fast, lookup_rate=0.3, lookup_precision=0.3), lookup="auto",
                      segments=200).chosen.name.endswith("+lookup")  # copies mostly wrong: it does not


def test_the_concrete_config_runs_lookup_as_the_candidate_says():
    s = AdaptiveSchedule(background=False)
    auto = EdgeConfig.for_method("pipesd-adaptive")
    assert auto.lookup == "auto" and EdgeConfig.for_method("pipesd").lookup == "off"
    with pytest.raises(ValueError, match="pipesd-adaptive"):
        EdgeConfig.for_method("pipesd", lookup="auto")
    s.choice = _choice("pipelined+lookup")
    cfg, name, _ = s.config_for(auto)
    assert (name, cfg.method, cfg.lookup, cfg.pipeline) == ("pipelined+lookup", "pipesd", "ngram", True)
    s.choice = _choice("serial-3+lookup")
    cfg, _, _ = s.config_for(auto)
    assert (cfg.method, cfg.k, cfg.lookup) == ("vanilla-sd", 3, "ngram")
    s.choice = _choice("pipelined")
    assert s.config_for(auto)[0].lookup == "shadow"  # measures what lookup would do
    assert s.config_for(auto.replace(lookup="off"))[0].lookup == "off"
    assert s.config_for(auto.replace(lookup="ngram"))[0].lookup == "ngram"  # the user's choice, for every candidate
    replayed = AdaptiveSchedule(background=False, lookup_allowed=False)
    replayed.choice = _choice("pipelined")
    assert replayed.config_for(auto)[0].lookup == "off"  # a replayed draft cannot leave its recording


def test_lookup_is_measured_in_shadow_and_in_lookup_runs_apart_from_the_draft_models_agreement():
    from pipesd.edge.stats import GenerationStats
    from pipesd.scheduling import CostModel

    s, cfg = AdaptiveSchedule(background=False), EdgeConfig.for_method("pipesd-adaptive")
    shadow = GenerationStats(verifications=10, verified_drafts=40, accepted_drafts=36, rejections=4, drafted=100,
                             cloud_busy_s=0.25, lookup_shadow=20, lookup_shadow_checked=16, lookup_shadow_right=12)
    s.observe(shadow, CostModel(), cfg)
    got = s.costs(CostModel())
    assert (got.lookup_rate, got.lookup_precision, got.agreement) == pytest.approx((0.2, 0.75, 0.9))
    run = GenerationStats(verifications=10, verified_drafts=40, accepted_drafts=36, rejections=4, drafted=100,
                          cloud_busy_s=0.25, lookup_proposals=40, lookup_accepted=18, lookup_rejected=4,
                          schedule="pipelined+lookup")
    s.observe(run, CostModel(), cfg)
    got = s.costs(CostModel())
    assert got.lookup_rate == pytest.approx(60 / 200) and got.lookup_precision == pytest.approx(30 / 38)
    assert got.agreement == pytest.approx((36 + 18) / (40 + 18))  # the model's own drafts: lookup's taken out
    assert got.agreement != pytest.approx((36 + 36) / 80)
    with pytest.raises(ValueError, match="lookup_rate"):
        Costs(gen_s=0.01, delay_s=0, verify_base_s=0, lookup_rate=2.0)


def test_a_lookup_variant_is_calibrated_apart_from_its_method():
    from pipesd.edge.schedule import family

    got = {c.name: family(c) for c in candidates(Costs(gen_s=0.02, **PAPER_LINK, **LOOKUP), lookup="auto",
                                                   segments=20)}
    assert got["pipelined"] == "pipesd" and got["pipelined+lookup"] == "pipesd+lookup"
    assert got["serial-2+lookup"] == "vanilla-sd+lookup"


class _GarbageIndex:
    """A planted proposer for the lossless checks: always a hit (so lookup proposes at once),
    mostly a wrong token."""

    def __new__(cls, max_n, min_n):
        from pipesd.edge.lookup import NgramIndex

        class Garbage(NgramIndex):
            def lookup(self):
                return (self.tokens[-1] * 7 + 3) % 12, 1
        return Garbage(max_n, min_n)


def _forced_lookup(monkeypatch, wrapper=None):
    """Every lookup the edges run (ngram or shadow) proposes from :class:`_GarbageIndex`, unconfirmed."""
    from pipesd.edge import lookup as lk, pipeline

    wrap = wrapper or lk.LookupDraft
    monkeypatch.setattr(pipeline, "_lookup_draft", lambda d, cfg: wrap(
        d, _GarbageIndex(1, 1), confidence=cfg.lookup_confidence, max_tokens=2, confirm=False,
        shadow=cfg.lookup == "shadow"))


LOOKUP_PICKS = ["pipelined+lookup", "serial-2+lookup", "pipelined", "serial-3+lookup"]


def test_greedy_is_the_targets_with_lookup_candidates_and_two_edges_at_once(pair, refs, monkeypatch):
    _forced_lookup(monkeypatch)
    prompts = [PROMPTS, PROMPTS[::-1]]
    with running_server(pair[1]) as (srv, url):
        _gather_before_each_launch(srv)
        cfg = EdgeConfig.for_method("pipesd-adaptive")
        out = _two_edges(url, [cfg, cfg], prompts, N_NEW, setup=_scripted(LOOKUP_PICKS))
        assert srv.stats.max_batch >= 2, "the two edges were never verified in one launch"
    for e in (0, 1):
        for g, p in zip(out[e], prompts[e]):
            assert g.token_ids == refs[tuple(p)], f"{g.stats.schedule} diverged from the target's greedy output on {p}"
            if g.stats.schedule.endswith("+lookup"):
                assert g.stats.lookup_proposals > 0 and g.stats.lookup_rejected > 0  # garbage proposed, rejected
            else:
                assert g.stats.lookup_proposals == 0 and g.stats.lookup_shadow_checked > 0  # measured only


@pytest.mark.slow
def test_sampling_follows_the_targets_distribution_with_lookup_candidates(spair, exact, monkeypatch):
    _forced_lookup(monkeypatch)
    counts = _sampled_counts(spair, "pipesd-adaptive", setup=_scripted(LOOKUP_PICKS))
    for d in range(DEPTH):
        _stats.check(torch.tensor(counts[d]), torch.tensor(exact[d]), f"pipesd-adaptive with lookup, position {d}")


def test_the_sampling_check_catches_a_soft_q_on_lookup_proposals(spair, exact, monkeypatch):
    """Planted: lookup proposals sent with a draft-like q (half on the token), not one-hot."""
    import numpy as np

    from pipesd.edge.lookup import LookupDraft

    class SoftQ(LookupDraft):
        def step(self, params=None, generator=None, want_full_q: bool = False):
            st = super().step(params, generator, want_full_q)
            if self.last_lookup:
                st.q_ids = np.array([st.token, (st.token + 1) % 12, (st.token + 2) % 12], dtype=np.int32)
                st.q_probs = np.array([0.5, 0.25, 0.25], dtype=np.float32)
            return st

    _forced_lookup(monkeypatch, SoftQ)
    counts = _sampled_counts(spair, "pipesd-adaptive", n=N_PLANTED, setup=_scripted(["pipelined+lookup",
                                                                                   "serial-2+lookup"]))
    assert any(_stats.fails(torch.tensor(counts[d]), torch.tensor(exact[d])) for d in range(DEPTH))
