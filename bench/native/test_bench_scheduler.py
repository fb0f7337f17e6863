"""Scheduler benchmarks: C++ planner (through the Python API) vs the pure-Python reference.

Run: ``python -m pytest bench/native --benchmark-only`` (see README.md). Each C++ case also
records the reference's time and the speed-up in ``extra_info``.
"""
from __future__ import annotations

import timeit

import pytest

import _workloads as W

SIZES = [16, 64, 256, 512]


@pytest.mark.parametrize("n", SIZES)
def test_plan_native(benchmark, n):
    benchmark.group = f"plan n={n}"
    plan = benchmark(W.plan_native, n)
    assert plan == W.plan_reference(n)
    ref_reps = max(1, 2000 // n)
    ref_s = min(timeit.repeat(lambda: W.plan_reference(n), number=ref_reps, repeat=3)) / ref_reps
    benchmark.extra_info["reference_s"] = ref_s
    benchmark.extra_info["speedup_vs_reference"] = ref_s / benchmark.stats.stats.min
    benchmark.extra_info["core_s"] = W.plan_core_seconds(n, max(10, 200_000 // (n * n) * 10))


@pytest.mark.parametrize("n", SIZES)
def test_plan_reference(benchmark, n):
    benchmark.group = f"plan n={n}"
    benchmark.pedantic(W.plan_reference, args=(n,), rounds=5 if n >= 256 else 20, iterations=1)
