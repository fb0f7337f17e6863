"""Link emulation: bandwidth, one-way delay, per-message overhead, bandwidth traces.

Model of one direction. Messages are serialised on the link: a message of ``B`` bytes offered
at ``now`` starts at ``start = max(now, link_free)``, occupies the link for
``per_message_s + transmission(start, 8*B bits)`` (integrating the bandwidth trace when there
is one, piecewise constant, looping), and arrives ``delay_s`` after it has left::

    tx_end = start + per_message_s + transmission
    deliver_at = tx_end + delay_s,   link_free = tx_end

The edge's sender blocks until ``tx_end`` (its socket is busy, as on a saturated link), and
a pacer delivers the frame at ``deliver_at`` (propagation overlaps the next transmission).
"""
from __future__ import annotations

import bisect
import csv
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["BandwidthTrace", "LinkProfile", "LinkEmulator", "link_preset", "PRESETS", "trace_path"]


class BandwidthTrace:
    """Bandwidth over time: points ``(time_s, bandwidth_bps)``, piecewise constant, looping."""

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        pts = [(float(t), float(b)) for t, b in points]
        if not pts:
            raise ValueError("a bandwidth trace needs at least one point")
        if pts[0][0] != 0.0:
            raise ValueError(f"the first trace point must be at time 0, got {pts[0][0]}")
        for i, (t, b) in enumerate(pts):
            if not (math.isfinite(t) and math.isfinite(b) and b > 0):
                raise ValueError(f"trace point {i}: time and bandwidth must be finite, bandwidth > 0 (got {t}, {b})")
            if i and t <= pts[i - 1][0]:
                raise ValueError(f"trace point {i}: times must increase ({pts[i - 1][0]} then {t})")
        self.times = [t for t, _ in pts]
        self.bws = [b for _, b in pts]
        # the last segment lasts as long as the mean gap (or 1 s for a single point)
        self.period = self.times[-1] + (self.times[-1] / (len(pts) - 1) if len(pts) > 1 else 1.0)

    @classmethod
    def from_csv(cls, path: str | Path) -> "BandwidthTrace":
        """CSV with a header and columns ``time_s,bandwidth_bps``."""
        pts = []
        with open(path, newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["time_s", "bandwidth_bps"]:
                raise ValueError(f"{path}: the first line must be the header 'time_s,bandwidth_bps'")
            for lineno, row in enumerate(rows, start=2):
                if not row or not "".join(row).strip():
                    continue
                try:
                    pts.append((float(row[0]), float(row[1])))
                except (ValueError, IndexError):
                    raise ValueError(f"{path}:{lineno}: expected two numbers, got {row!r}") from None
        try:
            return cls(pts)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def bandwidth_at(self, t: float) -> float:
        t = t % self.period
        return self.bws[bisect.bisect_right(self.times, t) - 1]

    def transmit_end(self, start: float, bits: float) -> float:
        """When ``bits`` offered at ``start`` have been sent."""
        t = start
        left = bits
        for _ in range(1_000_000):
            phase = t % self.period
            i = bisect.bisect_right(self.times, phase) - 1
            seg_end = self.times[i + 1] if i + 1 < len(self.times) else self.period
            span = seg_end - phase
            cap = span * self.bws[i]
            if cap >= left:
                return t + left / self.bws[i]
            left -= cap
            t += span
        raise RuntimeError("bandwidth trace integration did not finish")  # pragma: no cover


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link. With a ``trace``, ``bandwidth_bps`` is ignored."""

    bandwidth_bps: float
    delay_s: float = 0.0
    per_message_s: float = 0.0
    trace: Optional[BandwidthTrace] = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"bandwidth_bps must be finite and > 0, got {self.bandwidth_bps!r}")
        for name in ("delay_s", "per_message_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")

    def tx_end(self, start: float, nbytes: int, t0: float = 0.0) -> float:
        bits = 8.0 * nbytes
        begin = start + self.per_message_s
        if self.trace is None:
            return begin + bits / self.bandwidth_bps
        return t0 + self.trace.transmit_end(begin - t0, bits)


def trace_path(name: str) -> Path:
    """Path of a bundled trace (``paper_s4_up``, ``paper_s4_down``)."""
    p = Path(__file__).resolve().parent / "traces" / f"{name}.csv"
    if not p.exists():
        raise ValueError(f"no bundled trace {name!r}")
    return p


def _paper_s4() -> tuple[LinkProfile, LinkProfile]:
    up = BandwidthTrace.from_csv(trace_path("paper_s4_up"))
    down = BandwidthTrace.from_csv(trace_path("paper_s4_down"))
    return LinkProfile(20e6, 0.010, 0.0005, up), LinkProfile(200e6, 0.010, 0.0, down)


#: name -> (uplink, downlink): one-way delays, per-message overhead on the uplink.
PRESETS: dict[str, Callable[[], tuple[LinkProfile, LinkProfile]]] = {
    "lan": lambda: (LinkProfile(1e9, 0.0002, 0.00005), LinkProfile(1e9, 0.0002)),
    "wifi": lambda: (LinkProfile(50e6, 0.010, 0.0005), LinkProfile(100e6, 0.010)),
    "4g": lambda: (LinkProfile(10e6, 0.025, 0.001), LinkProfile(40e6, 0.025)),
    "slow": lambda: (LinkProfile(2e6, 0.040, 0.002), LinkProfile(10e6, 0.040)),
    "paper": lambda: (LinkProfile(20e6, 0.010, 0.0005), LinkProfile(200e6, 0.010)),
    "paper-s4": _paper_s4,
}


def link_preset(name: str) -> tuple[LinkProfile, LinkProfile]:
    """``(uplink, downlink)`` of a named preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown link preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


class LinkEmulator:
    """Schedules both directions of one connection (see the module docstring)."""

    def __init__(self, up: LinkProfile, down: LinkProfile, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.up, self.down = up, down
        self.clock, self.sleep = clock, sleep
        self._t0 = clock()
        self._up_free = 0.0
        self._down_free = 0.0
        self._lock = threading.Lock()

    def uplink_schedule(self, nbytes: int, now: float) -> tuple[float, float]:
        """``(tx_end, deliver_at)`` of a message offered at ``now``."""
        with self._lock:
            start = max(now, self._up_free)
            end = self.up.tx_end(start, nbytes, self._t0)
            self._up_free = end
        return end, end + self.up.delay_s

    def downlink_schedule(self, nbytes: int, arrival: float) -> float:
        """When a message that reached the link at ``arrival`` is delivered."""
        with self._lock:
            start = max(arrival, self._down_free)
            end = self.down.tx_end(start, nbytes, self._t0)
            self._down_free = end
        return end + self.down.delay_s

    def sleep_until(self, t: float) -> None:
        left = t - self.clock()
        if left > 0:
            self.sleep(left)
