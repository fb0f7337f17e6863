"""Link emulation: bandwidth, one-way delay, per-message overhead, bandwidth traces.

Model of one direction of a link. Messages are serialised: a message of ``B`` bytes offered
at time ``now`` starts when the link is free, occupies it for the per-message overhead and
then for its ``8*B`` bits at the bandwidth in force (a trace is integrated piecewise, so a
message sent across a bandwidth change takes the piecewise time), and arrives ``delay_s``
after its last bit has left::

    start      = max(now, link_free)
    tx_end     = T(start + per_message_s, 8*B)      # T(t, b): when b bits offered at t are sent
    deliver_at = tx_end + delay_s
    link_free  = tx_end

with ``T(t, b) = t + b / bandwidth_bps`` for a constant bandwidth. The edge's sender blocks
until ``tx_end`` (its link is busy, as on a real saturated uplink) and a pacer delivers the
frame at ``deliver_at`` (propagation overlaps the next transmission). The downlink applies
the same schedule to frames as they arrive from the cloud. Formulae, presets and trace
format: ``docs/wire.md``.
"""
from __future__ import annotations

import bisect
import csv
import io
import math
import os
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional, Sequence, Union

__all__ = ["BandwidthTrace", "LinkProfile", "LinkEmulator", "link_preset", "preset_names", "PRESETS", "trace_path",
           "bundled_trace"]


