#!/usr/bin/env bash
# Set up a virtual environment (CPU torch wheel first) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PIPESD_VENV:-.venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q ".[test,bench]"
# llama.cpp draft backend: built from source (about 10 min on 2 cores the first time; pip
# caches the wheel). Portable flags. If the build fails, its tests skip and say why.
if ! CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF}" \
     CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" python -m pip install -q "llama-cpp-python>=0.3"; then
    echo "WARNING: llama-cpp-python did not build; tests/test_llamacpp.py will skip its llama.cpp checks" >&2
fi
# Test against the installed package, not the source tree.
cd tests && TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider "$@" ..//tests
