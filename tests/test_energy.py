"""pipesd.energy: forward counts add up, model energy = busy x power, the NVML path reads counter
deltas (fake NVML injected), every report says its source, bad inputs are rejected."""
from __future__ import annotations

import math
import threading

import pytest

from pipesd.energy import SOURCE_MODEL, SOURCE_NVML, EnergyMeter, EnergyReport, PowerModel


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeNVML:
    """The four pynvml calls the meter uses; the energy counter (mJ) is set by the test."""

    def __init__(self, counter_mj: int = 1_000_000, fail_init: bool = False, unsupported: bool = False) -> None:
        self.counter_mj = counter_mj
        self.fail_init = fail_init
        self.unsupported = unsupported
        self.fail_reads = False
        self.reads = 0
        self.handles = []
        self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i):
        self.handles.append(i)
        return ("gpu", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        assert handle[0] == "gpu"
        if self.unsupported:
            raise RuntimeError("Not Supported")
        if self.fail_reads:
            raise RuntimeError("GPU is lost")
        self.reads += 1
        return self.counter_mj

    def nvmlShutdown(self):
        self.shutdowns += 1


def verify(meter: EnergyMeter, clock: FakeClock, seconds: float, nvml: FakeNVML | None = None, mj: int = 0):
    with meter.measure():
        clock.t += seconds
        if nvml is not None:
            nvml.counter_mj += mj


# ----------------------------------------------------------------------------- model


def test_model_energy_is_busy_time_times_power():
    clock = FakeClock()
    m = EnergyMeter(power_model=PowerModel(busy_power_w=300.0), use_nvml=False, clock=clock)
    for s in (0.01, 0.02, 0.03):
        verify(m, clock, s)
    r = m.report(generated_tokens=12)
    assert r.source == SOURCE_MODEL == m.source
    assert r.busy_s == pytest.approx(0.06) and r.verifications == 3
    assert r.joules == pytest.approx(0.06 * 300.0) == pytest.approx(r.model_joules)
    assert r.joules_per_token == pytest.approx(18.0 / 12)
    assert "300" in r.power_model and r.note == "NVML not requested"


def test_default_power_model_and_per_forward_alternative():
    pm = PowerModel()
    assert pm.busy_power_w == 400.0 and pm.energy_j(0.5) == pytest.approx(200.0)
    assert pm.run_energy_j(busy_s=1.0, wall_s=3.0) == pytest.approx(400.0 + 2.0 * pm.idle_power_w)
    per = PowerModel(joules_per_forward=0.25)
    assert per.energy_j(busy_s=10.0, forwards=8) == pytest.approx(2.0)
    clock = FakeClock()
    m = EnergyMeter(power_model=per, use_nvml=False, clock=clock)
    verify(m, clock, 1.0)
    m.add_forwards(useful=6, wasted=2)
    r = m.report(4)
    assert r.joules == pytest.approx(2.0) and "per target token-forward" in r.power_model


def test_forward_counts_add_up():
    m = EnergyMeter(use_nvml=False)
    m.add_forwards(useful=5, wasted=0)
    m.add_forwards(useful=3, wasted=4)
    m.add_forwards(useful=0, wasted=1)
    r = m.report(generated_tokens=8)
    assert r.target_forwards == 13 and r.wasted_forwards == 5 and r.useful_forwards == 8
    assert r.useful_forwards + r.wasted_forwards == r.target_forwards
    assert r.wasted_fraction == pytest.approx(5 / 13)
    assert r.generated_tokens == 8
    d = r.to_dict()
    assert set(d) >= {"joules", "joules_per_token", "source", "target_forwards", "wasted_forwards",
                      "wasted_fraction", "busy_s"}


def test_empty_report():
    r = EnergyMeter(use_nvml=False).report(0)
    assert r.joules == 0.0 and r.joules_per_token is None and r.wasted_fraction == 0.0 and r.target_forwards == 0


def test_reset_zeroes_counters():
    clock = FakeClock()
    m = EnergyMeter(use_nvml=False, clock=clock)
    verify(m, clock, 1.0)
    m.add_forwards(2, 1)
    m.reset()
    r = m.report(1)
    assert r.busy_s == 0 and r.target_forwards == 0 and r.verifications == 0


# ----------------------------------------------------------------------------- NVML (faked)


def test_nvml_counter_deltas_are_the_energy():
    nv = FakeNVML(counter_mj=5_000_000)
    clock = FakeClock()
    m = EnergyMeter(device_index=1, nvml=nv, clock=clock)
    assert m.source == SOURCE_NVML and nv.handles == [1]
    verify(m, clock, 0.010, nv, mj=2_500)  # 2.5 J in 10 ms
    nv.counter_mj += 99_000  # energy between verifications is not verification energy
    verify(m, clock, 0.020, nv, mj=6_000)
    r = m.report(generated_tokens=10)
    assert r.source == SOURCE_NVML
    assert r.joules == pytest.approx(8.5) and r.joules_per_token == pytest.approx(0.85)
    assert r.busy_s == pytest.approx(0.03)
    assert r.model_joules == pytest.approx(0.03 * 400.0)  # the model's figure rides along
    cal = PowerModel.calibrated(r)
    assert cal.busy_power_w == pytest.approx(8.5 / 0.03)
    m.close()
    assert nv.shutdowns == 1
    assert m.report(10).source == SOURCE_NVML  # what was measured stays reported


def test_nvml_overlapping_windows_are_not_double_counted():
    nv = FakeNVML()
    clock = FakeClock()
    m = EnergyMeter(nvml=nv, clock=clock)
    with m.measure():
        clock.t += 0.01
        nv.counter_mj += 1_000
        with m.measure():  # a second verifier overlapping the first
            clock.t += 0.01
            nv.counter_mj += 1_000
        clock.t += 0.01
        nv.counter_mj += 1_000
    r = m.report(1)
    assert r.joules == pytest.approx(3.0) and r.busy_s == pytest.approx(0.03) and r.verifications == 2


@pytest.mark.parametrize("fake", [FakeNVML(fail_init=True), FakeNVML(unsupported=True)])
def test_nvml_unavailable_falls_back_to_model_and_says_why(fake):
    clock = FakeClock()
    m = EnergyMeter(nvml=fake, clock=clock)
    assert m.source == SOURCE_MODEL and m.note.startswith("NVML unavailable")
    verify(m, clock, 0.5)
    r = m.report(5)
    assert r.source == SOURCE_MODEL and r.joules == pytest.approx(200.0) and "NVML unavailable" in r.note


def test_nvml_read_failure_midway_switches_the_whole_run_to_the_model():
    nv = FakeNVML()
    clock = FakeClock()
    m = EnergyMeter(nvml=nv, clock=clock)
    verify(m, clock, 0.1, nv, mj=50_000)
    nv.fail_reads = True
    verify(m, clock, 0.1, nv, mj=50_000)
    r = m.report(4)
    assert r.source == SOURCE_MODEL and "read failed" in r.note
    assert r.joules == pytest.approx(0.2 * 400.0) == pytest.approx(r.model_joules)  # no mixing of sources


def test_nvml_counter_going_backwards_is_not_energy():
    nv = FakeNVML(counter_mj=10_000)
    clock = FakeClock()
    m = EnergyMeter(nvml=nv, clock=clock)
    with m.measure():
        clock.t += 0.1
        nv.counter_mj = 0  # driver reloaded
    r = m.report(1)
    assert r.source == SOURCE_MODEL and "backwards" in r.note and r.joules == pytest.approx(40.0)


def test_measure_after_close_falls_back():
    nv = FakeNVML()
    clock = FakeClock()
    m = EnergyMeter(nvml=nv, clock=clock)
    m.close()
    verify(m, clock, 0.1, nv, mj=1)
    assert m.report(1).source == SOURCE_MODEL


def test_real_import_path_never_required():
    # Whatever this machine has, constructing a meter never raises and always names a source.
    m = EnergyMeter()
    assert m.source in (SOURCE_NVML, SOURCE_MODEL)
    assert m.source == SOURCE_NVML or m.note.startswith("NVML unavailable")
    m.close()


def test_measure_is_thread_safe_for_counts():
    m = EnergyMeter(use_nvml=False)

    def work():
        for _ in range(200):
            with m.measure():
                pass
            m.add_forwards(1, 1)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    r = m.report(1)
    assert r.verifications == 800 and r.target_forwards == 1600 and r.wasted_forwards == 800


def test_measure_records_even_when_verification_raises():
    clock = FakeClock()
    m = EnergyMeter(use_nvml=False, clock=clock)
    with pytest.raises(RuntimeError):
        with m.measure():
            clock.t += 0.25
            raise RuntimeError("verification failed")
    assert m.report(0).busy_s == pytest.approx(0.25)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kw", [dict(busy_power_w=-1.0), dict(idle_power_w=-5.0), dict(joules_per_forward=-0.1),
                                dict(busy_power_w=math.nan), dict(busy_power_w=math.inf)])
def test_power_model_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        PowerModel(**kw)


@pytest.mark.parametrize("useful,wasted", [(-1, 0), (0, -1), (1.5, 0), (True, 0)])
def test_add_forwards_rejects_bad_counts(useful, wasted):
    m = EnergyMeter(use_nvml=False)
    with pytest.raises(ValueError):
        m.add_forwards(useful, wasted)
    assert m.report(1).target_forwards == 0


def test_other_bad_inputs():
    with pytest.raises(ValueError):
        EnergyMeter(use_nvml=False).report(-1)
    with pytest.raises(ValueError):
        EnergyMeter(device_index=-1, use_nvml=False)
    with pytest.raises(ValueError):
        EnergyMeter(power_model=400.0, use_nvml=False)
    with pytest.raises(ValueError):
        PowerModel().energy_j(-1.0)
    with pytest.raises(ValueError):
        PowerModel.calibrated(EnergyMeter(use_nvml=False).report(1))
    assert isinstance(EnergyMeter(use_nvml=False).report(1), EnergyReport)
