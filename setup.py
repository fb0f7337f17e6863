"""Build script: compiles the native core ``pipesd._native`` (pybind11, C++17).

``CMakeLists.txt`` builds the same sources into the same module (plus a C++ test/bench
executable); both read the source list from ``NATIVE_SOURCES`` below / ``csrc/sources.txt``.
"""
import shutil
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
NATIVE_SOURCES = [
    f"csrc/{line.strip()}"
    for line in (HERE / "csrc" / "sources.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def _fail(msg: str) -> None:
    sys.stderr.write(f"\npipesd build error: {msg}\n\n")
    raise SystemExit(1)


try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pragma: no cover - depends on the build environment
    _fail("pybind11 is not installed; run `pip install pybind11` (pip does this for you with `pip install .`).")


class _BuildExt(build_ext):
    def run(self):
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            _fail("no C++17 compiler found (c++/g++/clang++); install one, e.g. `apt-get install g++`.")
        super().run()


ext = Pybind11Extension(
    "pipesd._native",
    sources=NATIVE_SOURCES,
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"] if sys.platform != "win32" else ["/O2"],
)

setup(
    packages=[
        "pipesd",
        *(f"pipesd.{p.relative_to(HERE / 'src' / 'pipesd').as_posix().replace('/', '.')}"
          for p in sorted((HERE / "src" / "pipesd").rglob("*")) if p.is_dir() and (p / "__init__.py").exists()),
    ],
    package_dir={"": "src"},
    package_data={"pipesd.zoo": ["pairs/*/*", "pairs/*/*/*"], "pipesd.transport": ["traces/*.csv"]},
    include_package_data=True,
    ext_modules=[ext],
    cmdclass={"build_ext": _BuildExt},
)
