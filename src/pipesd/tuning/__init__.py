"""Online tuning of the dual-threshold NAV trigger ``(tau_seq, tau_tok)`` (PipeSD mechanism 3).

- :class:`BayesTuner`: synchronous ask/tell core, GP + expected improvement (scikit-optimize),
  deterministic for a seed; converges after ``max_evals`` evaluations and holds its best point.
- :class:`FixedTuner`: the same interface holding one point (``tuner="fixed"``).
- :class:`OnlineTuner`: what the edge runs: windows of committed tokens on the caller's thread,
  fits on a worker thread, re-tuning when the cost model drifts.
- :func:`simulate_tpt`: a *model* of TPT as a function of the thresholds, for tests, benchmarks
  and docs (never a measurement).

See ``docs/tuning.md``.
"""
from pipesd.tuning.bayes import DEFAULT_BOX, BayesTuner, FixedTuner, TunerCore, check_box
from pipesd.tuning.online import COST_KEYS, OnlineTuner, make_online_tuner
from pipesd.tuning.sim import SimConfig, SimResult, grid_search, simulate_tpt

__all__ = ["DEFAULT_BOX", "BayesTuner", "FixedTuner", "TunerCore", "check_box", "COST_KEYS", "OnlineTuner",
           "make_online_tuner", "SimConfig", "SimResult", "grid_search", "simulate_tpt"]
