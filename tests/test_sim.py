"""The fleet simulator (pipesd.sim): its bounds, its agreement with the single-edge model, what
routing and admission do, and the shared host CPU. Simulated time only: nothing here measures
the machine."""
import dataclasses

import pytest

from pipesd.sim import CostCurve, EdgeModel, FleetConfig, HostCPU, capacity_bound, simulate_fleet
from pipesd.tuning.sim import simulate_tpt

LAT = (0.0, 0.01, 0.02, 0.04, 0.08)


@pytest.fixture(scope="module")
def pipelined():
    return EdgeModel.from_single_edge(0.35, 0.5, latencies=LAT, segments=300)


@pytest.fixture(scope="module")
def serial():
    return EdgeModel.from_single_edge(0.0, 0.0, latencies=LAT, segments=300, pipeline=False, batching="trigger",
                                      max_draft=4)


def flat(tpt=0.03, tokens=3.0, drafts=4.0):
    """An edge whose cycle grows one for one with cloud latency (a serial edge)."""
    return EdgeModel.from_measured(tpt, tokens, drafts, 0.0, pipelined=False)


@pytest.mark.parametrize("which", ["pipelined", "serial"])
def test_one_edge_on_a_cloud_of_its_own_matches_the_single_edge_model(which, request):
    em = request.getfixturevalue(which)
    v = 0.013  # between two grid latencies: the interpolation is checked too
    kw = dict(pipeline=False, batching="trigger", max_draft=4) if which == "serial" else {}
    taus = (0.0, 0.0) if which == "serial" else (0.35, 0.5)
    ref = simulate_tpt(*taus, verify_base_s=v, verify_per_token_s=0.0, segments=300, **kw).tpt_s
    res = simulate_fleet(FleetConfig(1, em, CostCurve(v), duration_s=60.0, max_new=64))
    assert res.tpt_mean_s == pytest.approx(ref, rel=0.03)


@pytest.mark.parametrize("mode,batch,replicas", [("sd", 1, 1), ("sd", 8, 1), ("sd", 32, 2), ("stream", 16, 2)])
def test_goodput_never_exceeds_the_clouds_capacity(pipelined, mode, batch, replicas):
    cfg = FleetConfig(64, pipelined, CostCurve(0.004, 0.0005, 0.0002), replicas=replicas, mode=mode,
                      max_batch_sessions=batch, duration_s=3.0)
    res = simulate_fleet(cfg)
    assert 0 < res.goodput_tok_s <= capacity_bound(cfg)
    assert res.sessions_per_launch <= batch


def test_a_saturated_cloud_runs_near_its_capacity_bound():
    cfg = FleetConfig(32, flat(0.001, 4.0, 4.0), CostCurve(0.01), max_batch_sessions=1, duration_s=5.0)
    res = simulate_fleet(cfg)
    assert res.goodput_tok_s == pytest.approx(capacity_bound(cfg), rel=0.1)


def test_batching_raises_goodput_when_a_launch_costs_mostly_its_base(pipelined):
    kw = dict(duration_s=4.0)
    one = simulate_fleet(FleetConfig(32, pipelined, CostCurve(0.02, 0.0, 0.0001), max_batch_sessions=1, **kw))
    many = simulate_fleet(FleetConfig(32, pipelined, CostCurve(0.02, 0.0, 0.0001), max_batch_sessions=32, **kw))
    assert one.sessions_per_launch == 1.0 and many.sessions_per_launch > 2
    assert many.goodput_tok_s > 1.5 * one.goodput_tok_s
    assert many.cloud_busy_per_token_s < one.cloud_busy_per_token_s


@pytest.mark.parametrize("routing", ["least-loaded", "jsq", "hash", "round-robin"])
def test_every_job_of_a_session_goes_to_the_replica_it_was_opened_on(routing):
    res = simulate_fleet(FleetConfig(12, flat(), CostCurve(0.005), replicas=3, routing=routing, duration_s=2.0,
                                     max_new=16, think_s=0.05, record=True))
    where: dict = {}
    for session, replica in res.jobs:
        where.setdefault(session, set()).add(replica)
    assert len(where) >= 24 and all(len(r) == 1 for r in where.values())
    assert sum(res.sessions_per_replica) == len(where)


