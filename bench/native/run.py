"""Native-core benchmark table: planner and ring, with targets, as text and JSON.

    python bench/native/run.py [--quick] [--out bench/results]

Prints a header (machine, commit, settings) and a short table, and writes the same numbers to
``bench/results/native_<UTC time>.json``. Best of ``--rounds`` runs per figure: the minimum
time (maximum rate) is the least disturbed by other load on the machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import _workloads as W  # noqa: E402
from pipesd.scheduling import plan_batches_expected  # noqa: E402

TARGETS = {
    "plan_n64_max_us": 20.0,
    "plan_n64_min_speedup": 50.0,
    "ring_cpp_min_records_per_s": 5e6,
    "ring_py_min_ratio_vs_queue": 3.0,
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # pragma: no cover - no git
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best_time(fn, number: int, rounds: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer records and repetitions (smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    cpp_records = 1_000_000 if args.quick else 10_000_000
    py_records = 50_000 if args.quick else 200_000

    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "csrc", "src/pipesd/scheduling.py", "src/pipesd/ring.py"))
    header = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.node()} | {_cpu_model()} | {os.cpu_count()} CPUs | load {os.getloadavg()[0]:.2f}",
        "python": sys.version.split()[0],
        "commit": commit + ("+dirty" if dirty else ""),
        "settings": {"plan_costs_g_s_c": W.PLAN_COSTS, "rounds": args.rounds, "cpp_records": cpp_records,
                     "py_records": py_records, "ring_capacity_py": W.CAPACITY, "batch": W.BATCH},
    }
    print("PipeSD native-core benchmark")
    for k, v in header.items():
        print(f"  {k}: {v}")

    # ------------------------------------------------------------------ scheduler
    sched = []
    print("\nDP planner (time per plan)")
    print(f"  {'n':>5} {'C++ via API':>12} {'C++ core':>10} {'Python ref':>12} {'speed-up':>9}")
    for n in (16, 64, 256, 512):
        reps = max(20, 20000 // n)
        api = _best_time(lambda: W.plan_native(n), reps, args.rounds)
        core = min(W.plan_core_seconds(n, reps) for _ in range(args.rounds))
        ref_reps = max(1, 1000 // n)
        ref = _best_time(lambda: W.plan_reference(n), ref_reps, args.rounds)
        sched.append({"n": n, "api_s": api, "core_s": core, "reference_s": ref, "speedup": ref / api})
        print(f"  {n:>5} {api * 1e6:>9.2f} us {core * 1e6:>7.2f} us {ref * 1e6:>9.1f} us {ref / api:>8.0f}x")
    probs = np.random.default_rng(0).exponential(size=64)
    probs /= probs.sum()
    exp_s = _best_time(lambda: plan_batches_expected(probs, *W.PLAN_COSTS), 100, args.rounds)
    print(f"  expected-cost plan, N=64 (random distribution): {exp_s * 1e6:.1f} us")

    # ------------------------------------------------------------------ ring
    print("\nRing: records/s from a producer thread to a consumer thread")
    ring = {"cpp_to_cpp": max(W.ring_cpp(cpp_records) for _ in range(args.rounds)),
            "cpp_to_cpp_topk8": max(W.ring_cpp(cpp_records // 2, topk=8) for _ in range(args.rounds))}
    print(f"  {'C++ -> C++ (cap 1024, batch 256)':<40} {ring['cpp_to_cpp'] / 1e6:>8.2f} M/s")
    print(f"  {'C++ -> C++, top-8 payload':<40} {ring['cpp_to_cpp_topk8'] / 1e6:>8.2f} M/s")
    for name, fn in W.PYTHON_TRANSFERS.items():
        ring[name] = max(fn(py_records) for _ in range(args.rounds))
    q = ring["queue.Queue (get)"]
    for name in W.PYTHON_TRANSFERS:
        print(f"  {'Py threads: ' + name:<40} {ring[name] / 1e6:>8.2f} M/s  ({ring[name] / q:.1f}x queue.Queue)")

    # ------------------------------------------------------------------ targets
    n64 = next(r for r in sched if r["n"] == 64)
    checks = {
        f"plan n=64 <= {TARGETS['plan_n64_max_us']:.0f} us": n64["api_s"] * 1e6 <= TARGETS["plan_n64_max_us"],
        f"plan n=64 >= {TARGETS['plan_n64_min_speedup']:.0f}x reference": n64["speedup"] >= TARGETS["plan_n64_min_speedup"],
        "ring C++->C++ >= 5 M/s": ring["cpp_to_cpp"] >= TARGETS["ring_cpp_min_records_per_s"],
        "ring Py threads >= 3x queue.Queue": ring["ring (pop_batch)"] / q >= TARGETS["ring_py_min_ratio_vs_queue"],
    }
    print("\nTargets")
    for k, ok in checks.items():
        print(f"  [{'PASS' if ok else 'MISS'}] {k}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"native_{header['time_utc'].replace(':', '').replace('-', '')}.json"
    path.write_text(json.dumps({"header": header, "scheduler": sched, "expected_n64_s": exp_s, "ring": ring,
                                "targets": TARGETS, "checks": checks}, indent=2))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
