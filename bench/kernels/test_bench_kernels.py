"""pytest-benchmark microbenchmarks: Triton kernels vs the PyTorch reference (and vs torch's own
softmax / top-k / top-p / multinomial chain for sampling), batch 1-256, draft length 1-16,
vocab 32k / 128k / 152k.

    pytest bench/kernels -q --benchmark-json=bench/results/kernels.json

GPU only: without CUDA the module skips with one line (the kernels' CPU checks live in tests/).
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("bench/kernels: no CUDA device — the Triton kernels are benchmarked on GPU only "
                "(CPU correctness: tests/ under TRITON_INTERPRET=1)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
    pytest.skip("bench/kernels: unset TRITON_INTERPRET to benchmark compiled kernels", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import common as C  # noqa: E402

import pipesd.verify as pv  # noqa: E402

DEV = torch.device("cuda")
VOCABS = [32000, 128256, 152064]


def _run(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()
    call()  # compile / warm up outside the measurement
    benchmark.pedantic(call, rounds=10, iterations=3, warmup_rounds=1)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("B,K", [(1, 1), (1, 8), (8, 4), (64, 8), (64, 16), (256, 1), (256, 8)])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_chain(benchmark, impl, mode, B, K, V):
    inp = C.chain_inputs(B, K, V, mode=mode, device=DEV)
    benchmark.extra_info.update(bytes=inp["target_logits"].numel() * 2, impl=impl)
    _run(benchmark, lambda: pv.verify_chain(force_triton=(impl == "triton"), **inp))


@pytest.mark.parametrize("V", [128256])
@pytest.mark.parametrize("B,N", [(1, 15), (64, 15), (64, 31)])
@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tree(benchmark, impl, mode, B, N, V):
    inp = C.tree_inputs(B, N, V, mode=mode, device=DEV)
    _run(benchmark, lambda: pv.verify_tree(force_triton=(impl == "triton"), **inp))


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("B", [1, 64, 256])
@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.8, 50, 0.9)], ids=["T1", "T0.8-k50-p0.9"])
@pytest.mark.parametrize("impl", ["triton", "torch", "torch_chain"])
def test_sample(benchmark, impl, params, B, V):
    T, k, p = params
    x = (2 * torch.randn(B, V, device=DEV)).to(torch.bfloat16)
    if impl == "torch_chain":
        _run(benchmark, lambda: C.torch_sampling_chain(x, T, k, p))
    else:
        _run(benchmark, lambda: pv.sample(x, T, k, p, 0.0, seed=1, force_triton=(impl == "triton")))
