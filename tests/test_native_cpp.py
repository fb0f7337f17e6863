"""Builds the C++ test executable ``pipesd_native_test`` with CMake and runs it.

The binary checks the planner against brute force and stresses the ring with a producer and
a consumer ``std::thread`` (millions of records), once as an optimised build and once under
ThreadSanitizer (``-DPIPESD_TSAN=ON``), which fails on any data race. Build trees live in
``build/pytest-native-*`` (git-ignored) so reruns are incremental. Skipped, with the reason
shown, only when CMake or a C++ compiler is missing.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_cmake = shutil.which("cmake")
_cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(
    _cmake is None or _cxx is None,
    reason="the C++ test needs CMake and a C++ compiler (cmake: %s, c++: %s)" % (_cmake, _cxx))


def _build(name: str, *options: str) -> Path:
    build = ROOT / "build" / f"pytest-native-{name}"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run([_cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DPIPESD_BUILD_PYTHON=OFF",
                          "-DCMAKE_BUILD_TYPE=Release", *options], capture_output=True, text=True)
    assert cfg.returncode == 0, f"cmake configure failed:\n{cfg.stdout}\n{cfg.stderr}"
    bld = subprocess.run([_cmake, "--build", str(build), "--target", "pipesd_native_test", "-j", "2"],
                         capture_output=True, text=True)
    assert bld.returncode == 0, f"cmake build failed:\n{bld.stdout}\n{bld.stderr}"
    exe = build / "pipesd_native_test"
    assert exe.exists()
    return exe


def _run(exe: Path, records: int) -> str:
    res = subprocess.run([str(exe), "--records", str(records)], capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "ALL PASSED" in out, out
    assert "ThreadSanitizer" not in out, out
    return out


def test_cpp_tests_release():
    out = _run(_build("release"), 2_000_000)
    assert "stress n=2000000" in out


def test_cpp_tests_tsan():
    probe = subprocess.run([_cxx, "-fsanitize=thread", "-x", "c++", "-", "-o", "/dev/null"],
                           input="int main(){return 0;}", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the compiler cannot build with -fsanitize=thread: {probe.stderr.strip()[:200]}")
    _run(_build("tsan", "-DPIPESD_TSAN=ON"), 200_000)
