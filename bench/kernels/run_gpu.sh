#!/usr/bin/env bash
# Correctness checks + benchmarks of pipesd.verify's Triton kernels on a CUDA machine
# (< 5 minutes on an H200). Writes verify_bench.json to $OUT (or bench/results/) and prints a
# table. On a machine without CUDA it says why it skipped and exits 0.
#   bench/kernels/run_gpu.sh [--quick] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "run_gpu.sh: skipped — no CUDA device visible to torch (torch.cuda.is_available() is False)."
    echo "run_gpu.sh: the kernels are checked on CPU by the test suite (TRITON_INTERPRET=1) and compiled for sm_90 by tests/test_sample.py."
    exit 0
fi
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true
# 1) every kernel compiles for this GPU's architecture (registers / spills listed)
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)")
timeout 120 "$PY" -m pipesd.kernels.aot_check --arch "$ARCH" --dtype bf16 || echo "aot_check failed (continuing)"
# 2) correctness on the GPU + timings (the script stops starting grid points after --budget-s)
timeout 280 "$PY" bench/kernels/run_gpu.py --budget-s 200 "$@"
