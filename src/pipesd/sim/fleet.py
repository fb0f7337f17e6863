"""Many edges, R verifier replicas, routing and admission, on a SimPy clock.

**A model, not a measurement.** What it adds to the single-edge model
(:mod:`pipesd.tuning.sim`) is the shared cloud: queueing, cross-session batching, routing and
admission. The edge itself is not re-derived here: an :class:`EdgeModel` says, for a cloud
latency ``L`` (queue wait + launch time, as one verification sees it), how long one edge's
verification cycle is, how many tokens it commits and how many drafts it sends for scoring.
:meth:`EdgeModel.from_single_edge` reads that off :func:`pipesd.tuning.sim.simulate_tpt` (the
runtime's own trigger, batcher and continuation rule) at a grid of latencies;
:meth:`EdgeModel.from_measured` builds it from one measured single-edge point.

Each edge runs generations back to back until ``duration_s`` (then finishes the one it is in).
A generation opens a session on a replica chosen by the router (once: every job of the session
goes to that replica, as the fleet's session affinity does), subject to admission (at most
``max_sessions_per_replica`` open; a refused edge retries after ``retry_s``). A PipeSD session
repeats: the edge-side part of the cycle (``cycle(L) - L`` with ``L`` the last latency seen),
then one verification job of ``drafts(L)`` tokens, committing ``tokens(L)``; at most one job per
session is out (the cycle curve already holds the overlap that pipelining buys). A cloud-stream
session is one job the replica advances one token per launch until its budget is done.

A replica takes every queued job (one per session) up to ``max_batch_sessions`` into one launch
of ``CostCurve.time(sessions, tokens)`` seconds, one launch at a time.

**Host CPU** (:class:`HostCPU`, off unless ``FleetConfig.host`` is set): edges and replicas on
one machine share its cores. Each edge round holds a core (and, for edges that are threads of one
Python process, the one interpreter lock) for its CPU time; each launch holds a core for its CPU
time and lasts ``max(CostCurve.time, wait + cpu)``: the padding of a padded verifier is a sleep and
holds none. Both CPU times are already inside the single-edge cycle and the fitted curve, so an
idle host changes nothing; only the waits for a core are new. A GPU projection leaves it off
(each replica has a host of its own and the edges are separate devices).

**Per-generation spread** (``EdgeModel.spread``): generation ``g`` of edge ``i`` commits
``tokens(L) / spread[(i + g) % len]`` per verification (the bench rotates its prompts the same
way), so TPT varies across generations as measured instead of being one constant.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import simpy

__all__ = ["ROUTING", "CostCurve", "EdgeModel", "FleetConfig", "FleetResult", "HostCPU", "capacity_bound",
           "simulate_fleet"]

#: Routing policies for new sessions.
ROUTING = ("least-loaded", "jsq", "hash", "round-robin")


@dataclass(frozen=True)
class CostCurve:
    """Seconds per verifier launch: ``max(floor_s, base_s + per_session_s * sessions +
    per_token_s * tokens)``; ``tokens`` = target positions scored in the launch (drafts + 1 per
    session). ``gap_s + gap_per_session_s * sessions``: the replica's time per launch outside
    verification (taking jobs, applying verdicts and sending them), not counted as busy. ``label``
    says where it came from (a fit to a measurement, or a model)."""

    base_s: float
    per_session_s: float = 0.0
    per_token_s: float = 0.0
    floor_s: float = 0.0
    label: str = ""
    gap_s: float = 0.0
    gap_per_session_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("base_s", "per_session_s", "per_token_s", "floor_s", "gap_s", "gap_per_session_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def time(self, sessions: int, tokens: float) -> float:
        return max(self.floor_s, self.base_s + self.per_session_s * sessions + self.per_token_s * tokens)

    def gap(self, sessions: int) -> float:
        return self.gap_s + self.gap_per_session_s * sessions

    @classmethod
    def fit(cls, rows: Sequence[Sequence[float]], floor_s: float = 0.0, label: str = "fit") -> "CostCurve":
        """Least squares on ``(launches, sessions, tokens, busy_s)`` totals (one row per measured
        point: the server's counters), coefficients clipped at 0. The padding floor is not fitted:
        give it (``serve --verify-pad-ms``); rows whose mean launch sits at the floor tell nothing
        about the slope and are left out when others remain."""
        import numpy as np

        rows = [r for r in rows if r[0] > 0]
        if not rows:
            raise ValueError("rows: no point with launches > 0")
        above = [r for r in rows if r[3] / r[0] > 1.05 * floor_s]
        use = above if len(above) >= 3 or floor_s == 0 else rows
        a = np.array([[r[0], r[1], r[2]] for r in use], dtype=float)
        y = np.array([r[3] for r in use], dtype=float)
        coef = np.linalg.lstsq(a, y, rcond=None)[0] if len(use) >= 3 else np.array([y.sum() / a[:, 0].sum(), 0, 0])
        if (coef < 0).any():  # refit without the negative terms
            keep = coef >= 0
            sub = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
            coef = np.zeros(3)
            coef[keep] = np.clip(sub, 0, None)
        return cls(float(coef[0]), float(coef[1]), float(coef[2]), floor_s, label)

    @classmethod
    def h200_7b(cls) -> "CostCurve":
        """MODELLED, NOT MEASURED: a 7B fp16 target on one H200 (no GPU was lent to measure one).
        Weights 14 GB read once per launch at ~3.3 TB/s effective (of 4.8) = 4.2 ms, plus ~2 ms
        launch/framework overhead; per session ~0.15 ms (its KV cache, ~0.5 MB/token at 1k context,
        and packing); per scored token ~0.03 ms (14 GFLOP at ~450 TFLOP/s effective bf16)."""
        return cls(0.0062, 0.00015, 0.00003, 0.0, "MODEL: 7B fp16 target on one H200 (not measured)")


@dataclass(frozen=True)
class EdgeModel:
    """One edge's verification cycle as a function of cloud latency ``L``, on a grid (linear
    interpolation, linear extrapolation past the last point with the last slope)."""

    latency_s: tuple
    cycle_s: tuple
    tokens: tuple  # tokens committed per verification
    drafts: tuple  # drafts scored per verification
    up_s: float = 0.0  # stream mode: request to the cloud
    down_s: float = 0.0  # stream mode: last token back
    label: str = ""
    spread: tuple = ()  # per-generation TPT factors (mean 1), rotated per edge; () = every generation alike

    def __post_init__(self) -> None:
        n = len(self.latency_s)
        if n < 2 or any(len(x) != n for x in (self.cycle_s, self.tokens, self.drafts)):
            raise ValueError("latency_s, cycle_s, tokens and drafts must be of one length >= 2")
        if any(b <= a for a, b in zip(self.latency_s, self.latency_s[1:])):
            raise ValueError("latency_s must be increasing")
        if min(self.tokens) <= 0 or min(self.cycle_s) <= 0:
            raise ValueError("tokens and cycle_s must be > 0")
        if any(not (math.isfinite(f) and f > 0) for f in self.spread):
            raise ValueError(f"spread: factors must be finite and > 0, got {self.spread!r}")

    def factor(self, edge: int, generation: int) -> float:
        """The TPT factor of ``generation`` (0, 1, ...) of ``edge``: 1 without a spread."""
        return self.spread[(edge + generation) % len(self.spread)] if self.spread else 1.0

    def _at(self, ys: tuple, L: float) -> float:
        xs = self.latency_s
        i = min(max(bisect.bisect_right(xs, L) - 1, 0), len(xs) - 2)
        x0, x1 = xs[i], xs[i + 1]
        return ys[i] + (ys[i + 1] - ys[i]) * (L - x0) / (x1 - x0)

    def cycle(self, L: float) -> float:
        return max(1e-9, self._at(self.cycle_s, L))

    def committed(self, L: float) -> float:
        return max(1e-9, self._at(self.tokens, min(L, self.latency_s[-1])))

    def scored(self, L: float) -> float:
        return max(0.0, self._at(self.drafts, min(L, self.latency_s[-1])))

    def tpt(self, L: float) -> float:
        return self.cycle(L) / self.committed(L)

    @classmethod
    def from_single_edge(cls, tau_seq: float = 0.35, tau_tok: float = 0.5, config=None, *, trace=None,
                         segments: int = 400,
                         latencies: Sequence[float] = (0.0, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32,
                                                       0.64, 1.28), label: str = "", **overrides) -> "EdgeModel":
        """From :func:`pipesd.tuning.sim.simulate_tpt`: at each latency the cloud's verification
        is that long (``verify_base_s = L``, no per-token term: the replica's curve is applied
        here), the rest of the config as given (draft cost, link, trigger, pipelining,
        acceptance draws or a replay ``trace``)."""
        from pipesd.tuning.sim import SimConfig, simulate_tpt

        cfg = config or SimConfig()
        lat, cyc, tok, dr = [], [], [], []
        for L in latencies:
            r = simulate_tpt(tau_seq, tau_tok, cfg, trace=trace, **{"segments": segments, **overrides,
                                                                    "verify_base_s": float(L),
                                                                    "verify_per_token_s": 0.0})
            v = max(1, r.verifications)
            lat.append(float(L))
            cyc.append(r.tpt_s * r.tokens / v)
            tok.append(r.tokens / v)
            dr.append(r.mean_draft_len)
        c = SimConfig(**{**asdict(cfg), **overrides})
        return cls(tuple(lat), tuple(cyc), tuple(tok), tuple(dr), up_s=c.delay_s + c.startup_s,
                   down_s=c.delay_s + c.down_s, label=label or f"single-edge model (tuning.sim), pipeline={c.pipeline}")

    @classmethod
    def from_measured(cls, tpt_s: float, tokens_per_verification: float, drafts_per_verification: float,
                      latency_s: float, *, pipelined: bool = True, up_s: float = 0.0, down_s: float = 0.0,
                      label: str = "measured single-edge point") -> "EdgeModel":
        """From one measured edge at cloud latency ``latency_s``: its cycle ``tpt * tokens``. More
        latency adds to the cycle one for one; less latency helps a serial edge one for one and a
        pipelined one not at all (its drafting already hid it). Acceptance stays as measured."""
        for name, v in (("tpt_s", tpt_s), ("tokens_per_verification", tokens_per_verification),
                        ("latency_s", latency_s)):
            if not (math.isfinite(v) and v >= 0) or (name != "latency_s" and v <= 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        c1 = tpt_s * tokens_per_verification
        L1 = latency_s
        lo = (0.0, c1 if pipelined else max(1e-6, c1 - L1))
        pts = [lo] + ([(L1, c1)] if L1 > 0 else []) + [(L1 + 10.0, c1 + 10.0)]
        n = len(pts)
        return cls(tuple(p[0] for p in pts), tuple(p[1] for p in pts), (tokens_per_verification,) * n,
                   (drafts_per_verification,) * n, up_s, down_s, label)


@dataclass(frozen=True)
class HostCPU:
    """CPU cores that the edges and the replicas of one machine share (the bench: N edge threads
    and the server on 2 cores). Times are CPU seconds, not wall: ``edge_round_s`` per edge per
    verification round (framing, codec, syscalls, the client's Python); ``launch_s +
    launch_per_session_s * sessions`` per launch (the verifier's compute and its event loop, not
    the padding sleep). ``background_cores``: CPU taken all the time by other processes (Ray's,
    pollers), in cores. ``edge_slots``: how many edges run CPU work at once (1: threads of one
    Python process that hold its interpreter lock throughout; None: as many as there are cores).
    ``label`` says where the figures come from."""

    cores: int
    edge_round_s: float = 0.0
    launch_s: float = 0.0
    launch_per_session_s: float = 0.0
    background_cores: float = 0.0
    edge_slots: Optional[int] = None
    label: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.cores, int) and self.cores >= 1):
            raise ValueError(f"cores must be a whole number >= 1, got {self.cores!r}")
        if self.edge_slots is not None and not (isinstance(self.edge_slots, int) and self.edge_slots >= 1):
            raise ValueError(f"edge_slots must be None or a whole number >= 1, got {self.edge_slots!r}")
        if not (0 <= self.background_cores < self.cores):
            raise ValueError(f"background_cores must be >= 0 and below cores, got {self.background_cores!r}")
        for name in ("edge_round_s", "launch_s", "launch_per_session_s", "background_cores"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def launch_cpu(self, sessions: int) -> float:
        return self.launch_s + self.launch_per_session_s * sessions


@dataclass(frozen=True)
class FleetConfig:
    """One run. ``mode``: ``"sd"`` (the edge model's method) or ``"stream"`` (cloud streaming);
    ``think_s``: mean idle gap between an edge's generations (exponential; 0: back to back)."""

    n_edges: int
    edge: EdgeModel
    cost: CostCurve
    replicas: int = 1
    routing: str = "least-loaded"
    mode: str = "sd"
    max_batch_sessions: int = 32
    max_sessions_per_replica: Optional[int] = None
    max_new: int = 32
    duration_s: float = 10.0
    think_s: float = 0.0
    retry_s: float = 0.05
    replica_speed: Optional[tuple] = None  # per replica, multiplies launch time (None: all 1)
    seed: int = 0
    record: bool = False  # keep every job's (session, replica) in the result
    host: Optional[HostCPU] = None  # shared host cores (None: no CPU contention, as on separate hosts)

    def __post_init__(self) -> None:
        if self.n_edges < 1 or self.replicas < 1 or self.max_batch_sessions < 1 or self.max_new < 1:
            raise ValueError("n_edges, replicas, max_batch_sessions and max_new must be >= 1")
        if self.routing not in ROUTING:
            raise ValueError(f"routing must be one of {', '.join(ROUTING)}, got {self.routing!r}")
        if self.mode not in ("sd", "stream"):
            raise ValueError(f"mode must be 'sd' or 'stream', got {self.mode!r}")
        if self.max_sessions_per_replica is not None and self.max_sessions_per_replica < 1:
            raise ValueError("max_sessions_per_replica must be None or >= 1")
        if not (self.duration_s > 0 and self.think_s >= 0 and self.retry_s > 0):
            raise ValueError("duration_s and retry_s must be > 0, think_s >= 0")
        if self.replica_speed is not None and (len(self.replica_speed) != self.replicas or
                                               min(self.replica_speed) <= 0):
            raise ValueError("replica_speed: one factor > 0 per replica")
        if self.host is not None and not isinstance(self.host, HostCPU):
            raise ValueError(f"host must be None or a HostCPU, got {self.host!r}")


@dataclass
class FleetResult:
    """Modelled figures. ``goodput_tok_s``: committed tokens / time of the last generation's end."""

    goodput_tok_s: float
    tpt_p50_s: float
    tpt_p99_s: float
    tpt_mean_s: float
    sessions_per_launch: float
    cloud_busy_per_token_s: float
    tokens: float
    generations: int
    launches: int
    refused: int
    elapsed_s: float
    sessions_per_replica: list = field(default_factory=list)  # sessions opened on each replica
    peak_open_per_replica: list = field(default_factory=list)  # most sessions open at once on each
    jobs: list = field(default_factory=list)  # (session, replica) per job when config.record

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("jobs")
        return d


def _pct(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class _Job:
    __slots__ = ("session", "tokens", "left", "done")

    def __init__(self, session: int, tokens: float, left: int, done) -> None:
        self.session, self.tokens, self.left, self.done = session, tokens, left, done


class _Replica:
    def __init__(self, env: simpy.Environment, idx: int, cfg: FleetConfig, jobs_log: Optional[list],
                 cores: Optional[simpy.Resource] = None) -> None:
        self.env, self.idx, self.cfg, self.log, self.cores = env, idx, cfg, jobs_log, cores
        self.queue: list[_Job] = []
        self.sessions = 0
        self.sessions_total = 0
        self.peak = 0
        self.busy = 0.0
        self.launches = 0
        self.verifications = 0
        self.speed = cfg.replica_speed[idx] if cfg.replica_speed else 1.0
        self.wake = env.event()
        env.process(self.loop())

    def queued_tokens(self) -> float:
        return sum(j.tokens if j.left == 0 else j.left for j in self.queue)

    def submit(self, job: _Job) -> None:
        self.queue.append(job)
        if self.log is not None:
            self.log.append((job.session, self.idx))
        if not self.wake.triggered:
            self.wake.succeed()

    def loop(self):
        cfg = self.cfg
        while True:
            if not self.queue:
                self.wake = self.env.event()
                yield self.wake
            batch, self.queue = self.queue[:cfg.max_batch_sessions], self.queue[cfg.max_batch_sessions:]
            scored = sum((1 if j.left else j.tokens + 1) for j in batch)
            t = cfg.cost.time(len(batch), scored) * self.speed
            cpu = cfg.host.launch_cpu(len(batch)) * self.speed if cfg.host else 0.0
            if cpu > 0:  # compute on a shared core, then the rest of the launch (padding) off-core
                t0 = self.env.now
                with self.cores.request(priority=1) as req:
                    yield req
                    yield self.env.timeout(cpu)
                t = max(t, self.env.now - t0)
                yield self.env.timeout(t - (self.env.now - t0) + cfg.cost.gap(len(batch)) * self.speed)
            else:
                yield self.env.timeout(t + cfg.cost.gap(len(batch)) * self.speed)
            self.busy += t
            self.launches += 1
            self.verifications += len(batch)
            for j in batch:
                if j.left > 1:  # a stream: one more token, back in the queue
                    j.left -= 1
                    self.queue.append(j)
                else:
                    j.done.succeed()


class _Router:
    def __init__(self, replicas: list, policy: str) -> None:
        self.replicas, self.policy, self.next = replicas, policy, 0
        ring = []
        for r in replicas:
            for v in range(64):  # virtual nodes per replica
                ring.append((int(hashlib.md5(f"{r.idx}/{v}".encode()).hexdigest()[:8], 16), r.idx))
        self.ring = sorted(ring)
        self.keys = [k for k, _ in self.ring]

    def pick(self, edge: int, allowed: list) -> Optional["_Replica"]:
        """The replica for a new session of ``edge`` among those that admit one (None: none does)."""
        if not allowed:
            return None
        if self.policy == "least-loaded":
            return min(allowed, key=lambda r: (r.sessions, r.queued_tokens(), r.idx))
        if self.policy == "jsq":
            return min(allowed, key=lambda r: (len(r.queue), r.sessions, r.idx))
        if self.policy == "round-robin":
            for _ in range(len(self.replicas)):
                r = self.replicas[self.next % len(self.replicas)]
                self.next += 1
                if r in allowed:
                    return r
            return allowed[0]
        h = int(hashlib.md5(f"edge-{edge}".encode()).hexdigest()[:8], 16)  # consistent hash on the edge id
        i = bisect.bisect_left(self.keys, h)
        for k in range(len(self.ring)):
            r = self.replicas[self.ring[(i + k) % len(self.ring)][1]]
            if r in allowed:
                return r
        return None


def simulate_fleet(cfg: FleetConfig) -> FleetResult:
    """Run ``cfg`` on a SimPy clock; deterministic for ``cfg.seed``."""
    env = simpy.Environment()
    rng = random.Random(cfg.seed)
    log: Optional[list] = [] if cfg.record else None
    host = cfg.host
    cores = simpy.PriorityResource(env, host.cores) if host else None  # background first (priority 0)
    slots = simpy.Resource(env, host.edge_slots) if host and host.edge_slots else None
    reps = [_Replica(env, i, cfg, log, cores) for i in range(cfg.replicas)]
    router = _Router(reps, cfg.routing)
    em = cfg.edge
    tpts: list[float] = []
    state = {"tokens": 0.0, "refused": 0, "end": 0.0, "session": 0, "active": cfg.n_edges}
    cap = cfg.max_sessions_per_replica

    def edge_cpu(work: float):
        """Hold a core (and an edge slot, when edges share an interpreter lock) for ``work``."""
        if slots is not None:
            with slots.request() as s_req:
                yield s_req
                with cores.request(priority=1) as c_req:
                    yield c_req
                    yield env.timeout(work)
        else:
            with cores.request(priority=1) as c_req:
                yield c_req
                yield env.timeout(work)

    def background(share: float, tick: float = 0.005):
        """Another process's CPU: a core for ``share`` of every tick while any edge still runs."""
        due = env.now + rng.uniform(0, tick)
        while state["active"] > 0:
            if due > env.now:
                yield env.timeout(due - env.now)
            with cores.request(priority=0) as req:  # ahead of the queue, and on a fixed beat: its share
                yield req
                yield env.timeout(share * tick)
            due += tick

    def edge(i: int):
        yield env.timeout(rng.uniform(0, min(cfg.duration_s, em.cycle(0.0)) * 0.5))  # staggered starts
        gen = 0
        while env.now < cfg.duration_s:
            rep = router.pick(i, [r for r in reps if cap is None or r.sessions < cap])
            if rep is None:
                state["refused"] += 1
                yield env.timeout(cfg.retry_s)
                continue
            sid = state["session"]
            state["session"] += 1
            rep.sessions += 1
            rep.sessions_total += 1
            rep.peak = max(rep.peak, rep.sessions)
            t0 = env.now
            if cfg.mode == "stream":
                yield env.timeout(em.up_s)
                job = _Job(sid, 1, cfg.max_new, env.event())
                rep.submit(job)
                yield job.done
                yield env.timeout(em.down_s)
                committed = float(cfg.max_new)
            else:
                committed, L = 0.0, cfg.cost.time(1, em.scored(0.0) + 1) * rep.speed
                f = em.factor(i, gen)
                while committed < cfg.max_new:
                    own = max(0.0, em.cycle(L) - L)  # the edge's part of the cycle
                    cpu = min(own, host.edge_round_s) if host else 0.0
                    if cpu > 0:  # its CPU part on a shared core; waiting for one is the contention
                        yield env.process(edge_cpu(cpu))
                    yield env.timeout(own - cpu)
                    job = _Job(sid, em.scored(L), 0, env.event())
                    ts = env.now
                    rep.submit(job)
                    yield job.done
                    L = env.now - ts
                    committed += em.committed(L) / f
            rep.sessions -= 1
            tpts.append((env.now - t0) / committed)  # the last verdict may overshoot max_new: per token of it
            state["tokens"] += committed
            state["end"] = env.now
            gen += 1
            if cfg.think_s > 0:
                yield env.timeout(rng.expovariate(1.0 / cfg.think_s))
        state["active"] -= 1

    for i in range(cfg.n_edges):
        env.process(edge(i))
    if host and host.background_cores > 0:
        k = math.ceil(host.background_cores)
        for _ in range(k):
            env.process(background(host.background_cores / k))
    env.run(until=cfg.duration_s * 50 + 3600)  # bounded: every edge stops starting at duration_s
    launches = sum(r.launches for r in reps)
    busy = sum(r.busy for r in reps)
    elapsed = state["end"] or cfg.duration_s
    tok = state["tokens"]
    return FleetResult(
        goodput_tok_s=tok / elapsed, tpt_p50_s=_pct(tpts, 0.5), tpt_p99_s=_pct(tpts, 0.99),
        tpt_mean_s=sum(tpts) / len(tpts) if tpts else float("nan"),
        sessions_per_launch=sum(r.verifications for r in reps) / launches if launches else 0.0,
        cloud_busy_per_token_s=busy / tok if tok else float("nan"), tokens=tok, generations=len(tpts),
        launches=launches, refused=state["refused"], elapsed_s=elapsed,
        sessions_per_replica=[r.sessions_total for r in reps], peak_open_per_replica=[r.peak for r in reps],
        jobs=log or [])


def capacity_bound(cfg: FleetConfig) -> float:
    """Tokens/s no run of ``cfg`` can exceed: every replica busy all the time, each launch as
    full as allowed and every session in it committing the most the edge model ever commits."""
    em, best = cfg.edge, 0.0
    if cfg.mode == "stream":
        for b in range(1, cfg.max_batch_sessions + 1):
            best = max(best, b / (cfg.cost.time(b, b) + cfg.cost.gap(b)))
    else:
        tmax, dmin = max(em.tokens), min(em.drafts)
        for b in range(1, cfg.max_batch_sessions + 1):
            best = max(best, b * tmax / (cfg.cost.time(b, b * (dmin + 1)) + cfg.cost.gap(b)))
    speeds = cfg.replica_speed or (1.0,) * cfg.replicas
    return best * sum(1.0 / s for s in speeds)
