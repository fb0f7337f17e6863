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
# Test against the installed package, not the source tree.
cd tests && TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider "$@" ..//tests
