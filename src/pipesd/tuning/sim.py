"""A small model of cloud-edge speculative decoding's time per token (TPT) as a function of the
dual-threshold trigger ``(tau_seq, tau_tok)``.

**A model, not a measurement.** It exists to test the tuner against a landscape with the right
shape (optima inside the box or on its edge, plateaus, window noise) and to let benchmarks and docs
reason about *when* thresholds and pipelining matter. Numbers from it are never results.

What is modelled
----------------
- Draft confidences i.i.d. per token from a mixture: ``Beta(conf_a, conf_b)`` (confident
  tokens, mean 0.984 by default) with probability ``1 - hard_frac``, ``Beta(hard_a, hard_b)``
  (contested tokens, mean 0.5) with probability ``hard_frac`` (0.12); a token is accepted with
  probability ``p ** calibration`` (1: a calibrated draft; > 1: over-confident), and
  verification accepts the longest accepted prefix of a run.
- The trigger exactly as ``pipesd.edge.trigger``: fire at the first token with
  ``p <= tau_tok`` or ``prod p <= tau_seq``, or at ``max_draft`` tokens; the product resets
  after each trigger and after each correction.
- Edge: ``gen_s`` seconds per draft token. Uplink: ``startup_s`` per message plus
  ``per_token_s`` per token, FIFO; in the pipelined mode the tokens of a run stream out while
  it is drafted and the trigger token is flushed at once (one message), in the serial mode the
  run goes up as one message after it is drafted. ``delay_s`` one-way propagation each way.
- Cloud: one verification of a run of ``L`` tokens takes ``verify_base_s + verify_per_token_s*L``
  (a memory-bound forward: the weights are read once per forward), one at a time, FIFO.
  Requests that queue up at a busy cloud coalesce: the cloud verifies every run that has
  arrived when it becomes free in one forward (as ``pipesd.cloud`` does per session).
- Pipelined (``pipeline=True``, our runtime's protocol): the edge keeps drafting while verdicts
  are outstanding, up to ``lookahead`` unverified tokens; an all-accepted run commits its ``L``
  tokens (no bonus token); a run with its first rejection at ``A`` commits ``A`` tokens plus the
  correction, and everything drafted after it is void: the edge restarts at the verdict. Tokens
  sent during that wait still occupy the uplink until the verdict arrives.
- Serial (``pipeline=False``, vanilla SD): draft the run, send it, wait for the verdict, which
  commits ``A`` plus a correction or bonus token.

Not modelled: the DP's intermediate batch boundaries (each run pays one message startup),
several clients sharing the cloud, correlated confidences (real drafts have easy and hard
stretches), bandwidth traces.

Common random numbers (one draw per ``seed``) make the landscape a deterministic, nearly
smooth function of the thresholds, so a grid search over it is well defined. With
``max_tokens`` a run stops at the first verdict that brings the total to at least that many
tokens: one tuning window, as noisy as a measured one (vary ``seed`` per window).
"""
from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["SimConfig", "SimResult", "simulate_tpt", "grid_search"]


@dataclass(frozen=True)
class SimConfig:
    """Costs and draft behaviour of the model. Defaults: a laptop-class edge drafting ~33 tokens/s,
    a top-k q wire (tens of bytes per token) on a 15 ms link, a 7B-class target on a datacentre
    GPU (25 ms per verification); acceptance ~0.9 and ~5 drafts per verification at the
    paper's operating point. ``segments``: rows of draws (runs) simulated."""

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

    def __post_init__(self) -> None:
        for name in ("gen_s", "startup_s", "per_token_s", "delay_s", "verify_base_s", "verify_per_token_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
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
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be None or an int >= 1, got {self.max_tokens!r}")
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

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=8)
def _draws(conf: tuple, calibration: float, rows: int, cols: int, seed: int):
    conf_a, conf_b, hard_frac, hard_a, hard_b = conf
    rng = np.random.default_rng(seed)
    p = rng.beta(conf_a, conf_b, size=(rows, cols))
    if hard_frac > 0:
        hard = rng.random((rows, cols)) < hard_frac
        p = np.where(hard, rng.beta(hard_a, hard_b, size=(rows, cols)), p)
    accept = rng.random((rows, cols)) < p ** calibration
    p.setflags(write=False)
    accept.setflags(write=False)
    return p, accept


def _segments(cfg: SimConfig, tau_seq: float, tau_tok: float) -> tuple[np.ndarray, np.ndarray]:
    """Run length L (trigger) and accepted prefix A (<= L) of every simulated run."""
    conf = (cfg.conf_a, cfg.conf_b, cfg.hard_frac, cfg.hard_a, cfg.hard_b)
    p, accept = _draws(conf, cfg.calibration, cfg.segments, cfg.max_draft, cfg.seed)
    fire = (p <= tau_tok) | (np.cumprod(p, axis=1) <= tau_seq)
    fire[:, -1] = True
    L = np.argmax(fire, axis=1) + 1
    rejected_at = np.where(accept.all(axis=1), cfg.max_draft, np.argmax(~accept, axis=1))
    A = np.minimum(rejected_at, L)
    return L, A


