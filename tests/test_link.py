"""Link model: profiles, bandwidth traces (integration math), emulator schedule in virtual time."""
from __future__ import annotations

import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesd.transport.link import (PRESETS, BandwidthTrace, LinkEmulator, LinkProfile, bundled_trace, link_preset,
                                   preset_names, trace_path)


class VirtualClock:
    """Time that moves only when someone sleeps."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


# --------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("kw,match", [
    (dict(bandwidth_bps=0.0), "bandwidth_bps"), (dict(bandwidth_bps=-1.0), "bandwidth_bps"),
    (dict(bandwidth_bps=float("inf")), "bandwidth_bps"), (dict(bandwidth_bps=float("nan")), "bandwidth_bps"),
    (dict(bandwidth_bps=True), "bandwidth_bps"), (dict(bandwidth_bps="10"), "bandwidth_bps"),
    (dict(bandwidth_bps=1e6, delay_s=-0.001), "delay_s"), (dict(bandwidth_bps=1e6, delay_s=float("nan")), "delay_s"),
    (dict(bandwidth_bps=1e6, per_message_s=-1.0), "per_message_s"),
])
def test_profile_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LinkProfile(**kw)


def test_profile_trace_type_checked():
    with pytest.raises(TypeError):
        LinkProfile(1e6, trace=[(0, 1e6)])


def test_constant_bandwidth_transmission():
    p = LinkProfile(8e6, delay_s=0.01, per_message_s=0.001)  # 1 byte per microsecond
    assert p.transmit_end(2.0, 1000) == pytest.approx(2.0 + 0.001 + 0.001)
    assert p.tx_end(0.0, 0) == pytest.approx(0.001)
    assert p.bandwidth_at(123.0) == 8e6


# --------------------------------------------------------------------------- traces
def test_trace_integrates_across_bandwidth_changes():
    tr = BandwidthTrace([(0.0, 8e6), (1.0, 16e6)])  # 1 MB/s then 2 MB/s; period 2 s
    assert tr.period == 2.0 and tr.period_bits == 24e6 and tr.mean_bps == 12e6
    assert tr.transmit_end(0.0, 4e6) == pytest.approx(0.5)
    # 1.5 MB from t=0.5: 0.5 MB in the first segment (0.5 s), then 1 MB at 2 MB/s (0.5 s)
    assert tr.transmit_end(0.5, 12e6) == pytest.approx(1.5)
    # across the loop: from 1.5, 1 MB at 2 MB/s to 2.0, then back at 1 MB/s
    assert tr.transmit_end(1.5, 8e6 * 1.5) == pytest.approx(2.5)
    assert tr.bandwidth_at(2.5) == 8e6 and tr.bandwidth_at(3.5) == 16e6 and tr.bandwidth_at(-0.5) == 16e6
    # many periods at once: 10 periods of bits = 20 s
    assert tr.transmit_end(0.25, 10 * 24e6) == pytest.approx(20.25)
    assert tr.transmit_end(0.3, 0) == 0.3


def test_profile_with_trace_uses_origin_and_overhead():
    tr = BandwidthTrace([(0.0, 8e6), (1.0, 16e6)])
    p = LinkProfile(1.0, per_message_s=0.25, trace=tr)
    # trace origin t0 = 100: the message gets the link at 100.5, its bits start at 100.75
    assert p.transmit_end(100.5, 500_000, t0=100.0) == pytest.approx(101.125)  # 0.25 s at 1 MB/s + 0.125 s at 2 MB/s


def _reference_end(points, period, start, bits):
    """Reference: walk absolute segments period after period (no bisection, no skipping)."""
    k = 0
    while True:
        for j, (t, bw) in enumerate(points):
            seg_end = k * period + (points[j + 1][0] if j + 1 < len(points) else period)
            if seg_end <= start:
                continue
            begin = max(k * period + t, start)
            cap = (seg_end - begin) * bw
            if cap >= bits:
                return begin + bits / bw
            bits -= cap
        k += 1


@st.composite
def traces(draw):
    n = draw(st.integers(1, 5))
    gaps = draw(st.lists(st.floats(0.05, 2.0), min_size=n, max_size=n))
    bws = draw(st.lists(st.floats(1e3, 1e7), min_size=n, max_size=n))
    times = [0.0]
    for g in gaps[:-1]:
        times.append(times[-1] + g)
    period = times[-1] + gaps[-1]
    return list(zip(times, bws)), period


@settings(max_examples=150, deadline=None)
@given(tr=traces(), start=st.floats(0.0, 50.0), frac=st.floats(0.0, 7.0))
def test_trace_integration_is_the_inverse_of_bits_between(tr, start, frac):
    points, period = tr
    t = BandwidthTrace(points, period_s=period)
    bits = frac * t.period_bits
    end = t.transmit_end(start, bits)
    assert end >= start
    assert t.bits_between(start, end) == pytest.approx(bits, rel=1e-9, abs=1e-6)
    # monotone in the number of bits
    assert t.transmit_end(start, bits * 0.5) <= end + 1e-12
    # never faster than the fastest segment, never slower than the slowest
    eps = 1e-12 * (1 + start + end)  # float resolution of absolute times
    assert bits / max(t.bws) * (1 - 1e-9) - eps <= end - start <= bits / min(t.bws) * (1 + 1e-9) + eps


@settings(max_examples=150, deadline=None)
@given(tr=traces(), start=st.floats(0.0, 20.0), frac=st.floats(0.0, 6.0))
def test_trace_integration_matches_a_reference(tr, start, frac):
    points, period = tr
    t = BandwidthTrace(points, period_s=period)
    bits = frac * t.period_bits
    assert t.transmit_end(start, bits) == pytest.approx(_reference_end(points, period, start, bits), rel=1e-9, abs=1e-9)


def test_default_period_is_last_point_plus_mean_gap():
    assert BandwidthTrace([(0, 1e6), (20, 2e6), (40, 3e6)]).period == 60.0
    assert BandwidthTrace([(0, 1e6)]).period == 1.0
    assert BandwidthTrace([(0, 1e6)]).transmit_end(3.0, 2e6) == pytest.approx(5.0)


@pytest.mark.parametrize("points,match", [
    ([], "at least one"), ([(1.0, 1e6)], "time 0"), ([(0, 1e6), (0, 2e6)], "increase"),
    ([(0, 1e6), (1, 0)], "point 1"), ([(0, float("nan"))], "point 0"), ([("a", 1)], "pairs"),
])
def test_trace_validation(points, match):
    with pytest.raises(ValueError, match=match):
        BandwidthTrace(points)
    with pytest.raises(ValueError, match="period_s"):
        BandwidthTrace([(0, 1e6), (5, 1e6)], period_s=5.0)


@pytest.mark.parametrize("text,match", [
    ("time,bw\n0,1\n", ":1: the first line"),
    ("", ":1: the first line"),
    ("time_s,bandwidth_bps\n", "no data rows"),
    ("time_s,bandwidth_bps\n0,1e6\n5,abc\n", ":3: expected two numbers"),
    ("time_s,bandwidth_bps\n0,1e6\n5,1e6,7\n", ":3: expected 2 columns"),
    ("time_s,bandwidth_bps\n0,1e6\n\n5,1e6\n3,1e6\n", ":5: times must increase"),
    ("time_s,bandwidth_bps\n1,1e6\n", ":2: the first point must be at time 0"),
    ("time_s,bandwidth_bps\n0,1e6\n4,-5\n", ":3: .*bandwidth > 0"),
    ("time_s,bandwidth_bps\n0,inf\n", ":2:"),
])
def test_csv_errors_name_the_line(tmp_path, text, match):
    f = tmp_path / "trace.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        BandwidthTrace.from_csv(f)
    assert "trace.csv" in str(e.value)


def test_csv_comments_blank_lines_and_missing_file(tmp_path):
    f = tmp_path / "ok.csv"
    f.write_text("time_s,bandwidth_bps\n# a comment\n0,1e6\n\n10, 2e6\n")
    tr = BandwidthTrace.from_csv(str(f))
    assert tr.times == [0.0, 10.0] and tr.bws == [1e6, 2e6] and tr.period == 20.0
    with pytest.raises(ValueError, match="cannot read"):
        BandwidthTrace.from_csv(tmp_path / "missing.csv")


def test_bundled_paper_s4_traces():
    up, down = bundled_trace("paper_s4_up"), bundled_trace("paper_s4_down")
    for tr, lo, hi in ((up, 10e6, 80e6), (down, 150e6, 280e6)):
        assert min(tr.bws) == lo and max(tr.bws) == hi
        assert all(b - a == 20.0 for a, b in zip(tr.times, tr.times[1:]))
        assert len(set(tr.bws)) == len(tr.bws)  # it really changes every 20 s
    assert trace_path("paper_s4_up").is_file()
    with pytest.raises(ValueError, match="no bundled trace"):
        trace_path("nope")


# --------------------------------------------------------------------------- presets
def test_presets():
    assert set(preset_names()) == set(PRESETS) >= {"lan", "wifi", "4g", "slow", "paper", "paper-s4"}
    expect = {"lan": (1e9, 0.0002), "wifi": (50e6, 0.010), "4g": (10e6, 0.025), "slow": (2e6, 0.040),
              "paper": (20e6, 0.010)}
    for name, (bw, delay) in expect.items():
        up, down = link_preset(name)
        assert (up.bandwidth_bps, up.delay_s) == (bw, delay) and down.bandwidth_bps >= up.bandwidth_bps
    assert link_preset("paper")[1].bandwidth_bps == 200e6
    up, down = link_preset("paper-s4")
    assert up.trace is not None and down.trace is not None
    assert up.bandwidth_bps == pytest.approx(up.trace.mean_bps)
    with pytest.raises(ValueError, match="unknown link preset 'moon'.*lan"):
        link_preset("moon")
    em = LinkEmulator.preset("4g", clock=VirtualClock())
    assert em.up.bandwidth_bps == 10e6


# --------------------------------------------------------------------------- emulator schedule
def test_uplink_serialises_and_delays():
    clk = VirtualClock()
    em = LinkEmulator(LinkProfile(8e6, delay_s=0.010, per_message_s=0.001), LinkProfile(8e6), clock=clk,
                      sleep=clk.sleep)
    end1, at1 = em.uplink_schedule(1000, 0.0)
    assert end1 == pytest.approx(0.002) and at1 == pytest.approx(0.012)
    end2, at2 = em.uplink_schedule(1000, 0.0005)  # offered while the first is on the wire: waits
    assert end2 == pytest.approx(0.004) and at2 == pytest.approx(0.014)
    assert at2 > at1 and end2 < at1  # propagation of the first overlaps transmission of the second
    end3, at3 = em.uplink_schedule(1000, 1.0)  # idle link: starts at once
    assert end3 == pytest.approx(1.002) and at3 == pytest.approx(1.012)
    assert em.up_messages == 3 and em.up_bytes == 3000 and em.up_busy_s == pytest.approx(0.006)
    assert em.uplink_schedule(0)[0] == pytest.approx(1.003)  # default now = clock() = 0 -> queued behind


def test_downlink_serialises_and_delays():
    clk = VirtualClock()
    em = LinkEmulator(LinkProfile(8e6), LinkProfile(8e5, delay_s=0.05), clock=clk, sleep=clk.sleep)
    d1 = em.downlink_schedule(100, 0.0)  # 1 ms + 50 ms
    d2 = em.downlink_schedule(100, 0.0)  # queued behind the first
    d3 = em.downlink_schedule(100, 5.0)
    assert (d1, d2, d3) == pytest.approx((0.051, 0.052, 5.051))
    assert em.down_messages == 3 and em.down_bytes == 300
    em.reset()
    assert em.downlink_schedule(100, 0.0) == pytest.approx(0.051) and em.down_messages == 1


def test_bandwidth_change_during_a_transmission():
    clk = VirtualClock(50.0)
    tr = BandwidthTrace([(0.0, 8e6), (1.0, 16e6)])
    em = LinkEmulator(LinkProfile(8e6, delay_s=0.1, trace=tr), LinkProfile(8e6), clock=clk, sleep=clk.sleep)
    assert em.t0 == 50.0
    # 1.5 MB offered at trace time 0.5: 0.5 MB at 1 MB/s, then 1 MB at 2 MB/s
    end, at = em.uplink_schedule(1_500_000, 50.5)
    assert end == pytest.approx(51.5) and at == pytest.approx(51.6)
    # the next message is queued behind it and sent at 2 MB/s
    end2, _ = em.uplink_schedule(200_000, 50.6)
    assert end2 == pytest.approx(51.6)


def test_sender_loop_in_virtual_time():
    """What EdgeConnection.send does: schedule, then block until tx_end."""
    clk = VirtualClock()
    em = LinkEmulator(LinkProfile(1e6, delay_s=0.02, per_message_s=0.001), LinkProfile(1e7), clock=clk,
                      sleep=clk.sleep)
    deliveries = []
    for nbytes in (125, 1250, 0, 12500):
        tx_end, deliver_at = em.uplink_schedule(nbytes, clk())
        em.sleep_until(tx_end)
        assert clk() == pytest.approx(tx_end)
        deliveries.append(deliver_at)
    busy = sum(0.001 + 8 * b / 1e6 for b in (125, 1250, 0, 12500))
    assert clk() == pytest.approx(busy)
    assert deliveries == sorted(deliveries)
    assert deliveries[-1] == pytest.approx(busy + 0.02)
    em.sleep_until(clk() - 1.0)  # in the past: no sleep
    assert len(clk.sleeps) == 4


def test_schedule_is_thread_safe():
    clk = VirtualClock()
    em = LinkEmulator(LinkProfile(8e6), LinkProfile(8e6), clock=clk, sleep=clk.sleep)
    ends: list[float] = []
    lock = threading.Lock()

    def worker():
        for _ in range(200):
            e, _ = em.uplink_schedule(1000, 0.0)
            with lock:
                ends.append(e)

    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ends.sort()
    assert len(ends) == 800 and ends[-1] == pytest.approx(800 * 0.001)
    assert all(b - a == pytest.approx(0.001) for a, b in zip(ends, ends[1:]))


def test_emulator_rejects_non_profiles():
    with pytest.raises(TypeError):
        LinkEmulator((1e6,), LinkProfile(1e6))
    assert math.isfinite(LinkEmulator(LinkProfile(1e6), LinkProfile(1e6)).t0)


def test_restart_trace_gives_every_run_the_same_bandwidth():
    """bench/e2e S4: two runs that restart the trace see the same bandwidth at the same offset."""
    clk = VirtualClock(10.0)
    tr = BandwidthTrace([(0.0, 8e6), (1.0, 16e6)], period_s=2.0)
    em = LinkEmulator(LinkProfile(8e6, trace=tr), LinkProfile(8e6), clock=clk, sleep=clk.sleep)
    first = em.uplink_schedule(1_000_000, 10.0)[0] - 10.0  # 1 s at 1 MB/s
    clk.sleep(3.5)  # the trace moved on by 3.5 s: at 1.5 s into the period, 2 MB/s
    assert em.uplink_schedule(1_000_000, clk())[0] - clk() == pytest.approx(0.5)
    clk.sleep(1.25)  # the link is idle again, 0.25 s into the trace's slow phase
    em.restart_trace()
    assert em.t0 == clk()
    assert em.uplink_schedule(1_000_000, clk())[0] - clk() == pytest.approx(first)