def test_least_loaded_beats_round_robin_and_hash_on_an_uneven_load():
    # Few edges per replica and random idle gaps between generations: the load is uneven, and
    # only a router that looks at the replicas keeps each one's queue short.
    kw = dict(n_edges=6, edge=flat(0.01, 2.0, 2.0), cost=CostCurve(0.01), replicas=3, max_batch_sessions=1,
              duration_s=30.0, max_new=16, think_s=0.3, seed=3)
    tpt = {r: simulate_fleet(FleetConfig(routing=r, **kw)).tpt_mean_s for r in ("least-loaded", "round-robin", "hash")}
    assert tpt["least-loaded"] < tpt["round-robin"] and tpt["least-loaded"] < tpt["hash"]


def test_admission_caps_open_sessions_per_replica_and_refused_edges_wait():
    res = simulate_fleet(FleetConfig(8, flat(), CostCurve(0.005), replicas=2, max_sessions_per_replica=2,
                                     duration_s=2.0, max_new=8))
    assert max(res.peak_open_per_replica) == 2
    assert res.refused > 0 and res.generations > 0


def test_cost_fit_recovers_a_known_curve():
    true = CostCurve(0.004, 0.001, 0.0002)
    rows = [(n, n * s, n * s * t, n * true.time(s, s * t)) for n, s, t in
            ((100, 1, 3), (80, 2, 5), (50, 4, 4), (40, 8, 6), (30, 16, 2))]
    fit = CostCurve.fit(rows)
    assert (fit.base_s, fit.per_session_s, fit.per_token_s) == pytest.approx((0.004, 0.001, 0.0002), rel=1e-6)


def test_the_h200_curve_is_labelled_a_model():
    assert "not measured" in CostCurve.h200_7b().label


@pytest.mark.parametrize("bad,name", [(dict(routing="random"), "routing"), (dict(mode="batch"), "mode"),
                                      (dict(n_edges=0), "n_edges"), (dict(max_sessions_per_replica=0),
                                                                     "max_sessions_per_replica"),
                                      (dict(replicas=2, replica_speed=(1.0,)), "replica_speed")])
def test_bad_settings_are_refused_by_name(bad, name):
    kw = {**dict(n_edges=1, edge=flat(), cost=CostCurve(0.01)), **bad}
    with pytest.raises(ValueError, match=name):
        FleetConfig(**kw)


# --- the shared host CPU (HostCPU) and the per-generation spread


def test_edges_that_fit_on_the_cores_run_as_if_the_host_were_not_modelled():
    # 2 edges, 2 cores: a core is always free, so no round ever waits for one.
    kw = dict(n_edges=2, edge=flat(0.01, 2.0, 2.0), cost=CostCurve(0.002), duration_s=3.0, max_new=16)
    free = simulate_fleet(FleetConfig(**kw))
    hosted = simulate_fleet(FleetConfig(**kw, host=HostCPU(2, edge_round_s=0.005, launch_s=0.001)))
    assert hosted.goodput_tok_s == pytest.approx(free.goodput_tok_s, rel=1e-9)
    assert hosted.tpt_p99_s == pytest.approx(free.tpt_p99_s, rel=1e-9)


def test_edges_whose_round_cpu_exceeds_the_cores_are_held_to_what_the_cores_can_do():
    # 16 edges x 5 ms CPU per ~21 ms round want ~3.8 cores of 2: rounds queue for a core and
    # goodput stops at cores / CPU per round x tokens per round.
    kw = dict(n_edges=16, edge=flat(0.01, 2.0, 2.0), cost=CostCurve(0.001), duration_s=3.0, max_new=16)
    free = simulate_fleet(FleetConfig(**kw))
    hosted = simulate_fleet(FleetConfig(**kw, host=HostCPU(2, edge_round_s=0.005)))
    assert hosted.goodput_tok_s <= 1.05 * (2 / 0.005) * 2.0
    assert hosted.goodput_tok_s < 0.7 * free.goodput_tok_s
    assert hosted.tpt_p50_s > 1.3 * free.tpt_p50_s


