#!/usr/bin/env bash
# Correctness checks + benchmarks of pipesd.verify's Triton kernels on a CUDA machine
# (< 5 minutes on an H200), then an end-to-end check that a CloudServer with a CUDA target
# verifies with the kernels. Writes verify_bench.json to $OUT (or bench/results/) and prints a
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
# 3) end to end: a target on CUDA behind a CloudServer, one greedy and one sampled generation
#    from a CPU draft; every verify_chain call of the server must have taken the Triton path
#    (logits packed and verified on the GPU, never copied to the host), and no launch may fail.
timeout 120 "$PY" - cuda <<'EOF'
import sys

import torch

from pipesd import zoo
from pipesd.cloud import CloudConfig, CloudServer
from pipesd.edge import EdgeClient
from pipesd.models import DraftModel, TargetModel
from pipesd.sampling import SamplingParams

device = sys.argv[1]
path = zoo.pair_path()
target = TargetModel.from_pretrained(path / "target", device=device)
draft = DraftModel.from_pretrained(path / "draft")
server = CloudServer(target, CloudConfig(port=0))
host, port = server.start_in_thread()
try:
    with EdgeClient(f"{host}:{port}", draft) as client:
        greedy = client.generate("def parse_args(argv):\n", 32)
        sampled = client.generate("def parse_args(argv):\n", 32, SamplingParams(1.0, seed=1))
finally:
    server.stop()
ids = target.tokenizer("def parse_args(argv):\n", return_tensors="pt").input_ids.to(device)
with torch.inference_mode():
    want = target.model.generate(ids, max_new_tokens=32, do_sample=False,
                                 pad_token_id=target.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
st = server.stats
print(f"e2e ({device}): verify_chain calls by backend {st.verify_backends}, failed launches {st.failed_launches}, "
      f"greedy == target-only greedy: {greedy.token_ids == want[:len(greedy.token_ids)]}, "
      f"sampled {sampled.stats.new_tokens} tokens (seed {sampled.stats.seed})")
assert st.failed_launches == 0, "a verifier launch failed (see the log above)"
assert set(st.verify_backends) == {"triton"}, f"verification did not run on the Triton path: {st.verify_backends}"
print("e2e: OK, the cloud verified on the GPU with the Triton kernels")
EOF