class BandwidthTrace:
    """Bandwidth over time: ``points`` = ``[(time_s, bandwidth_bps), ...]``, piecewise constant.

    The first point must be at time 0 and times must increase. The trace repeats with period
    ``period_s``; by default the last point lasts as long as the mean gap between points (1 s
    for a single point), e.g. points every 20 s from 0 to 140 s loop after 160 s.
    """

    def __init__(self, points: Sequence[tuple[float, float]], period_s: Optional[float] = None) -> None:
        try:
            pts = [(float(t), float(b)) for t, b in points]
        except (TypeError, ValueError):
            raise ValueError("trace points must be (time_s, bandwidth_bps) pairs of numbers") from None
        if not pts:
            raise ValueError("a bandwidth trace needs at least one point")
        for i, (t, b) in enumerate(pts):
            if not (math.isfinite(t) and math.isfinite(b) and b > 0):
                raise ValueError(f"trace point {i}: time and bandwidth must be finite and bandwidth > 0 "
                                 f"(got {t}, {b})")
            if i and t <= pts[i - 1][0]:
                raise ValueError(f"trace point {i}: times must increase ({pts[i - 1][0]} then {t})")
        if pts[0][0] != 0.0:
            raise ValueError(f"trace point 0: the first point must be at time 0, got {pts[0][0]}")
        self.times = [t for t, _ in pts]
        self.bws = [b for _, b in pts]
        if period_s is None:
            period_s = self.times[-1] + (self.times[-1] / (len(pts) - 1) if len(pts) > 1 else 1.0)
        period_s = float(period_s)
        if not (math.isfinite(period_s) and period_s > self.times[-1]):
            raise ValueError(f"period_s must be finite and after the last point ({self.times[-1]}), got {period_s}")
        self.period = period_s
        ends = self.times[1:] + [self.period]
        self._seg_bits = [(e - t) * b for t, e, b in zip(self.times, ends, self.bws)]
        self.period_bits = sum(self._seg_bits)

    def __repr__(self) -> str:
        return f"BandwidthTrace({len(self.times)} points, period {self.period:g} s, mean {self.mean_bps:.4g} bit/s)"

    @property
    def mean_bps(self) -> float:
        """Time-averaged bandwidth over one period."""
        return self.period_bits / self.period

    @classmethod
    def from_csv(cls, path: Union[str, os.PathLike, "resources.abc.Traversable"],
                 period_s: Optional[float] = None) -> "BandwidthTrace":
        """Read a CSV with the header ``time_s,bandwidth_bps``; errors name the file and line."""
        opener = path.open if hasattr(path, "open") and not isinstance(path, (str, os.PathLike)) else None
        try:
            if opener is not None:
                with opener("r", newline="") as f:
                    text = f.read()
            else:
                with open(path, newline="") as f:
                    text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read bandwidth trace {path}: {e}") from None
        return cls.from_text(text, source=str(path), period_s=period_s)

    @classmethod
    def from_text(cls, text: str, source: str = "<trace>", period_s: Optional[float] = None) -> "BandwidthTrace":
        """Parse CSV text (see :meth:`from_csv`)."""
        rows = csv.reader(io.StringIO(text))
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != ["time_s", "bandwidth_bps"]:
            raise ValueError(f"{source}:1: the first line must be the header 'time_s,bandwidth_bps', got {header!r}")
        pts = []
        for lineno, row in enumerate(rows, start=2):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 2:
                raise ValueError(f"{source}:{lineno}: expected 2 columns (time_s, bandwidth_bps), got {row!r}")
            try:
                t, b = float(row[0]), float(row[1])
            except ValueError:
                raise ValueError(f"{source}:{lineno}: expected two numbers, got {row!r}") from None
            if not (math.isfinite(t) and math.isfinite(b) and b > 0):
                raise ValueError(f"{source}:{lineno}: time and bandwidth must be finite and bandwidth > 0, got {row!r}")
            if pts and t <= pts[-1][0]:
                raise ValueError(f"{source}:{lineno}: times must increase ({pts[-1][0]:g} then {t:g})")
            if not pts and t != 0.0:
                raise ValueError(f"{source}:{lineno}: the first point must be at time 0, got {t:g}")
            pts.append((t, b))
        if not pts:
            raise ValueError(f"{source}: no data rows")
        return cls(pts, period_s)

    def _locate(self, t: float) -> tuple[int, int]:
        """``(period index, segment index)`` in force at time ``t``."""
        k = math.floor(t / self.period)
        i = bisect.bisect_right(self.times, t - k * self.period) - 1
        return k, max(i, 0)

    def _seg_end(self, k: int, i: int) -> float:
        return k * self.period + (self.times[i + 1] if i + 1 < len(self.times) else self.period)

    def bandwidth_at(self, t: float) -> float:
        """Bandwidth in force at time ``t`` (seconds since the trace started)."""
        return self.bws[self._locate(t)[1]]

    def transmit_end(self, start: float, bits: float) -> float:
        """When ``bits`` offered at ``start`` have been sent (integrating the trace)."""
        if bits <= 0:
            return start
        k, i = self._locate(start)
        t, left = start, float(bits)
        n = len(self.times)
        while True:
            seg_end = self._seg_end(k, i)
            cap = max(0.0, seg_end - t) * self.bws[i]
            if cap >= left:
                return t + left / self.bws[i]
            left -= cap
            t = seg_end
            i += 1
            if i == n:
                i, k = 0, k + 1
                if left > self.period_bits:  # skip whole periods at once
                    whole = math.floor(left / self.period_bits)
                    left -= whole * self.period_bits
                    k += whole
                    t = k * self.period

    def bits_between(self, a: float, b: float) -> float:
        """Bits the link can carry from time ``a`` to ``b`` (the integral of the trace)."""
        if b <= a:
            return 0.0
        whole = math.floor((b - a) / self.period)
        total = whole * self.period_bits
        t = a + whole * self.period
        k, i = self._locate(t)
        while t < b:
            e = min(self._seg_end(k, i), b)
            total += max(0.0, e - t) * self.bws[i]
            t = e
            i += 1
            if i == len(self.times):
                i, k = 0, k + 1
        return total


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link.

    ``bandwidth_bps``: bits per second (with a ``trace``, the trace's rate is used instead and
    ``bandwidth_bps`` only describes it); ``delay_s``: one-way propagation delay;
    ``per_message_s``: fixed occupation of the link per message (framing, syscalls, MAC).
    """

    bandwidth_bps: float
    delay_s: float = 0.0
    per_message_s: float = 0.0
    trace: Optional[BandwidthTrace] = None

    def __post_init__(self) -> None:
        if isinstance(self.bandwidth_bps, bool) or not isinstance(self.bandwidth_bps, (int, float)) or \
                not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"bandwidth_bps must be a finite number > 0, got {self.bandwidth_bps!r}")
        for name in ("delay_s", "per_message_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.trace is not None and not isinstance(self.trace, BandwidthTrace):
            raise TypeError(f"trace must be a BandwidthTrace, got {type(self.trace).__name__}")

    def bandwidth_at(self, t: float) -> float:
        """Bandwidth in force ``t`` seconds after the emulation started."""
        return self.bandwidth_bps if self.trace is None else self.trace.bandwidth_at(t)

    def transmit_end(self, start: float, nbytes: int, t0: float = 0.0) -> float:
        """When a message of ``nbytes`` that gets the link at ``start`` has left (trace time 0 = ``t0``)."""
        bits = 8.0 * nbytes
        begin = start + self.per_message_s
        if self.trace is None:
            return begin + bits / self.bandwidth_bps
        return t0 + self.trace.transmit_end(begin - t0, bits)

    tx_end = transmit_end  # short alias


def trace_path(name: str):
    """A bundled trace (``paper_s4_up``, ``paper_s4_down``) as an ``importlib.resources`` path."""
    p = resources.files("pipesd.transport").joinpath("traces", f"{name}.csv")
    if not p.is_file():
        raise ValueError(f"no bundled trace {name!r}")
    return p


def bundled_trace(name: str) -> BandwidthTrace:
    """Load a bundled trace by name (see :func:`trace_path`)."""
    return BandwidthTrace.from_csv(trace_path(name))


def _paper_s4() -> tuple[LinkProfile, LinkProfile]:
    up, down = bundled_trace("paper_s4_up"), bundled_trace("paper_s4_down")
    return LinkProfile(up.mean_bps, 0.010, 0.0005, up), LinkProfile(down.mean_bps, 0.010, 0.0, down)


#: name -> factory of ``(uplink, downlink)``. One-way delays; per-message overhead on the uplink.
PRESETS: dict[str, Callable[[], tuple[LinkProfile, LinkProfile]]] = {
    "lan": lambda: (LinkProfile(1e9, 0.0002, 0.00005), LinkProfile(1e9, 0.0002)),
    "wifi": lambda: (LinkProfile(50e6, 0.010, 0.0005), LinkProfile(100e6, 0.010)),
    "4g": lambda: (LinkProfile(10e6, 0.025, 0.001), LinkProfile(40e6, 0.025)),
    "slow": lambda: (LinkProfile(2e6, 0.040, 0.002), LinkProfile(10e6, 0.040)),
    "paper": lambda: (LinkProfile(20e6, 0.010, 0.0005), LinkProfile(200e6, 0.010)),
    "paper-s4": _paper_s4,
}


def preset_names() -> list[str]:
    """Names accepted by :func:`link_preset`."""
    return list(PRESETS)


def link_preset(name: str) -> tuple[LinkProfile, LinkProfile]:
    """``(uplink, downlink)`` profiles of a named preset (see ``docs/wire.md``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown link preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


class LinkEmulator:
    """Schedules both directions of one connection (formulae in the module docstring).

    ``clock``/``sleep`` are injectable so the schedule can be tested in virtual time; with a
    real connection they must be ``time.monotonic``/``time.sleep`` (the defaults). Trace time
    0 is ``t0`` (default: ``clock()`` when the emulator is made). Thread-safe.
    """

    def __init__(self, up: LinkProfile, down: LinkProfile, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, t0: Optional[float] = None) -> None:
        if not isinstance(up, LinkProfile) or not isinstance(down, LinkProfile):
            raise TypeError("up and down must be LinkProfile instances")
        self.up, self.down = up, down
        self.clock, self.sleep = clock, sleep
        self.t0 = clock() if t0 is None else float(t0)
        self._lock = threading.Lock()
        self.reset()

    @classmethod
    def preset(cls, name: str, **kw) -> "LinkEmulator":
        """An emulator for a named preset (:func:`link_preset`)."""
        up, down = link_preset(name)
        return cls(up, down, **kw)

    def reset(self) -> None:
        """Forget queued traffic and statistics (the trace origin ``t0`` stays)."""
        with self._lock:
            self._up_free = -math.inf
            self._down_free = -math.inf
            self.up_bytes = self.down_bytes = 0
            self.up_messages = self.down_messages = 0
            self.up_busy_s = self.down_busy_s = 0.0

    def restart_trace(self, at: Optional[float] = None) -> None:
        """Make trace time 0 ``at`` (default ``clock()``): a benchmark restarts the trace per
        generation so that every method sees the same bandwidth over its run."""
        with self._lock:
            self.t0 = self.clock() if at is None else float(at)

    def uplink_schedule(self, nbytes: int, now: Optional[float] = None) -> tuple[float, float]:
        """``(tx_end, deliver_at)`` of ``nbytes`` offered to the uplink at ``now`` (default ``clock()``)."""
        end = self._schedule("up", nbytes, now)
        return end, end + self.up.delay_s

    def downlink_schedule(self, nbytes: int, arrival: Optional[float] = None) -> float:
        """When ``nbytes`` that reached the downlink at ``arrival`` are delivered to the edge."""
        return self._schedule("down", nbytes, arrival) + self.down.delay_s

    def _schedule(self, d: str, nbytes: int, at: Optional[float]) -> float:
        """Queue ``nbytes`` on direction ``d`` (``"up"``/``"down"``) at ``at`` (default ``clock()``)
        behind what that direction already carries, count it in ``{d}_bytes`` / ``{d}_messages`` /
        ``{d}_busy_s``; returns when it has left (its transmission end)."""
        if at is None:
            at = self.clock()
        with self._lock:
            start = max(at, getattr(self, f"_{d}_free"))
            end = getattr(self, d).transmit_end(start, nbytes, self.t0)
            setattr(self, f"_{d}_free", end)
            for stat, add in (("bytes", nbytes), ("messages", 1), ("busy_s", end - start)):
                setattr(self, f"{d}_{stat}", getattr(self, f"{d}_{stat}") + add)
        return end

    def sleep_until(self, t: float) -> None:
        """Sleep (with the injected ``sleep``) until ``clock()`` reaches ``t``."""
        left = t - self.clock()
        if left > 0:
            self.sleep(left)