def test_edge_slots_serialize_edge_cpu_as_one_interpreter_lock_does():
    kw = dict(n_edges=8, edge=flat(0.01, 2.0, 2.0), cost=CostCurve(0.001), duration_s=3.0, max_new=16)
    cores = simulate_fleet(FleetConfig(**kw, host=HostCPU(4, edge_round_s=0.004)))
    gil = simulate_fleet(FleetConfig(**kw, host=HostCPU(4, edge_round_s=0.004, edge_slots=1)))
    assert gil.goodput_tok_s <= 1.05 * (1 / 0.004) * 2.0 < cores.goodput_tok_s


def test_a_padded_launch_holds_a_core_only_for_its_cpu_time():
    # One core; launches padded to 10 ms of which 0.5 ms is CPU: the padding is a sleep, so the
    # edges' rounds run beside it. The counterfactual (a launch whose 10 ms are all CPU) starves them.
    kw = dict(n_edges=4, edge=flat(0.015, 2.0, 2.0), cost=CostCurve(0.0, floor_s=0.010), duration_s=4.0, max_new=16)
    free = simulate_fleet(FleetConfig(**kw))
    padded = simulate_fleet(FleetConfig(**kw, host=HostCPU(1, edge_round_s=0.002, launch_s=0.0005)))
    busy = simulate_fleet(FleetConfig(**kw, host=HostCPU(1, edge_round_s=0.002, launch_s=0.010)))
    assert padded.tpt_mean_s == pytest.approx(free.tpt_mean_s, rel=0.1)
    assert busy.tpt_mean_s > 1.15 * free.tpt_mean_s


def test_background_cpu_takes_its_share_of_the_cores():
    kw = dict(n_edges=8, edge=flat(0.01, 2.0, 2.0), cost=CostCurve(0.001), duration_s=3.0, max_new=16)
    alone = simulate_fleet(FleetConfig(**kw, host=HostCPU(1, edge_round_s=0.004)))
    shared = simulate_fleet(FleetConfig(**kw, host=HostCPU(1, edge_round_s=0.004, background_cores=0.5)))
    assert shared.goodput_tok_s == pytest.approx(0.5 * alone.goodput_tok_s, rel=0.15)


def test_a_spread_varies_tpt_across_generations_around_the_same_mean():
    em = flat(0.01, 2.0, 2.0)
    kw = dict(n_edges=1, cost=CostCurve(0.002), duration_s=20.0, max_new=16)
    even = simulate_fleet(FleetConfig(edge=em, **kw))
    spread = simulate_fleet(FleetConfig(edge=dataclasses.replace(em, spread=(0.5, 1.5)), **kw))
    assert even.tpt_p99_s == pytest.approx(even.tpt_p50_s, rel=1e-6)
    assert spread.tpt_p99_s == pytest.approx(1.5 * even.tpt_mean_s, rel=0.05)
    assert spread.tpt_mean_s == pytest.approx(even.tpt_mean_s, rel=0.05)


@pytest.mark.parametrize("bad,name", [(dict(cores=0), "cores"), (dict(edge_round_s=-1.0), "edge_round_s"),
                                      (dict(background_cores=2.0), "background_cores"),
                                      (dict(edge_slots=0), "edge_slots")])
def test_bad_host_settings_are_refused_by_name(bad, name):
    with pytest.raises(ValueError, match=name):
        HostCPU(**{"cores": 2, **bad})


def test_a_bad_spread_is_refused_by_name():
    with pytest.raises(ValueError, match="spread"):
        dataclasses.replace(flat(), spread=(1.0, 0.0))
