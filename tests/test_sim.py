"""The fleet simulator (pipesd.sim): its bounds, its agreement with the single-edge model, and
what routing and admission do. Simulated time only: nothing here measures the machine."""
import pytest

from pipesd.sim import CostCurve, EdgeModel, FleetConfig, capacity_bound, simulate_fleet
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
