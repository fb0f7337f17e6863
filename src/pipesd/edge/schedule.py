"""The adaptive schedule (method ``pipesd-adaptive``): the edge picks, per generation, the
schedule the TPT model says is fastest within a cloud budget.

Why: no one schedule wins everywhere (docs/tuning.md, "Which schedule wins where"). A pipelined
edge commits at most one draft per draft step ``g``; a serial round gets the target's bonus token
free, which wins when the round trip plus a verification is shorter than ``g`` (a slow edge); a
cloud that decodes alone and streams is the latency floor on a fast cloud, at the highest cloud
cost. So the edge measures its costs and lets the model (:func:`pipesd.tuning.sim.simulate_tpt`,
the protocol's own classes on a virtual clock) rank the candidates.

Terms:

- **candidate**: one schedule the runtime already runs losslessly, as a method preset:
  ``pipelined`` (``pipesd``: pipeline, DP batches, the dual trigger at the configured
  thresholds), ``serial-K`` (``vanilla-sd`` with draft length K = 1..8: draft, send, wait; the
  bonus is free), ``serial-dual`` (``dual-no-pipeline``), ``serial-hsl`` (``hsl``: serial,
  stopping at the first token below HSL's token threshold), ``tree-KxW`` (``tree-sd``:
  serial-K's spine plus W - 1 sibling leaves where the draft is unsure; offered once this
  connection has measured that a sibling would have rescued some corrections) and
  ``cloud-stream``; with ``lookup="auto"`` (the default), also ``pipelined+lookup`` and
  ``serial-K+lookup``: the same schedules with prompt-lookup proposals
  (:mod:`pipesd.edge.lookup`), offered once a run has measured what lookup would propose
  (the other candidates run with lookup in ``shadow``: the draft model drafts every token and
  the proposals lookup would have made are scored against the target's tokens). The choice only
  selects among them, so it cannot make a run lossy.
- **cloud cost**: the cloud's busy milliseconds per generated token (verification time as the
  cloud reports it in each verdict, ``Verdict.verify_s``).
- **budget**: the most cloud cost a user allows (``EdgeConfig.cloud_budget_ms_per_token``);
  ``None`` means what vanilla SD at its best K would spend (the model's best serial-K), so the
  adaptive edge is never costlier than the baseline a user would otherwise pick.
- **costs**: what the model is fed, all measured on this connection: ``g`` (the edge's
  :class:`pipesd.scheduling.CostModel`, padding included), uplink ``s`` and ``c`` (same),
  the one-way delay (half the handshake round trip, the smallest seen), the cloud's
  verification time against drafts per verification (least squares over past generations) and
  the per-position agreement of draft and target (accepted / (accepted + rejections), the
  draft model's own drafts only), and lookup's rate (its proposals per draft) and precision
  (its proposals equal to the target's token, per verified one).

- **calibration**: per method, the measured TPT (and cloud cost) of the generations that ran
  it over what the model predicts for them, each prediction made at that generation's own
  agreement (so an easy prompt does not read as a fast schedule), decayed, and shrunk towards 1
  by one pseudo-generation. The ranking multiplies each candidate's prediction by its method's
  factor: a schedule the model flatters is measured once and dropped, and a near tie (the model's
  error is a few percent) goes to what measures faster.

The first generation on a connection runs ``pipelined`` (nothing is measured yet); after each
generation the costs and the calibration are updated and, when the costs moved by more than
``drift``, a factor by more than ``recalibrate`` (or on the first measurement), the model is re-run
on a background thread: the choice for the next generation is the last one it finished, so no
generation waits for the model.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from pipesd.edge.config import HSL_TAU_TOK

TREE_CONFIDENCE = 0.8  # the tree candidates' (and the rescue measurement's) confidence threshold

__all__ = ["Costs", "Candidate", "Choice", "AdaptiveSchedule", "choose", "SERIAL_K"]

SERIAL_K = tuple(range(1, 9))  # draft lengths of the serial-K candidates
_FIELDS_KEPT = ("draft_step_s", "wire_q", "verdict_timeout_s", "ring_capacity", "record_timeline", "offline_policy",
                "reconnect_initial_s", "reconnect_max_s", "offline_wait_s", "lookahead", "lookup", "lookup_max_n",
                "lookup_min_n", "lookup_max_tokens", "lookup_confidence", "lookup_confirm")


@dataclass(frozen=True)
class Costs:
    """What the model is fed (seconds; ``agreement``: P(draft == target) per position)."""

    gen_s: float
    delay_s: float
    verify_base_s: float
    verify_per_token_s: float = 0.0
    startup_s: float = 0.0
    per_token_s: float = 0.0
    agreement: float = 0.9
    unsure: float = 0.0  # share of drafts below the tree confidence
    rescue_w2: float = 0.0  # share of corrections a width-2 tree would have rescued (its sibling)
    rescue_w3: float = 0.0  # ... a width-3 tree
    lookup_rate: float = 0.0  # share of drafts lookup proposes (0: unmeasured, no lookup candidates)
    lookup_precision: float = 0.0  # share of lookup proposals equal to the target's token

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        for k in ("agreement", "unsure", "rescue_w2", "rescue_w3", "lookup_rate", "lookup_precision"):
            if getattr(self, k) > 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)!r}")

    def drifted(self, other: "Costs", rel: float) -> bool:
        """True when any cost differs from ``other``'s by more than ``rel`` (relative, with a
        0.5 ms / 0.02 floor so that tiny costs do not count as drift)."""
        for k, v in asdict(self).items():
            w = getattr(other, k)
            floor = 0.02 if k in ("agreement", "lookup_rate", "lookup_precision") else 5e-4
            if abs(v - w) > rel * max(abs(w), floor):
                return True
        return False


@dataclass(frozen=True)
class Candidate:
    """One schedule, its preset (``method`` + ``overrides`` for :meth:`EdgeConfig.for_method`)
    and what the model predicts for it."""

    name: str
    method: str
    overrides: tuple = ()
    tpt_ms: float = 0.0
    cloud_ms_per_token: float = 0.0


@dataclass(frozen=True)
class Choice:
    """The model's ranking and the pick: ``chosen`` is the fastest candidate whose cloud cost is
    within ``budget_ms`` (or the cheapest one when none is)."""

    chosen: Candidate
    budget_ms: float
    reason: str
    candidates: tuple = ()
    costs: Optional[Costs] = None
    asked: Optional[float] = None  # the budget as configured (None: vanilla SD's)
    calibration: tuple = ()  # ((method, tpt factor, cloud factor), ...) the ranking applied

    def to_dict(self) -> dict:
        return {"schedule": self.chosen.name, "method": self.chosen.method, "reason": self.reason,
                "budget_ms_per_token": self.budget_ms, "predicted_tpt_ms": self.chosen.tpt_ms,
                "predicted_cloud_ms_per_token": self.chosen.cloud_ms_per_token,
                "costs": asdict(self.costs) if self.costs is not None else None,
                "calibration": {m: {"tpt": round(t, 4), "cloud": round(c, 4)} for m, t, c in self.calibration},
                "candidates": [{"name": c.name, "tpt_ms": round(c.tpt_ms, 3),
                                "cloud_ms_per_token": round(c.cloud_ms_per_token, 3)} for c in self.candidates]}


def _hard_frac(agreement: float) -> float:
    """The model's share of contested tokens that gives a per-position agreement ``agreement``
    (confident tokens agree 0.984 of the time, contested ones 0.5: :class:`SimConfig`)."""
    return min(1.0, max(0.0, (30.0 / 30.5 - agreement) / (30.0 / 30.5 - 0.5)))


def _model(costs: Costs, seed: int, segments: int):
    from pipesd.tuning.sim import SimConfig

    return SimConfig(gen_s=costs.gen_s, startup_s=costs.startup_s, per_token_s=costs.per_token_s,
                     delay_s=costs.delay_s, verify_base_s=costs.verify_base_s,
                     verify_per_token_s=costs.verify_per_token_s, hard_frac=_hard_frac(costs.agreement),
                     segments=segments, seed=seed)


LOOKUP = "+lookup"  # the name suffix of a candidate with prompt-lookup proposals


def candidates(costs: Costs, tau: tuple = (0.35, 0.5), *, max_draft: int = 16, lookahead: int = 48,
               segments: int = 400, seed: int = 0, only: Optional[str] = None, lookup: str = "off",
               lookup_confidence: float = 0.9) -> list[Candidate]:
    """Every candidate with the model's TPT and cloud cost for ``costs`` (``only``: just the one
    of that name, an empty list when there is none). ``lookup``: ``"off"`` (or ``"shadow"``)
    offers none with lookup; ``"auto"`` adds the ``+lookup`` variants of ``pipelined`` and
    ``serial-K`` once ``costs.lookup_rate`` is measured; ``"ngram"`` models every drafting
    candidate with lookup (the user's choice: each of them runs it)."""
    from pipesd.tuning.sim import simulate_tpt

    cfg = _model(costs, seed, segments)
    with_lookup = replace(cfg, lookup_rate=costs.lookup_rate, lookup_precision=costs.lookup_precision,
                          lookup_confidence=lookup_confidence)
    if lookup == "ngram":
        cfg = with_lookup
    variants = lookup == "auto" and costs.lookup_rate > 0
    out = []

    def add(name, method, overrides, pipeline, batching, ts, tt, md, model=cfg):
        if only is not None and only != name and not (name.startswith("serial-") and only.startswith(
                "tree-") and only.split("x")[0][5:] == name[7:]):  # a tree-KxW needs serial-K's rounds
            return None
        r = simulate_tpt(ts, tt, replace(model, pipeline=pipeline, batching=batching, max_draft=md,
                                         lookahead=lookahead))
        out.append(Candidate(name, method, tuple(sorted(overrides.items())), r.tpt_s * 1e3,
                             r.cloud_busy_per_token_s * 1e3))
        return r

    def add_lookup(name, method, overrides, *args):
        if variants:
            add(name + LOOKUP, method, {**overrides, "lookup": "ngram"}, *args, model=with_lookup)

    add("pipelined", "pipesd", {}, True, "dp", tau[0], tau[1], max_draft)
    add_lookup("pipelined", "pipesd", {}, True, "dp", tau[0], tau[1], max_draft)
    add("serial-dual", "dual-no-pipeline", {}, False, "dp", tau[0], tau[1], max_draft)
    # HSL's rule: serial, stop at the first token below its token threshold, send the lot.
    add("serial-hsl", "hsl", {"tau_tok": HSL_TAU_TOK}, False, "trigger", 0.0, HSL_TAU_TOK, max_draft)
    for k in SERIAL_K:
        add_lookup(f"serial-{k}", "vanilla-sd", {"k": k}, False, "trigger", 0.0, 0.0, k)
        r = add(f"serial-{k}", "vanilla-sd", {"k": k}, False, "trigger", 0.0, 0.0, k)
        if r is None:
            continue
        for w, rescue in ((2, costs.rescue_w2), (3, costs.rescue_w3)):
            if rescue > 0:
                out.append(_tree(k, w, rescue, r, costs))
    # The cloud decodes alone: one target forward (a zero-draft job) per token; the round trip
    # is paid once per generation, so it is left out per token.
    stream = costs.verify_base_s * 1e3
    out.append(Candidate("cloud-stream", "cloud-stream", (), stream, stream))
    return out if only is None else [c for c in out if c.name == only]


def family(c: Candidate) -> str:
    """The calibration's key: the method, with ``+lookup`` for a lookup variant (lookup changes
    what the model gets wrong: its runs of copies are not modelled)."""
    return c.method + (LOOKUP if c.name.endswith(LOOKUP) else "")


def calibrated(cands: list[Candidate], calibration: Optional[dict]) -> list[Candidate]:
    """``cands`` with each prediction multiplied by its family's ``(tpt, cloud)`` factor."""
    if not calibration:
        return list(cands)
    out = []
    for c in cands:
        t, k = calibration.get(family(c), (1.0, 1.0))
        out.append(replace(c, tpt_ms=c.tpt_ms * t, cloud_ms_per_token=c.cloud_ms_per_token * k))
    return out


def _tree(k: int, w: int, rescue: float, r, costs: Costs) -> Candidate:
    """``tree-KxW`` (``tree-sd``: serial-K's spine plus W - 1 siblings at unsure positions), from
    serial-K's modelled rounds: the same draft and wire time per round, plus one token in each
    rejected round a sibling rescues (``rescue``, measured), plus the siblings' verification cost
    (``verify_per_token_s`` each; ``unsure`` of the spine has siblings)."""
    rounds, tokens = max(1, r.verifications), max(1, r.tokens)
    gained = tokens + rescue * r.rollbacks
    dv = costs.verify_per_token_s * k * (w - 1) * costs.unsure  # per round
    tpt = (r.tpt_s * tokens + rounds * dv) / gained
    cloud = (r.cloud_busy_per_token_s * tokens + rounds * dv) / gained
    return Candidate(f"tree-{k}x{w}", "tree-sd", (("k", k), ("tree_confidence", TREE_CONFIDENCE), ("tree_width", w)),
                     tpt * 1e3, cloud * 1e3)


def vanilla_budget(cands: list[Candidate]) -> float:
    """What vanilla SD at its best K spends: the cloud cost of the fastest serial-K candidate."""
    best = min((c for c in cands if c.method == "vanilla-sd"), key=lambda c: c.tpt_ms)
    return best.cloud_ms_per_token


def choose(costs: Costs, budget_ms: Optional[float] = None, tau: tuple = (0.35, 0.5), *,
           calibration: Optional[dict] = None, **kw) -> Choice:
    """Rank the candidates for ``costs`` and pick the fastest within ``budget_ms`` (None: what
    vanilla SD at its best K would spend; ``math.inf``: no limit). ``calibration``: method ->
    (TPT factor, cloud factor), measured over modelled (:meth:`AdaptiveSchedule.calibration`)."""
    cands = calibrated(candidates(costs, tau, **kw), calibration)
    default = budget_ms is None
    budget = vanilla_budget(cands) if default else float(budget_ms)
    tol = 1e-6 + 0.02 * budget  # the model's noise: 2% over the budget still counts as within it
    ok = [c for c in cands if c.cloud_ms_per_token <= budget + tol]
    if ok:
        pick = min(ok, key=lambda c: (c.tpt_ms, c.cloud_ms_per_token))
        fastest = min(cands, key=lambda c: c.tpt_ms)
        why = (f"{pick.name}: fastest within the cloud budget ({budget:.2f} ms/token"
               f"{', what vanilla SD at its best K spends' if default else ''})")
        if fastest is not pick:
            why += f"; {fastest.name} would be faster ({fastest.tpt_ms:.1f} ms) at {fastest.cloud_ms_per_token:.2f} ms/token"
    else:
        pick = min(cands, key=lambda c: (c.cloud_ms_per_token, c.tpt_ms))
        why = f"{pick.name}: no schedule fits the cloud budget ({budget:.2f} ms/token); the cheapest one"
    why += (f" [g {costs.gen_s * 1e3:.1f} ms, round trip {2 * costs.delay_s * 1e3:.1f} ms, verify "
            f"{costs.verify_base_s * 1e3:.1f} ms, agreement {costs.agreement:.2f}")
    cal = tuple(sorted((m, t, k) for m, (t, k) in (calibration or {}).items()))
    if cal:
        why += "; measured/modelled TPT " + ", ".join(f"{m} {t:.2f}" for m, t, _ in cal)
    return Choice(pick, budget, why + "]", tuple(cands), costs, budget_ms, cal)


@dataclass
class _Observed:
    """Running sums over past generations (a window of the last ``window`` verifications)."""

    accepted: float = 0.0
    rejections: float = 0.0
    drafted: float = 0.0
    unsure: float = 0.0
    rescued: dict = field(default_factory=lambda: {2: [0.0, 0.0], 3: [0.0, 0.0]})  # width -> [rescued, corrections]
    lookup: list = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # [proposed, drafted, verified, right]
    points: list = field(default_factory=list)  # (mean drafts per verification, mean verify_s, verifications)


def _model_drafts(stats) -> tuple[int, int]:
    """(accepted, rejections) of the draft model's own drafts: a generation's counts less its
    lookup proposals' (lookup has a precision of its own, :attr:`Costs.lookup_precision`)."""
    acc = stats.accepted_drafts - getattr(stats, "lookup_accepted", 0)
    rej = getattr(stats, "rejections", 0) - getattr(stats, "lookup_rejected", 0)
    return max(0, acc), max(0, rej)


class AdaptiveSchedule:
    """Per-connection state of ``pipesd-adaptive`` (see the module docstring). ``background``:
    re-run the model on a thread (the runtime); False runs it inline (tests, tools)."""

    CAL_DECAY = 0.7  # weight of the older generations of a method at each new one
    CAL_CLAMP = (0.67, 1.5)  # a factor outside this is a measurement gone wrong, not model error

    def __init__(self, *, drift: float = 0.15, background: bool = True, window: int = 512,
                 recalibrate: float = 0.02, lookup_allowed: bool = True) -> None:
        if not 0 < drift < 10:
            raise ValueError(f"drift must be in (0, 10), got {drift!r}")
        if not 0 < recalibrate < 10:
            raise ValueError(f"recalibrate must be in (0, 10), got {recalibrate!r}")
        self.drift = drift
        self.recalibrate = recalibrate
        # False: the draft cannot run lookup (a replayed draft serves recorded sequences only, and
        # a wrong lookup token leaves them), so lookup "auto" offers no lookup candidate.
        self.lookup_allowed = lookup_allowed
        self._calib: dict = {}  # method -> [measured TPT ms, modelled TPT ms, measured cloud, modelled cloud, weight]
        self._pending: list = []  # (schedule, costs at its agreement, TPT ms, cloud ms/token) not yet calibrated
        self.background = background
        self.window = window
        self.choice: Optional[Choice] = None
        self.history: list = []  # (generation index, schedule name) at each change
        self._obs = _Observed()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._generations = 0
        self.delay_s: Optional[float] = None  # one-way delay: half the smallest handshake round trip

    # ---------------------------------------------------------------- the choice
    def config_for(self, cfg):
        """The concrete EdgeConfig for the next generation of a ``pipesd-adaptive`` config."""
        from pipesd.edge.config import EdgeConfig

        choice = self.choice
        if choice is not None and choice.asked != cfg.cloud_budget_ms_per_token:
            choice = None  # made for another budget: the next observation re-chooses
        name, method, overrides = ("pipelined", "pipesd", ()) if choice is None else (
            choice.chosen.name, choice.chosen.method, choice.chosen.overrides)
        t, ov = cfg.trigger, dict(overrides)
        if "lookup" not in ov:  # auto: the candidates without lookup measure it in shadow
            ov["lookup"] = {"auto": "shadow" if self.lookup_allowed else "off"}.get(cfg.lookup, cfg.lookup)
        kept = {k: getattr(cfg, k) for k in _FIELDS_KEPT if k not in ov}
        taus = {k: ov.pop(k, getattr(t, k)) for k in ("tau_seq", "tau_tok")}  # a candidate's own thresholds win
        concrete = EdgeConfig.for_method(method, **taus, **kept, **ov)
        return concrete, name, (choice.reason if choice is not None else
                                "pipelined: the default until this connection's costs are measured")

    # ---------------------------------------------------------------- measuring
    def observe_rtt(self, rtt_s: Optional[float]) -> None:
        if rtt_s is not None and rtt_s >= 0:
            d = rtt_s / 2
            self.delay_s = d if self.delay_s is None else min(self.delay_s, d)

    def costs(self, cost_model) -> Optional[Costs]:
        """The measured costs, or None while something is unmeasured (no draft step or no
        verdict yet)."""
        o = self._obs
        if not o.points or cost_model.gen_s <= 0:
            return None
        n = sum(w for _, _, w in o.points)
        mx = sum(x * w for x, _, w in o.points) / n
        my = sum(y * w for _, y, w in o.points) / n
        sxx = sum(w * (x - mx) ** 2 for x, _, w in o.points)
        slope = max(0.0, sum(w * (x - mx) * (y - my) for x, y, w in o.points) / sxx) if sxx > 1e-9 else 0.0
        base = max(0.0, my - slope * mx)
        total = o.accepted + o.rejections
        agreement = o.accepted / total if total else 0.9
        rescue = {w: (a / b if b else 0.0) for w, (a, b) in o.rescued.items()}
        proposed, drafted, checked, right = o.lookup
        measured = checked > 0 and drafted > 0
        return Costs(gen_s=cost_model.gen_s, delay_s=self.delay_s or 0.0, verify_base_s=base,
                     verify_per_token_s=slope, startup_s=max(0.0, cost_model.startup_s),
                     per_token_s=max(0.0, cost_model.per_token_s), agreement=agreement,
                     unsure=min(1.0, o.unsure / o.drafted) if o.drafted else 0.0,
                     rescue_w2=min(1.0, rescue[2]), rescue_w3=min(1.0, rescue[3]),
                     lookup_rate=min(1.0, proposed / drafted) if measured else 0.0,
                     lookup_precision=min(1.0, right / checked) if measured else 0.0)

    def observe(self, stats, cost_model, cfg, *, calibrate: bool = True) -> None:
        """Fold a finished generation's stats in; re-run the model when the costs drifted or a
        calibration factor moved. ``calibrate=False`` (a cancelled generation) and a generation
        that went offline are left out of the calibration: their TPT is not the schedule's."""
        self._generations += 1
        o = self._obs
        if stats.verifications:
            o.points.append((stats.verified_drafts / stats.verifications, stats.cloud_busy_s / stats.verifications,
                             stats.verifications))
            while sum(w for _, _, w in o.points) > self.window and len(o.points) > 1:
                o.points.pop(0)
        own_acc, own_rej = _model_drafts(stats)
        if stats.verified_drafts:
            keep = 1.0 if o.accepted + o.rejections < self.window else 0.5  # forget old acceptance slowly
            o.accepted = o.accepted * keep + own_acc
            o.rejections = o.rejections * keep + own_rej
            self._observe_trees(stats, cfg, keep)
            self._observe_lookup(stats, keep)
        tau = (cfg.trigger.tau_seq, cfg.trigger.tau_tok)
        costs = self.costs(cost_model)
        if costs is None:
            return
        if calibrate and stats.schedule and stats.new_tokens > 0 and stats.tpt_s > 0 \
                and not stats.offline_episodes and not stats.unverified_tokens:
            seen = own_acc + own_rej
            own = replace(costs, agreement=own_acc / seen) if seen else costs
            la, lr = getattr(stats, "lookup_accepted", 0), getattr(stats, "lookup_rejected", 0)
            if la + lr and stats.drafted:  # a lookup run: its own rate and precision
                own = replace(own, lookup_rate=min(1.0, getattr(stats, "lookup_proposals", 0) / stats.drafted),
                              lookup_precision=la / (la + lr))
            with self._lock:
                self._pending.append((stats.schedule, own, stats.tpt_s * 1e3,
                                      stats.cloud_busy_s / stats.new_tokens * 1e3))
        mode = cfg.lookup if cfg.lookup != "auto" or self.lookup_allowed else "off"
        job = (costs, cfg.cloud_budget_ms_per_token, tau,
               dict(max_draft=cfg.trigger.max_draft, lookahead=cfg.lookahead, lookup=mode,
                    lookup_confidence=cfg.lookup_confidence))
        if not self.background:
            self._update(*job)
            return
        if self._thread is not None and self._thread.is_alive():
            return  # the model is still running on older costs; the next generation re-checks
        self._thread = threading.Thread(target=self._update, args=job, name="pipesd-schedule", daemon=True)
        self._thread.start()

    def calibration(self) -> dict:
        """method -> (TPT factor, cloud factor): measured over modelled, shrunk towards 1 by one
        pseudo-generation at the mean prediction, clamped to :attr:`CAL_CLAMP`."""
        lo, hi = self.CAL_CLAMP
        out = {}
        for m, (mt, pt, mc, pc, w) in self._calib.items():
            if pt <= 0 or w <= 0:
                continue
            t = (mt + pt / w) / (pt + pt / w)
            c = (mc + pc / w) / (pc + pc / w) if pc > 0 else 1.0
            out[m] = (min(hi, max(lo, t)), min(hi, max(lo, c)))
        return out

    def _calibrate(self, name: str, costs: Costs, tpt_ms: float, cloud_ms: float, tau: tuple, kw: dict) -> None:
        got = candidates(costs, tau, only=name, **kw)
        if not got or got[0].tpt_ms <= 0:
            return  # a schedule the model does not rank (a user's fixed method, a stale name)
        c = got[0]
        old = self._calib.get(family(c), [0.0] * 5)
        new = (tpt_ms, c.tpt_ms, cloud_ms, c.cloud_ms_per_token, 1.0)
        self._calib[family(c)] = [x * self.CAL_DECAY + y for x, y in zip(old, new)]

    def _update(self, costs: Costs, budget, tau: tuple, kw: dict) -> None:
        """Fold the pending generations into the calibration, then re-rank when the costs
        drifted or a factor moved (the background thread, or inline)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for name, own, tpt_ms, cloud_ms in pending:
            self._calibrate(name, own, tpt_ms, cloud_ms, tau, kw)
        cal = self.calibration()
        last = self.choice
        if last is not None and last.asked == budget and last.costs is not None \
                and not costs.drifted(last.costs, self.drift) and not self._moved(cal, last.calibration):
            return
        self._set(choose(costs, budget, tau, calibration=cal, **kw))

    def _moved(self, cal: dict, used: tuple) -> bool:
        before = {m: (t, c) for m, t, c in used}
        if set(before) != set(cal):
            return True
        return any(abs(cal[m][i] - before[m][i]) > self.recalibrate * before[m][i] for m in cal for i in (0, 1))

    def _observe_lookup(self, stats, keep: float) -> None:
        """Lookup's rate and precision: from a lookup run, its proposals and their verdicts; from
        a run with lookup in shadow, what it would have proposed and how much of that was right."""
        lk = self._obs.lookup
        n = {k: getattr(stats, "lookup_" + k, 0) for k in ("proposals", "accepted", "rejected", "shadow",
                                                             "shadow_checked", "shadow_right")}
        real = n["accepted"] + n["rejected"]
        if not (n["shadow_checked"] or real):
            return
        lk[:] = [x * keep for x in lk]
        lk[0] += n["proposals"] + n["shadow"]
        lk[1] += stats.drafted
        lk[2] += real + n["shadow_checked"]
        lk[3] += n["accepted"] + n["shadow_right"]

    def _observe_trees(self, stats, cfg, keep: float) -> None:
        """The tree candidates' inputs: from a chain run, the corrections a tree would have
        rescued (``stats.rescued_w2/w3``, measured in the compute thread); from a ``tree-sd`` run
        of width W, its sibling hits among its hits + corrections."""
        o = self._obs
        for w in o.rescued:
            o.rescued[w] = [x * keep for x in o.rescued[w]]
        picked = getattr(stats, "schedule", "") or ""
        if picked.startswith("tree-"):  # tree-KxW
            w = int(picked.rsplit("x", 1)[1])
            if w in o.rescued:
                hits = stats.tree_sibling_hits
                o.rescued[w][0] += hits
                o.rescued[w][1] += hits + stats.rejections
            return
        o.drafted = o.drafted * keep + stats.drafted
        o.unsure = o.unsure * keep + stats.unsure_drafts
        o.rescued[2][0] += stats.rescued_w2
        o.rescued[3][0] += stats.rescued_w3
        for w in o.rescued:
            o.rescued[w][1] += stats.rejections

    def _set(self, choice: Choice) -> None:
        with self._lock:
            if self.choice is None or self.choice.chosen.name != choice.chosen.name:
                self.history.append((self._generations, choice.chosen.name))
            self.choice = choice

    def wait(self, timeout_s: float = 30.0) -> None:
        """Wait for a model run in progress (tests, benchmarks' warm-up)."""
        t = self._thread
        if t is not None:
            t.join(timeout_s)