def simulate_tpt(tau_seq: float, tau_tok: float, config: Optional[SimConfig] = None, **overrides) -> SimResult:
    """Modelled TPT and cloud work of the dual trigger at ``(tau_seq, tau_tok)``.

    Deterministic for ``config.seed``; keyword overrides replace config fields
    (``simulate_tpt(0.3, 0.5, gen_s=0.1)``). See the module docstring for what is modelled.
    """
    cfg = config or SimConfig()
    if overrides:
        cfg = SimConfig(**{**asdict(cfg), **overrides})
    for name, v in (("tau_seq", tau_seq), ("tau_tok", tau_tok)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    L_arr, A_arr = _segments(cfg, float(tau_seq), float(tau_tok))
    run = _pipelined if cfg.pipeline else _serial
    t_last, tokens, n_ver, verified, accepted, wasted, busy = run(cfg, L_arr.tolist(), A_arr.tolist())
    return SimResult(
        tpt_s=t_last / tokens,
        tokens=tokens,
        verifications=n_ver,
        mean_draft_len=verified / n_ver,
        acceptance=accepted / verified,
        verified_per_token=verified / tokens,
        wasted_per_token=wasted / tokens,
        cloud_busy_per_token_s=busy / tokens,
    )


def _serial(cfg: SimConfig, Ls: list, As: list) -> tuple:
    """Vanilla SD: draft the run, send it as one message, wait for the verdict (+ bonus)."""
    g, s, c, d = cfg.gen_s, cfg.startup_s, cfg.per_token_s, cfg.delay_s
    t = busy = 0.0
    tokens = verified = accepted = wasted = n_ver = 0
    stop = cfg.max_tokens or math.inf
    for L, A in zip(Ls, As):
        if tokens >= stop:
            break
        n_ver += 1
        v = cfg.verify_base_s + cfg.verify_per_token_s * L
        t += L * g + s + L * c + d + v + d
        busy += v
        tokens += A + 1  # the correction, or the bonus token after a fully accepted run
        verified += L
        accepted += A
        wasted += L - A
    return t, tokens, n_ver, verified, accepted, wasted, busy


def _pipelined(cfg: SimConfig, Ls: list, As: list) -> tuple:
    """Event simulation of the pipelined edge with a FIFO uplink and a FIFO cloud.

    Runs ("segments") are drafted back to back; the cloud verifies, in one forward, every run
    that has arrived by the time it is free (requests that queue up coalesce, as in
    ``pipesd.cloud``). A rejection voids every later run and restarts the edge at the verdict.
    """
    g, s, c, d = cfg.gen_s, cfg.startup_s, cfg.per_token_s, cfg.delay_s
    n_rows = len(Ls)
    i = 0  # next row of draws to draft
    t_edge = wire_free = cloud_free = t_last = busy = 0.0
    tokens = n_ver = verified = accepted = wasted = 0
    queue: list = []  # drafted, not yet verified: (L, A, arrival at the cloud)
    verdicts: deque = deque()  # (edge receives verdict at, tokens) of verified all-accepted runs
    nxt = None  # the next run, drafted tentatively: (L, A, arrival, t_start, e_end, w_end)
    out_v = out_q = 0  # unverified tokens at the edge: verified-but-verdict-in-flight, queued
    stop = cfg.max_tokens or math.inf

    def draft():
        nonlocal t_edge, out_v
        L = Ls[i]
        while verdicts and verdicts[0][0] <= t_edge:
            out_v -= verdicts.popleft()[1]
        while out_v + out_q and out_v + out_q + L > cfg.lookahead:
            if not verdicts:
                return None  # blocked until the cloud verifies a queued run
            t, n = verdicts.popleft()
            t_edge = max(t_edge, t)
            out_v -= n
        e_end = t_edge + L * g
        w_end = max(e_end + s + c, wire_free + s + L * c)
        return (L, As[i], w_end + d, t_edge, e_end, w_end)

    while tokens < stop:
        while i < n_rows:
            if nxt is None:
                nxt = draft()
                if nxt is None:
                    break
            if queue and nxt[2] > max(queue[0][2], cloud_free):
                break  # arrives after the cloud starts its next verification
            queue.append(nxt[:3])
            out_q += nxt[0]
            t_edge, wire_free = nxt[4], nxt[5]
            i += 1
            nxt = None
        if not queue:
            break
        start = max(queue[0][2], cloud_free)
        k = 0
        while k < len(queue) and queue[k][2] <= start:
            k += 1
        batch, queue = queue[:k], queue[k:]
        total = sum(r[0] for r in batch)
        out_q -= total
        v = cfg.verify_base_s + cfg.verify_per_token_s * total
        cloud_free = start + v
        busy += v
        n_ver += 1
        t_verdict = cloud_free + d
        t_last = t_verdict
        verified += total
        rejected = False
        for L, A, _ in batch:
            if rejected:
                wasted += L
            elif A < L:
                tokens += A + 1
                accepted += A
                wasted += L - A
                rejected = True
            else:
                tokens += L
                accepted += L
        if rejected:  # everything drafted after the rejection is void: restart at the verdict
            n_void = max(0.0, t_verdict - t_edge) / g if g > 0 else 0.0
            wire_free = max(wire_free, min(t_verdict, wire_free + s + n_void * c))
            queue, nxt = [], None
            verdicts.clear()
            out_v = out_q = 0
            t_edge = max(t_edge, t_verdict)
        else:
            verdicts.append((t_verdict, total))
            out_v += total
    return t_last, tokens, n_ver, verified, accepted, wasted, busy


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
