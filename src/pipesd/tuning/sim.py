"""A model of cloud-edge speculative decoding's time per token (TPT) as a function of the
dual-threshold trigger ``(tau_seq, tau_tok)``, on today's session protocol (3).

**A model, not a measurement.** It exists to test the tuner against a landscape with the right
shape (optima inside the box or on its edge, plateaus, window noise), to let ``pipesd
check-pair`` suggest thresholds, and to let benchmarks and docs reason about *when* thresholds
and pipelining matter. Numbers from it are never results; ``bench/tuning/validate.py`` compares
it with the real runtime (``bench/results/tpt-model-validation.md``).

How it works
------------
A discrete-event simulation on a virtual clock whose protocol decisions are the runtime's own:
the edge is a :class:`pipesd.protocol.EdgeSession`, the send thread frames with a
:class:`pipesd.protocol.SendState` and cuts with the runtime's batcher
(:class:`pipesd.edge.batching.DPBatcher` fed the true costs, or the trigger-only batcher), the
cloud is a :class:`pipesd.protocol.CloudSession`. So the continuation rule (a correction voids
every later draft; a bonus keeps the edge's later drafts only when its draft at the bonus position
equals the bonus, settled at once or by the next batch), hints (the first record after a verify
request goes without q; a job stops before it), lone-hint requests answered by the previous bonus,
zero-draft jobs, the lookahead cap, the end of a generation and the serial pause (``pipeline=False``:
no drafting while a request is out) are decided exactly as the runtime decides them.

What it adds is time and draft behaviour:

- **Draft behaviour per position.** Position ``k`` of the output has a confidence ``p_k`` and an
  acceptance ``a_k``: whether the draft's proposal there, made from the verified prefix, is the
  target's token. A draft made on top of an earlier wrong draft is wrong (it is void anyway);
  it is given the position's confidence for the trigger. Draws: either a ``trace`` (measured
  ``confidence`` / ``accepted`` per position along target-greedy continuations: a replay, exact
  for greedy decoding) or i.i.d. draws from a mixture, ``Beta(conf_a, conf_b)`` (confident,
  mean 0.984) with probability ``1 - hard_frac``, ``Beta(hard_a, hard_b)`` (contested, mean 0.5)
  with probability ``hard_frac``; ``a_k`` with probability ``p_k ** calibration``.
- **Prompt-lookup proposals** (``lookup_rate`` > 0): position ``k`` is drafted by lookup with
  probability ``lookup_rate`` (an independent stream: real copies come in runs, which this
  ignores), in ``lookup_s``, at confidence ``lookup_confidence``, right with probability
  ``lookup_precision`` (the measured precision along the path, independent of ``a_k``).
- **Edge**: ``gen_s`` per draft step; verdicts are applied between steps (a verdict that arrives
  during a step waits for its end, as the compute thread polls its mailbox between steps).
- **Uplink**: one send thread, FIFO: a message of ``n`` tokens takes ``startup_s + n*per_token_s``
  (a hint token ``hint_s``) from when the sender pops it, then ``delay_s`` to the cloud. The
  sender pops every record drafted while it was sending and cuts as the runtime's ``Sender`` does
  (a verify record is flushed at once; planned cuts ship at the end of a pop); records of a void
  epoch are dropped unsent, the ones already on the wire still occupy it.
- **Cloud**: one verification at a time, ``verify_base_s + verify_per_token_s * drafts`` (``pipesd
  serve --verify-pad-ms`` pads to a floor: base = pad, per token 0); the verdict reaches the edge
  ``delay_s + down_s`` later.

Not modelled: sampling's bonus comparisons (a sampled bonus equals the draft less often than
``a_k`` says), EOS, draft prefill and edge/cloud overheads outside the costs, the runtime cost
model's estimation error (the batcher is given the true costs), several clients sharing the cloud,
bandwidth traces, a verdict applied while the sender is between two messages of one pop.

Common random numbers: the synthetic draws are one fixed stream per ``seed`` (drawn in blocks,
so every length is a prefix of the same stream), and position ``k`` has the same draw at every
threshold: the landscape is a deterministic, nearly smooth function of the thresholds, so a grid
search over it is well defined. An open-ended run stops after ``segments`` verdicts; with
``max_tokens`` it stops at the first verdict that brings the total to at least that many tokens
(one tuning window, as noisy as a measured one: vary ``seed`` per window); with ``max_new`` (or a
trace) it is one generation of that length with the runtime's end rules.
"""
from __future__ import annotations

