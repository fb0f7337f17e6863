"""Cloud energy of verification: measured with NVML where possible, modelled everywhere, and the
hardware-independent count of target token-forwards (useful and wasted) always.

Every number says what it is: :attr:`EnergyReport.source` is ``"nvml"`` (the GPU's own
total-energy counter read around each verification) or ``"model"`` (busy seconds x
:attr:`PowerModel.busy_power_w`, or forwards x :attr:`PowerModel.joules_per_forward`). The
model's estimate is reported beside a measurement too (``model_joules``), so one NVML run
calibrates the model for machines without NVML (:meth:`PowerModel.calibrated`).

See ``docs/energy.md``.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

__all__ = ["PowerModel", "EnergyReport", "EnergyMeter", "SOURCE_NVML", "SOURCE_MODEL"]

SOURCE_NVML = "nvml"
SOURCE_MODEL = "model"


def _nonneg(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


@dataclass(frozen=True)
class PowerModel:
    """Board power while verifying, for machines without an energy counter.

    Defaults and where they come from:

    - ``busy_power_w = 400``: the board power limit (TDP) of the A100/A800 SXM4 GPUs the paper's
      cloud used (NVIDIA datasheet). A bound more than a reading: small-batch verification is
      memory-bound and often draws less; H100/H200 SXM boards are rated up to 700 W. Sanity
      check: the paper's 56 J per 100 accepted tokens at ~20 verifications is ~2.8 J per
      verification, i.e. ~7 ms at 400 W, the time to stream a 6.7B fp16 model's 13.4 GB of
      weights once at ~2 TB/s.
    - ``idle_power_w = 60``: the order of an idle datacentre GPU's draw as nvidia-smi reports
      it (tens of watts); only used by :meth:`run_energy_j`.
    - ``joules_per_forward``: if set, energy is ``target_forwards * joules_per_forward``
      instead of busy time x power. Per-token costing suits compute-bound batches; a chain
      verification of a few tokens costs about one weight read whatever its length, so the
      busy-time model is the default.

    Calibrate with one NVML run: ``PowerModel.calibrated(report)``.
    """

    busy_power_w: float = 400.0
    idle_power_w: float = 60.0
    joules_per_forward: Optional[float] = None

    def __post_init__(self) -> None:
        _nonneg("busy_power_w", self.busy_power_w)
        _nonneg("idle_power_w", self.idle_power_w)
        if self.joules_per_forward is not None:
            _nonneg("joules_per_forward", self.joules_per_forward)

    def energy_j(self, busy_s: float, forwards: int = 0) -> float:
        """Joules of verification work: ``busy_s * busy_power_w`` (or ``forwards *
        joules_per_forward`` when that is set)."""
        busy_s = _nonneg("busy_s", busy_s)
        forwards = _count("forwards", forwards)
        if self.joules_per_forward is not None:
            return forwards * self.joules_per_forward
        return busy_s * self.busy_power_w

    def run_energy_j(self, busy_s: float, wall_s: float) -> float:
        """Whole-run board energy: busy time at ``busy_power_w``, the rest of ``wall_s`` idle."""
        busy_s, wall_s = _nonneg("busy_s", busy_s), _nonneg("wall_s", wall_s)
        return busy_s * self.busy_power_w + max(0.0, wall_s - busy_s) * self.idle_power_w

    def describe(self) -> str:
        if self.joules_per_forward is not None:
            return f"{self.joules_per_forward:g} J per target token-forward"
        return f"busy time x {self.busy_power_w:g} W"

    @classmethod
    def calibrated(cls, report: "EnergyReport", idle_power_w: float = 60.0) -> "PowerModel":
        """A model whose busy power is what NVML measured: ``report.joules / report.busy_s``."""
        if report.source != SOURCE_NVML:
            raise ValueError("calibration needs a report measured with NVML (source 'nvml')")
        if report.busy_s <= 0:
            raise ValueError("calibration needs busy time > 0")
        return cls(busy_power_w=report.joules / report.busy_s, idle_power_w=idle_power_w)


@dataclass(frozen=True)
class EnergyReport:
    """Cloud energy and work for ``generated_tokens`` tokens.

    ``joules`` is measured (``source == "nvml"``) or modelled (``"model"``); ``model_joules``
    is always the model's figure. ``target_forwards`` counts every token position the target
    scored for verification; ``wasted_forwards`` those that were rejected drafts (or came after
    a rejection); ``useful_forwards`` the rest. Hardware-independent, and comparable across
    machines where joules are not.
    """

    joules: float
    joules_per_token: Optional[float]  # None when no token was generated
    source: str
    target_forwards: int
    wasted_forwards: int
    useful_forwards: int
    wasted_fraction: float  # wasted / target forwards (0 when none)
    busy_s: float  # time inside measure(): verification, as the cloud timed it
    verifications: int  # measure() windows
    generated_tokens: int
    model_joules: float
    power_model: str
    note: str = ""  # why the source is the model, where NVML was wanted

    def to_dict(self) -> dict:
        return asdict(self)


def _import_nvml():
    try:
        import pynvml  # nvidia-ml-py (or the older pynvml package); optional, never required
    except Exception:
        return None
    return pynvml


class EnergyMeter:
    """Cloud-side meter: wrap each verification in :meth:`measure`, count forwards with
    :meth:`add_forwards`, read :meth:`report`.

    NVML is used when ``pynvml`` imports, initialises and answers
    ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since driver load; Volta and newer)
    for ``device_index``; otherwise, and for the whole run if a later read fails, the power
    model. ``nvml`` injects an NVML-like object (tests, or an already initialised module).

    Windows that overlap (several threads verifying at once) are merged: NVML's counter covers
    the whole GPU, so energy and busy time are taken over the union of the windows, never
    counted twice. The counter's update interval is the driver's: a window shorter than it
    reads as zero or one step, so per-window readings are coarse while sums over many
    verifications are what to report (compare ``model_joules``).
    """

    def __init__(self, device_index: int = 0, power_model: Optional[PowerModel] = None, *, nvml: Any = None,
                 use_nvml: bool = True, clock=time.perf_counter) -> None:
        _count("device_index", device_index)
        if power_model is not None and not isinstance(power_model, PowerModel):
            raise ValueError(f"power_model must be a PowerModel, got {type(power_model).__name__}")
        self.power_model = power_model or PowerModel()
        self.device_index = device_index
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handle: Any = None
        self._source = SOURCE_MODEL
        self.note = ""
        if use_nvml:
            mod = nvml if nvml is not None else _import_nvml()
            if mod is None:
                self.note = "NVML unavailable: pynvml (nvidia-ml-py) is not installed"
            else:
                try:
                    mod.nvmlInit()
                    handle = mod.nvmlDeviceGetHandleByIndex(device_index)
                    int(mod.nvmlDeviceGetTotalEnergyConsumption(handle))  # probe: supported?
                    self._nvml, self._handle = mod, handle
                    self._source = SOURCE_NVML
                except Exception as e:
                    self.note = f"NVML unavailable: {type(e).__name__}: {e}"
                    try:
                        mod.nvmlShutdown()
                    except Exception:
                        pass
        else:
            self.note = "NVML not requested"
        self.reset()

    @property
    def source(self) -> str:
        """``"nvml"`` while every read so far succeeded, else ``"model"``."""
        return self._source

    def reset(self) -> None:
        """Zero the counters (e.g. per benchmark run); the source stays as it is."""
        with self._lock:
            self._active = 0
            self._t0 = 0.0
            self._e0: Optional[int] = None
            self._busy_s = 0.0
            self._nvml_mj = 0
            self._windows = 0
            self._forwards = 0
            self._wasted = 0

    def _read_mj(self) -> Optional[int]:
        if self._source != SOURCE_NVML:
            return None
        if self._nvml is None:
            self._fail("measure() after close()")
            return None
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception as e:
            self._fail(f"NVML read failed: {type(e).__name__}: {e}")
            return None

    def _fail(self, why: str) -> None:
        # A run mixes no sources: from now on (and for what was measured before) the model speaks.
        self._source = SOURCE_MODEL
        self.note = f"{why}; the whole run is reported from the model"

    @contextmanager
    def measure(self) -> Iterator[None]:
        """Around one verification (on the thread that runs it)."""
        with self._lock:
            if self._active == 0:
                self._t0 = self._clock()
                self._e0 = self._read_mj()
            self._active += 1
            self._windows += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._busy_s += max(0.0, self._clock() - self._t0)
                    if self._e0 is not None:
                        e1 = self._read_mj()
                        if e1 is not None:
                            if e1 < self._e0:
                                self._fail("NVML energy counter went backwards (driver reload?)")
                            else:
                                self._nvml_mj += e1 - self._e0
                    self._e0 = None

    def add_forwards(self, useful: int, wasted: int) -> None:
        """Count target token-forwards of a verification: ``useful`` (accepted drafts and the
        position that produced the correction/bonus) and ``wasted`` (rejected drafts, and drafts
        after a rejection, that were scored anyway)."""
        useful = _count("useful", useful)
        wasted = _count("wasted", wasted)
        with self._lock:
            self._forwards += useful + wasted
            self._wasted += wasted

    def report(self, generated_tokens: int) -> EnergyReport:
        """Energy and forwards so far, per ``generated_tokens`` (the tokens the runs produced)."""
        generated_tokens = _count("generated_tokens", generated_tokens)
        with self._lock:
            busy, fwd, wasted, n = self._busy_s, self._forwards, self._wasted, self._windows
            nvml_j = self._nvml_mj / 1000.0
            source = self.source
            note = self.note
        model_j = self.power_model.energy_j(busy, fwd)
        joules = nvml_j if source == SOURCE_NVML else model_j
        return EnergyReport(
            joules=joules,
            joules_per_token=joules / generated_tokens if generated_tokens else None,
            source=source,
            target_forwards=fwd,
            wasted_forwards=wasted,
            useful_forwards=fwd - wasted,
            wasted_fraction=wasted / fwd if fwd else 0.0,
            busy_s=busy,
            verifications=n,
            generated_tokens=generated_tokens,
            model_joules=model_j,
            power_model=self.power_model.describe(),
            note=note,
        )

    def close(self) -> None:
        """Release NVML; what was measured stays reportable (a later measure() falls back to the
        model for the whole run)."""
        mod, self._nvml = self._nvml, None
        if mod is not None:
            try:
                mod.nvmlShutdown()
            except Exception:
                pass
