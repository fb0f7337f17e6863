"""The tuner as the edge runs it: windows of committed tokens measured on the caller's thread,
GP fits on a worker thread, thresholds published by a single reference swap.

Threads:

- **hot path** (the edge's compute thread): :meth:`OnlineTuner.current` or
  :meth:`OnlineTuner.published` (one attribute read) per draft step, :meth:`OnlineTuner.observe` per commit, :meth:`begin_run` / :meth:`end_run` around
  each generation. All O(1), no locks shared with the worker, never wait on a fit.
- **any thread** (e.g. the send thread, after a cost-model update): :meth:`observe_costs`, O(1).
- **worker** (``pipesd-tuner``): ``tell`` + ``ask`` of the core tuner, restarts after drift,
  then publishes the next point.

Windows are counted in committed tokens and timed on one clock. A window belongs to the
thresholds published at its start: when a window completes it is handed to the worker, tokens
committed until the worker publishes the next point are not attributed to anything, and the
next window starts at the publication instant (the *swap*), or at the first
:meth:`begin_run` after it. ``settle_tokens`` additionally skips that many tokens after each
swap: tokens committed just after a swap were mostly drafted under the old thresholds (up to
the edge's lookahead).
"""
from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from typing import Callable, NamedTuple, Optional, Tuple

from pipesd.tuning.bayes import DEFAULT_BOX, KNOBS, BayesTuner, FixedTuner, Point, TunerCore, check_box, check_budget

__all__ = ["OnlineTuner", "make_online_tuner", "COST_KEYS"]

#: Cost-model keys watched for drift (``pipesd.scheduling.CostModel.snapshot()``).
COST_KEYS = ("gen_s", "startup_s", "per_token_s")


class _Published(NamedTuple):
    version: int
    point: Point
    at: float  # clock time of the swap
    tuning: bool  # windows at this point are evaluations (False: held, only recorded)