import functools
import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["SimConfig", "SimResult", "simulate_tpt", "grid_search"]

_BLOCK = 4096  # synthetic draws are made in blocks of this many positions (prefix-stable stream)


@dataclass(frozen=True)
class SimConfig:
    """Costs and draft behaviour of the model. Defaults: a laptop-class edge drafting ~33 tokens/s,
    a top-k q wire (tens of bytes per token) on a 15 ms link, a 7B-class target on a datacentre
    GPU (25 ms per verification); acceptance ~0.9. ``segments``: verdicts simulated by an
    open-ended run. ``batching``: ``"dp"`` (the runtime's DP plan) or ``"trigger"`` (one message
    per run, vanilla SD); None: dp when pipelined, trigger when serial."""

    gen_s: float = 0.03
    startup_s: float = 0.004
    per_token_s: float = 0.0005
    delay_s: float = 0.015
    verify_base_s: float = 0.025
    verify_per_token_s: float = 0.001
    conf_a: float = 30.0  # confident tokens: Beta(30, 0.5), mean 0.984
    conf_b: float = 0.5
    hard_frac: float = 0.12  # share of "contested" tokens, whose confidence is Beta(hard_a, hard_b)
    hard_a: float = 2.0
    hard_b: float = 2.0
    calibration: float = 1.0
    max_draft: int = 16
    lookahead: int = 48
    pipeline: bool = True
    segments: int = 2000
    seed: int = 0
    max_tokens: Optional[int] = None  # stop once this many tokens are committed (one tuning window)
    max_new: Optional[int] = None  # one generation of this length (the runtime's end rules)
    hint_s: Optional[float] = None  # wire seconds of a hint token (no q); None: per_token_s
    down_s: float = 0.0  # downlink seconds per verdict on top of delay_s
    batching: Optional[str] = None
    # Prompt-lookup proposals (pipesd.edge.lookup): a position is drafted by lookup with
    # probability ``lookup_rate`` (its own stream of draws), in ``lookup_s`` instead of ``gen_s``,
    # with trigger confidence ``lookup_confidence``, right with probability ``lookup_precision``.
    lookup_rate: float = 0.0
    lookup_precision: float = 0.85
    lookup_confidence: float = 0.9
    lookup_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lookup_rate", "lookup_precision", "lookup_confidence"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("gen_s", "startup_s", "per_token_s", "delay_s", "verify_base_s", "verify_per_token_s",
                     "down_s", "lookup_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.hint_s is not None and not (isinstance(self.hint_s, (int, float)) and math.isfinite(self.hint_s)
                                            and self.hint_s >= 0):
            raise ValueError(f"hint_s must be None or a finite number >= 0, got {self.hint_s!r}")
        if not (isinstance(self.hard_frac, (int, float)) and 0.0 <= self.hard_frac <= 1.0):
            raise ValueError(f"hard_frac must be in [0, 1], got {self.hard_frac!r}")
        for name in ("conf_a", "conf_b", "hard_a", "hard_b", "calibration"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name, lo in (("max_draft", 1), ("lookahead", 1), ("segments", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        for name in ("max_tokens", "max_new"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if self.batching not in (None, "dp", "trigger"):
            raise ValueError(f"batching must be None, 'dp' or 'trigger', got {self.batching!r}")
        if self.gen_s + self.startup_s + self.per_token_s + self.delay_s + self.verify_base_s \
                + self.verify_per_token_s <= 0:
            raise ValueError("at least one cost must be > 0")


@dataclass(frozen=True)
class SimResult:
    """Model outputs; ``*_per_token`` are per committed (generated) token."""

    tpt_s: float
    tokens: int
    verifications: int
    mean_draft_len: float  # drafts per verification
    acceptance: float  # accepted drafts / verified drafts
    verified_per_token: float  # target token-forwards (drafts scored) per generated token
    wasted_per_token: float  # scored drafts that were rejected, per generated token
    cloud_busy_per_token_s: float  # verification seconds per generated token (energy proxy)
    messages: int = 0  # uplink messages sent (void ones included)
    bonus_tokens: int = 0  # verdicts that carried a bonus (full acceptance)
    rollbacks: int = 0  # corrections and bonuses unequal to the edge's draft
    wall_s: float = 0.0  # modelled time of the last verdict (summed over a trace's generations)

    def to_dict(self) -> dict:
        return asdict(self)


Trace = Union[Mapping[str, Sequence], Sequence[Mapping[str, Sequence]]]


@functools.lru_cache(maxsize=16)
def _block(conf: tuple, calibration: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``index`` of the synthetic stream of seed ``seed``: (confidences, acceptances)."""
    conf_a, conf_b, hard_frac, hard_a, hard_b = conf
    rng = np.random.default_rng([seed, index])
    p = rng.beta(conf_a, conf_b, size=_BLOCK)
    if hard_frac > 0:
        hard = rng.random(_BLOCK) < hard_frac
        p = np.where(hard, rng.beta(hard_a, hard_b, size=_BLOCK), p)
    accept = rng.random(_BLOCK) < p ** calibration
    p.setflags(write=False)
    accept.setflags(write=False)
    return p, accept


@functools.lru_cache(maxsize=16)
def _lookup_block(rate: float, precision: float, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``index`` of the lookup stream: (drafted by lookup, lookup right). Its own generator,
    so turning lookup on leaves the draft model's draws as they were."""
    rng = np.random.default_rng([seed, index, 0x100C])
    used = rng.random(_BLOCK) < rate
    right = rng.random(_BLOCK) < precision
    used.setflags(write=False)
    right.setflags(write=False)
    return used, right


def _lookup_draws(cfg: SimConfig, n: int) -> tuple[list, list]:
    if cfg.lookup_rate <= 0:
        return [False] * n, [False] * n
    blocks = [_lookup_block(float(cfg.lookup_rate), float(cfg.lookup_precision), cfg.seed, i)
              for i in range(-(-n // _BLOCK))]
    return (np.concatenate([b[0] for b in blocks])[:n].tolist(),
            np.concatenate([b[1] for b in blocks])[:n].tolist())


def _draws(cfg: SimConfig, n: int) -> tuple[list, list]:
    conf = (cfg.conf_a, cfg.conf_b, cfg.hard_frac, cfg.hard_a, cfg.hard_b)
    blocks = [_block(conf, float(cfg.calibration), cfg.seed, i) for i in range(-(-n // _BLOCK))]
    p = np.concatenate([b[0] for b in blocks])[:n]
    a = np.concatenate([b[1] for b in blocks])[:n]
    return p.tolist(), a.tolist()


def _traces(trace: Trace) -> list[tuple[list, list]]:
    items = [trace] if isinstance(trace, Mapping) else list(trace)
    out = []
    for i, t in enumerate(items):
        try:
            p = [float(x) for x in t["confidence"]]
            a = [bool(x) for x in t["accepted"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"trace {i}: needs 'confidence' (numbers) and 'accepted' (booleans) lists") from None
        if not p or len(p) != len(a):
            raise ValueError(f"trace {i}: 'confidence' and 'accepted' must be non-empty and of one length")
        if not all(0.0 <= x <= 1.0 for x in p):
            raise ValueError(f"trace {i}: confidences must be in [0, 1]")
        out.append((p, a))
    if not out:
        raise ValueError("trace: no generations")
    return out


def simulate_tpt(tau_seq: float, tau_tok: float, config: Optional[SimConfig] = None, *,
                 trace: Optional[Trace] = None, **overrides) -> SimResult:
    """Modelled TPT and cloud work of the dual trigger at ``(tau_seq, tau_tok)``.

    Deterministic for ``config.seed``; keyword overrides replace config fields
    (``simulate_tpt(0.3, 0.5, gen_s=0.1)``). ``trace``: ``{"confidence": [...], "accepted":
    [...]}`` per position of one generation (or a list of them, one generation each; totals are
    summed, TPT = total time / total tokens) replaces the synthetic draws. See the module
    docstring for what is modelled.
    """
    cfg = config or SimConfig()
    if overrides:
        cfg = SimConfig(**{**asdict(cfg), **overrides})
    for name, v in (("tau_seq", tau_seq), ("tau_tok", tau_tok)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    if trace is not None:
        gens = [(p, a, min(len(p), cfg.max_new or len(p)), None) for p, a in _traces(trace)]
    elif cfg.max_new is not None:
        p, a = _draws(cfg, cfg.max_new)
        gens = [(p, a, cfg.max_new, None)]
    else:
        n = cfg.segments * (cfg.max_draft + 1) + cfg.lookahead + 1
        p, a = _draws(cfg, n)
        gens = [(p, a, n, cfg.segments)]
    tot = dict(t=0.0, tokens=0, n_ver=0, verified=0, accepted=0, wasted=0, busy=0.0, messages=0, bonus=0,
               rollbacks=0)
    for p, a, max_new, segments in gens:
        for k, v in _generation(cfg, float(tau_seq), float(tau_tok), p, a, max_new, segments).items():
            tot[k] += v
    tokens, n_ver = max(1, tot["tokens"]), max(1, tot["n_ver"])
    return SimResult(
        tpt_s=tot["t"] / tokens,
        tokens=tot["tokens"],
        verifications=tot["n_ver"],
        mean_draft_len=tot["verified"] / n_ver,
        acceptance=tot["accepted"] / max(1, tot["verified"]),
        verified_per_token=tot["verified"] / tokens,
        wasted_per_token=tot["wasted"] / tokens,
        cloud_busy_per_token_s=tot["busy"] / tokens,
        messages=tot["messages"],
        bonus_tokens=tot["bonus"],
        rollbacks=tot["rollbacks"],
        wall_s=tot["t"],
    )


# Event kinds, in the order simultaneous events of different kinds were caused (seq breaks ties).
_EDGE, _SEND, _ARRIVE, _JOB_END, _VERDICT = range(5)


def _generation(cfg: SimConfig, tau_seq: float, tau_tok: float, P: list, A: list, max_new: int,
                segments: Optional[int]) -> dict:
    """One generation on the virtual clock (see the module docstring). Greedy tokens: the
    target's token is 0 everywhere, a draft is 0 when right and 1 when wrong."""
    from pipesd.edge.batching import DPBatcher, TriggerOnlyBatcher
    from pipesd.edge.trigger import DualThresholdTrigger, TriggerConfig
    from pipesd.protocol import CloudSession, EdgeSession, SendState
    from pipesd.protocol.edge import STOP_REASONS
    from pipesd.scheduling import CostModel

    g, s, c, d = cfg.gen_s, cfg.startup_s, cfg.per_token_s, cfg.delay_s
    LU, LA = _lookup_draws(cfg, len(P))
    c_hint = c if cfg.hint_s is None else cfg.hint_s
    down = d + cfg.down_s
    stop_tokens = cfg.max_tokens or math.inf
    stop_verdicts = segments or math.inf
    batching = cfg.batching or ("dp" if cfg.pipeline else "trigger")
    if batching == "dp":
        batcher = DPBatcher(CostModel(g, s, c), max_length=min(64, max(cfg.max_draft, 1)))
    else:
        batcher = TriggerOnlyBatcher()
    trig = DualThresholdTrigger(TriggerConfig(tau_seq, tau_tok, cfg.max_draft))
    edge = EdgeSession(max_new, None, cfg.lookahead, cfg.pipeline)
    cloud = CloudSession(max_new, None, max_in_flight=1 << 30)
    send = SendState()

    events: list = []
    seq = 0

    def at(t: float, kind: int, payload=None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    out = dict(t=0.0, tokens=0, n_ver=0, verified=0, accepted=0, wasted=0, busy=0.0, messages=0, bonus=0,
               rollbacks=0)
    ring: deque = deque()  # records drafted, not yet popped: (pos, token, epoch, verify)
    mailbox: deque = deque()  # verdicts arrived at the edge, not yet applied
    pending: list = []  # the sender's records not yet shipped
    since = 0
    sender_free = 0.0
    sender_woken = False
    edge_waiting = False
    first_bad: Optional[int] = None  # first wrong token in the edge's unverified drafts
    applied = 0
    batcher.begin_segment()

    def ship(t: float, recs: list, verify: bool) -> float:
        if edge.epoch != send.epoch:
            return t  # a rollback since these were popped: void, nothing sent
        n = len(recs)
        first, hint = send.frame(recs[0][0], n, verify)
        t_end = t + s + (n - hint) * c + hint * c_hint
        out["messages"] += 1
        at(t_end + d, _ARRIVE, (send.epoch, first, [r[1] for r in recs], verify, hint))
        return t_end

    def pop(t: float) -> None:
        """The send thread wakes at ``t``: pop everything drafted, cut as ``Sender.loop`` does."""
        nonlocal pending, since, sender_free
        cut = False
        while ring:
            rec = ring.popleft()
            if rec[2] != send.epoch:
                if not send.admit(rec[2]):
                    continue
                pending, since = [], 0
                batcher.begin_segment()
            pending.append(rec)
            since += 1
            if rec[3]:
                t = ship(t, pending, True)
                pending, cut = [], False
                batcher.end_segment(since)
                since = 0
                batcher.begin_segment()
            elif batcher.cut_now(since):
                cut = True
        if cut and pending:
            t = ship(t, pending, False)
            pending = []
        sender_free = t

    def push(t: float, rec: tuple) -> None:
        nonlocal sender_woken
        ring.append(rec)
        if not sender_woken:
            sender_woken = True
            at(max(t, sender_free), _SEND)

    def take_job(t: float) -> None:
        if cloud.ready:
            job = cloud.take_job()
            v = cfg.verify_base_s + cfg.verify_per_token_s * len(job.drafts)
            out["busy"] += v
            at(t + v, _JOB_END, job)

    def recheck_bad() -> None:
        nonlocal first_bad
        first_bad = None
        sq = edge.seq
        for i in range(edge.committed, len(sq)):
            if sq[i]:
                first_bad = i
                return

    def apply_verdicts(t: float) -> bool:
        """The compute thread applies what has arrived; True when the run is over."""
        nonlocal applied
        while mailbox:
            kw = mailbox.popleft()
            o = edge.on_verdict(**kw)
            if o.stale:
                continue
            applied += 1
            out["t"] = t
            if o.rollback_at is not None:
                out["rollbacks"] += 1
            if o.moved:
                trig.reset()
            recheck_bad()
            if o.complete or edge.committed >= stop_tokens or applied >= stop_verdicts:
                return True
        return False

    at(0.0, _EDGE, False)
    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == _EDGE:
            if payload:  # a draft step ends now: trigger, protocol, ring
                pos = len(edge.seq)
                right = first_bad is None and (LA[pos] if LU[pos] else A[pos])
                reason = trig.update(cfg.lookup_confidence if LU[pos] else P[pos])
                pos, reason = edge.on_draft(0 if right else 1, reason)
                if not right and first_bad is None:
                    first_bad = pos
                if reason in STOP_REASONS:
                    trig.reset()
                push(t, (pos, 0 if right else 1, edge.epoch, reason is not None))
            if apply_verdicts(t):
                break
            if edge.may_draft():  # the next step drafts position len(edge.seq): no verdict is applied before
                at(t + (cfg.lookup_s if LU[len(edge.seq)] else g), _EDGE, True)
            else:
                edge_waiting = True
        elif kind == _VERDICT:
            mailbox.append(payload)
            if edge_waiting:
                edge_waiting = False
                at(t, _EDGE, False)
        elif kind == _SEND:
            sender_woken = False
            pop(t)
        elif kind == _ARRIVE:
            epoch, first, tokens, verify, hint = payload
            cloud.on_batch(epoch, first, tokens, verify=verify, hint=hint)
            take_job(t)
        elif kind == _JOB_END:
            job = payload
            drafts = job.drafts
            acc = 0
            while acc < len(drafts) and drafts[acc] == 0:
                acc += 1
            j = cloud.judge(job, acc, [0] * (acc + 1))
            settled = cloud.apply(j)
            out["n_ver"] += 1
            out["verified"] += len(drafts)
            out["accepted"] += j.accepted
            out["wasted"] += j.wasted
            out["bonus"] += j.token >= 0 and not j.rejected
            at(t + down, _VERDICT, dict(epoch=job.epoch, start_pos=job.start, end_pos=j.end, accepted=j.accepted,
                                        token=j.token, rejected=j.rejected, verified_len=len(cloud.generated),
                                        finished=j.finished, settled=settled))
            take_job(t)
    else:
        raise RuntimeError("the model ran out of events before the generation ended (a bug in the model)")
    out["tokens"] = edge.committed
    return out


def grid_search(objective: Callable[[float, float], float], box: Sequence[Sequence[float]] = ((0.0, 0.9), (0.0, 0.95)),
                n: int = 19) -> tuple[tuple, float, np.ndarray]:
    """Exhaustive ``n x n`` grid over ``box`` (ends included): ``(best point, best value, values)``
    with ``values[i, j] = objective(tau_seq_i, tau_tok_j)``. The reference the tuner is held to."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    xs = np.linspace(box[0][0], box[0][1], n)
    ys = np.linspace(box[1][0], box[1][1], n)
    vals = np.array([[float(objective(float(x), float(y))) for y in ys] for x in xs])
    i, j = np.unravel_index(int(np.argmin(vals)), vals.shape)
    return (float(xs[i]), float(ys[j])), float(vals[i, j]), vals
