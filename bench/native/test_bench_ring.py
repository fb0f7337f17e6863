"""Ring benchmarks: records per second from a producer thread to a consumer thread.

C++-to-C++ through the native hook ``_native.ring_selftest``; Python threads through
``TokenRing`` against ``queue.Queue`` (single and batched gets) and ``collections.deque`` with
a ``threading.Condition`` (batch pops). ``extra_info["records_per_s"]`` holds the rate.
"""
from __future__ import annotations

import pytest

import _workloads as W

CPP_RECORDS = 5_000_000
PY_RECORDS = 200_000


@pytest.mark.parametrize("topk", [0, 8])
def test_ring_cpp_to_cpp(benchmark, topk):
    benchmark.group = "ring C++ threads"
    rates = []
    benchmark.pedantic(lambda: rates.append(W.ring_cpp(CPP_RECORDS, topk=topk)), rounds=3, iterations=1)
    benchmark.extra_info["records"] = CPP_RECORDS
    benchmark.extra_info["records_per_s"] = max(rates)


@pytest.mark.parametrize("name", list(W.PYTHON_TRANSFERS))
def test_python_threads(benchmark, name):
    benchmark.group = "Python threads"
    rates = []
    fn = W.PYTHON_TRANSFERS[name]
    benchmark.pedantic(lambda: rates.append(fn(PY_RECORDS)), rounds=3, iterations=1)
    benchmark.extra_info["records"] = PY_RECORDS
    benchmark.extra_info["records_per_s"] = max(rates)
