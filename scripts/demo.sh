#!/usr/bin/env bash
# Set up a virtual environment (CPU torch wheel first), install PipeSD, run the demo:
# a cloud server and an edge client on this machine, bundled models, emulated 4G link.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PIPESD_VENV:-.venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"   # CPU wheel; on a GPU machine install your CUDA torch instead
python -m pip install -q .
exec pipesd demo "$@"