class OnlineTuner:
    """Online tuning of ``(tau_seq, tau_tok)`` over windows of ``window_tokens`` committed tokens.

    The objective of a window is its wall time per token plus ``energy_weight`` times its cloud
    joules per token (``energy_weight`` in seconds per joule: ``1e-3`` makes 1 J/token cost as
    much as 1 ms/token). After the core tuner converges the best point is held; windows are
    still measured and kept in :meth:`stats` (``held``). :meth:`observe_costs` re-tunes when a
    cost moved by more than ``retune_rel`` (relative, and by more than ``abs_floor_s`` seconds)
    from its value when the tuner converged.

    ``cloud_budget_ms_per_token`` (optional): the tuner minimises TPT subject to the cloud's busy
    milliseconds per generated token staying within it. A window's cloud cost is the cloud busy
    time the verdicts of its tokens report (``Verdict.verify_s``, passed as ``observe(...,
    cloud_s=)``) divided by its tokens; the core tuner is told it with each objective (a
    :class:`BayesTuner` gets the budget here if it has none). None: unconstrained, as before.

    ``clock`` must be monotonic and is only injectable for tests.
    """

    def __init__(self, tuner: Optional[TunerCore] = None, window_tokens: int = 64, energy_weight: float = 0.0,
                 retune_rel: float = 0.3, *, settle_tokens: int = 0, abs_floor_s: float = 1e-4,
                 held_keep: int = 64, cloud_budget_ms_per_token: Optional[float] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        for name, v, lo in (("window_tokens", window_tokens, 1), ("settle_tokens", settle_tokens, 0),
                            ("held_keep", held_keep, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        for name, v in (("energy_weight", energy_weight), ("retune_rel", retune_rel), ("abs_floor_s", abs_floor_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.cloud_budget_ms_per_token = check_budget(cloud_budget_ms_per_token)
        self.tuner: TunerCore = tuner if tuner is not None else BayesTuner(cloud_budget=self.cloud_budget_ms_per_token)
        if self.cloud_budget_ms_per_token is not None and isinstance(self.tuner, BayesTuner):
            if self.tuner.cloud_budget is None:
                self.tuner.cloud_budget = self.cloud_budget_ms_per_token
            elif self.tuner.cloud_budget != self.cloud_budget_ms_per_token:
                raise ValueError(f"cloud_budget_ms_per_token={self.cloud_budget_ms_per_token} differs from the "
                                 f"tuner's cloud_budget={self.tuner.cloud_budget}")
        self.window_tokens = window_tokens
        self.energy_weight = float(energy_weight)
        self.retune_rel = float(retune_rel)
        self.abs_floor_s = float(abs_floor_s)
        self.settle_tokens = settle_tokens
        self._clock = clock
        first = self.tuner.ask()
        self._pub = _Published(0, (float(first[0]), float(first[1])), clock(), not self.tuner.converged)
        # Window state: touched by the hot-path thread only.
        self._win_version = -1
        self._win_point: Point = self._pub.point
        self._win_tuning = self._pub.tuning
        self._win_tokens = 0
        self._win_wall = 0.0  # closed time of earlier runs in this window
        self._win_energy = 0.0
        self._win_cloud = 0.0  # cloud busy seconds the window's verdicts reported
        self._seg_start: Optional[float] = None  # start of the open time segment (None: paused)
        self._last_obs: Optional[float] = None
        self._settle_left = 0
        self._handed = False
        self._running = False
        self._run_start = 0.0
        self.unattributed_tokens = 0
        self.windows = 0
        # Shared, written by the worker (single writer) or counters bumped under the GIL.
        self._held: deque = deque(maxlen=held_keep)
        self._evals: list[dict] = []
        self._errors: list[str] = []
        self._retunes: list[dict] = []
        self._stale = 0
        self._best: Optional[tuple] = self.tuner.best if self.tuner.converged else None
        self._last_costs: Optional[dict] = None
        self._ref_costs: Optional[dict] = None
        self._restart_pending = False
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="pipesd-tuner", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ hot path
    def current(self) -> Point:
        """Thresholds in force: ``(tau_seq, tau_tok)``. One attribute read, no lock."""
        return self._pub.point

    @property
    def version(self) -> int:
        """Bumped at every swap (a new point, or the same point re-published)."""
        return self._pub.version

    def published(self) -> Tuple[int, Point]:
        """``(version, (tau_seq, tau_tok))`` read together (one attribute read): lets the compute
        thread rebuild its ``TriggerConfig`` only when the version moved."""
        pub = self._pub
        return pub.version, pub.point

    def begin_run(self) -> None:
        """A generation starts (session open): the window clock runs from now."""
        now = self._clock()
        self._sync_window(now)
        self._running = True
        self._run_start = now
        self._seg_start = now
        self._last_obs = now

    def end_run(self) -> None:
        """A generation ended: the time since its last commit is not part of any window."""
        if self._running and self._seg_start is not None and self._last_obs is not None:
            self._win_wall += max(0.0, self._last_obs - self._seg_start)
        self._seg_start = None
        self._running = False

    def observe(self, new_tokens: int, energy_j: float = 0.0, cloud_s: float = 0.0) -> None:
        """``new_tokens`` were committed now (with ``energy_j`` joules of cloud energy and
        ``cloud_s`` seconds of cloud busy time, as the verdict reports it, since the last call).
        O(1); when a window completes it is queued for the worker."""
        if new_tokens < 0 or not energy_j >= 0 or not cloud_s >= 0:
            raise ValueError(f"new_tokens, energy_j and cloud_s must be >= 0, got {new_tokens!r}, {energy_j!r}, "
                             f"{cloud_s!r}")
        if new_tokens == 0 and energy_j == 0 and cloud_s == 0:
            return
        now = self._clock()
        if not self._running:  # no begin_run: start the clock now, these tokens have no start time
            self.begin_run()
            self.unattributed_tokens += new_tokens
            return
        self._sync_window(now)
        if self._handed:
            self.unattributed_tokens += new_tokens
            return
        if self._settle_left > 0:
            self._settle_left = max(0, self._settle_left - new_tokens)
            self.unattributed_tokens += new_tokens
            if self._settle_left == 0:
                self._seg_start = now
                self._win_wall = 0.0
            self._last_obs = now
            return
        self._win_tokens += new_tokens
        self._win_energy += energy_j
        self._win_cloud += cloud_s
        self._last_obs = now
        if self._win_tokens >= self.window_tokens:
            self._close_window(now)

    def _sync_window(self, now: float) -> None:
        pub = self._pub
        if pub.version == self._win_version:
            return
        # A new point is in force: its window starts at the swap (or at this run's start).
        self._win_version = pub.version
        self._win_point = pub.point
        self._win_tuning = pub.tuning
        self._win_tokens = 0
        self._win_wall = 0.0
        self._win_energy = 0.0
        self._win_cloud = 0.0
        self._handed = False
        self._settle_left = self.settle_tokens
        start = max(pub.at, self._run_start) if self._running else None
        self._seg_start = start
        if start is not None and self._last_obs is not None and self._last_obs < start:
            self._last_obs = start

    def _close_window(self, now: float) -> None:
        wall = self._win_wall + (now - self._seg_start if self._seg_start is not None else 0.0)
        tokens = self._win_tokens
        point = self._win_point  # the window's own point: a swap since then makes it stale, not another's
        tpt = wall / tokens
        obj = tpt + self.energy_weight * self._win_energy / tokens
        rec = {"tau_seq": point[0], "tau_tok": point[1], "tokens": tokens, "wall_s": wall,
               "energy_j": self._win_energy, "tpt_s": tpt, "objective": obj,
               "cloud_ms_per_token": 1e3 * self._win_cloud / tokens}
        self.windows += 1
        if self._win_tuning and obj > 0:
            self._handed = True
            self._q.put(("eval", self._win_version, point, obj, rec))
        else:  # holding (or a degenerate zero-time window): record, start the next window now
            self._held.append(rec)
            self._win_tokens = 0
            self._win_wall = 0.0
            self._win_energy = 0.0
            self._win_cloud = 0.0
            self._seg_start = now

    # ------------------------------------------------------------------ drift
    def observe_costs(self, snapshot: dict) -> None:
        """Feed a cost-model snapshot ``{gen_s, startup_s, per_token_s}``; O(1), any thread.
        Once converged, a cost that moved by more than ``retune_rel`` since convergence
        queues a restart of the tuner."""
        snap = {k: float(snapshot[k]) for k in COST_KEYS if k in snapshot}
        self._last_costs = snap
        pub = self._pub
        if pub.tuning or self._restart_pending or self._closed or isinstance(self.tuner, FixedTuner):
            return  # tuning (a restart would never let it converge), or nothing to re-tune
        ref = self._ref_costs
        if ref is None:
            self._ref_costs = snap
            return
        moved = {k: (ref[k], v) for k, v in snap.items() if k in ref and
                 abs(v - ref[k]) > max(self.retune_rel * abs(ref[k]), self.abs_floor_s)}
        if moved:
            self._restart_pending = True
            self._q.put(("restart", pub.version, moved))

    # ------------------------------------------------------------------ worker
    def _publish(self, point: Point) -> None:
        v = self._pub.version + 1
        self._pub = _Published(v, (float(point[0]), float(point[1])), self._clock(), not self.tuner.converged)

    def _run(self) -> None:
        while True:
            msg = self._q.get()
            if msg is None:
                return
            kind = msg[0]
            if kind == "sync":
                msg[1].set()
                continue
            try:
                if kind == "eval":
                    _, version, point, obj, rec = msg
                    if version != self._pub.version:
                        self._stale += 1
                        continue
                    was = self.tuner.converged
                    if self.cloud_budget_ms_per_token is None:
                        self.tuner.tell(point, obj)
                    else:
                        self.tuner.tell(point, obj, cost=rec["cloud_ms_per_token"])
                    hist = getattr(self.tuner, "history", None)
                    if hist:
                        rec = {**rec, "round": hist[-1].get("round"), "phase": hist[-1].get("phase")}
                    self._evals.append(rec)
                    nxt = self.tuner.ask()
                    if self.tuner.converged and not was:
                        self._ref_costs = self._last_costs
                        self._best = self.tuner.best
                    self._publish(nxt)
                elif kind == "restart":
                    _, version, moved = msg
                    self.tuner.restart(keep_best_as_seed=True)
                    self._ref_costs = None
                    self._retunes.append({"at_window": self.windows, "moved": moved})
                    self._publish(self.tuner.ask())
                    self._restart_pending = False
            except Exception as e:  # never take the edge down: keep the point, start a new window
                self._errors.append(f"{kind}: {type(e).__name__}: {e}")
                self._restart_pending = False
                self._publish(self._pub.point)

    def sync(self, timeout_s: float = 30.0) -> bool:
        """Wait until the worker has handled everything queued so far (tests, benchmarks; never
        on the hot path). Returns False on timeout."""
        if self._closed or not self._worker.is_alive():
            return True
        ev = threading.Event()
        self._q.put(("sync", ev))
        return ev.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker (idempotent)."""
        if not self._closed:
            self._closed = True
            self._q.put(None)
        self._worker.join(timeout_s)

    def __enter__(self) -> "OnlineTuner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ report
    def stats(self) -> dict:
        """Thresholds in force, evaluations, convergence, history, re-tunes: for the run stats."""
        pub = self._pub
        best = self._best
        value = None if best is None or not math.isfinite(best[1]) else best[1]
        budget = self.cloud_budget_ms_per_token
        best_cost = None
        if best is not None:
            costs = [r["cloud_ms_per_token"] for r in self._evals
                     if (r["tau_seq"], r["tau_tok"]) == tuple(best[0]) and "cloud_ms_per_token" in r]
            best_cost = min(costs) if costs else None
        return {
            "tuner": "fixed" if isinstance(self.tuner, FixedTuner) else type(self.tuner).__name__,
            "tau_seq": pub.point[0],
            "tau_tok": pub.point[1],
            "converged": not pub.tuning,
            "evaluations": len(self._evals),
            "round": getattr(self.tuner, "round", 0),
            # the last converged round's best (GP posterior mean; for "fixed": the held point)
            "best": None if best is None else {"tau_seq": best[0][0], "tau_tok": best[0][1], "objective": value,
                                               "cloud_ms_per_token": best_cost,
                                               "within_budget": None if budget is None or best_cost is None
                                               else best_cost <= budget},
            "cloud_budget_ms_per_token": budget,
            "active": list(getattr(self.tuner, "active", KNOBS)),
            "history": [dict(r) for r in list(self._evals)],
            "held": [dict(r) for r in list(self._held)],
            "retunes": [dict(r) for r in list(self._retunes)],
            "windows": self.windows,
            "window_tokens": self.window_tokens,
            "energy_weight": self.energy_weight,
            "unattributed_tokens": self.unattributed_tokens,
            "stale_windows": self._stale,
            "errors": list(self._errors),
        }


def make_online_tuner(kind: Optional[str], initial: Point, *, seed: int = 0, **kwargs) -> Optional[OnlineTuner]:
    """What ``EdgeClient(tuner=...)`` builds: ``"bayes"`` (GP tuner seeded with ``initial``),
    ``"fixed"`` (``initial`` held, windows still measured) or ``None`` (no tuner).
    ``cloud_budget_ms_per_token`` (None: unconstrained) bounds the cloud cost the GP tuner may
    choose; ``active`` (bayes only) the knobs it searches (an inactive one is held at ``initial``)."""
    if kind is None:
        return None
    if kind == "bayes":
        box = check_box(kwargs.pop("box", DEFAULT_BOX))
        core_kw = {k: kwargs.pop(k) for k in ("max_evals", "n_initial", "scale", "active", "penalty_exp")
                   if k in kwargs}
        x0 = tuple(min(max(float(v), lo), hi) for v, (lo, hi) in zip(initial, box))
        budget = check_budget(kwargs.get("cloud_budget_ms_per_token"))
        return OnlineTuner(BayesTuner(box, seed=seed, x0=x0, cloud_budget=budget, **core_kw), **kwargs)
    if kind == "fixed":
        return OnlineTuner(FixedTuner(initial), **kwargs)
    raise ValueError(f"tuner must be 'bayes', 'fixed' or None, got {kind!r}")
