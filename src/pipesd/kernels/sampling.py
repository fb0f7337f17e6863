"""Fused sampling from logits: temperature, top-k, top-p, min-p and the draw in one kernel.

No sort: thresholds are found by a pivot search over the row (see :mod:`pipesd.kernels.rowops`;
both kernels open their row with :func:`~pipesd.kernels.rowops.filtered_row`). Semantics are
those of :func:`pipesd.sampling.filtered_probs`; the draw is inverse CDF with the uniform
``philox_uniform(seed[b], 0, STREAM_DRAW)``. ``temperature == 0`` rows give the argmax
(lowest index on ties).

Reference: :func:`pipesd.verify.reference.sample_ref` (``sample_triton``) and
:func:`pipesd.sampling.filtered_probs` (``filtered_probs_triton``).
Tests: ``tests/test_sample.py``.
"""
import torch
import triton
import triton.language as tl

from .rowops import STREAM_DRAW, filtered_row, kept, philox_uniform, row_config, row_draw, row_e

__all__ = ["sample_triton", "filtered_probs_triton"]


@triton.jit
def _sample_kernel(logits_ptr, stride_lb, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr,
                   out_ptr, bad_ptr, V,
                   BLOCK: tl.constexpr, NBLK: tl.constexpr, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    b = tl.program_id(0)
    row = logits_ptr + b.to(tl.int64) * stride_lb
    Ts, greedy, m, amax, bad, thr, S, W = filtered_row(row, V, b, temp_ptr, topk_ptr, topp_ptr, minp_ptr, True,
                                                       BLOCK, NBLK, PBLOCK, NPIV)
    tok = amax
    if not greedy:
        u = philox_uniform(tl.load(seed_ptr + b), b * 0, STREAM_DRAW)
        rq = tl.zeros([2], dtype=tl.float32)
        tok = row_draw(row, V, Ts, m, thr, S, W, u, seed_ptr, 0, rq, False, BLOCK, NBLK, 2)
    tl.store(out_ptr + b, tok)
    tl.store(bad_ptr + b, bad)


@triton.jit
def _probs_kernel(logits_ptr, stride_lb, temp_ptr, topk_ptr, topp_ptr, minp_ptr, out_ptr, bad_ptr, V,
                  BLOCK: tl.constexpr, NBLK: tl.constexpr, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    b = tl.program_id(0)
    row = logits_ptr + b.to(tl.int64) * stride_lb
    orow = out_ptr + b.to(tl.int64) * V
    Ts, greedy, m, amax, bad, thr, S, W = filtered_row(row, V, b, temp_ptr, topk_ptr, topp_ptr, minp_ptr, True,
                                                       BLOCK, NBLK, PBLOCK, NPIV)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        msk = idx < V
        e = row_e(row, idx, msk, Ts, m)
        p = tl.where(kept(e, thr), e / S, 0.0)
        p = tl.where(greedy, tl.where(idx == amax, 1.0, 0.0), p)
        tl.store(orow + idx, p, mask=msk)
    tl.store(bad_ptr + b, bad)


def _launch_opts(device: torch.device) -> dict:
    # No FMA contraction: keeps the GPU's rounding of `(u * q) * Z` etc. step-by-step like the reference.
    return {"enable_fp_fusion": False} if device.type == "cuda" else {}


def sample_triton(logits, temperature, top_k, top_p, min_p, seeds, block=None):
    """Launch the fused sampler. ``logits [B, V]`` (last dim contiguous); per-row params as
    ``[B]`` tensors (fp32, int32, fp32, fp32), ``seeds [B]`` int64. Returns ``(tokens[B] int64,
    bad[B] int32)``."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    bad = torch.empty(B, dtype=torch.int32, device=logits.device)
    if B:
        _sample_kernel[(B,)](logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, out, bad, V,
                             **row_config(V, block), **_launch_opts(logits.device))
    return out, bad


def filtered_probs_triton(logits, temperature, top_k, top_p, min_p, block=None):
    """The filtered distribution as the kernels see it (``[B, V]`` fp32) — for tests and tools."""
    B, V = logits.shape
    out = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    bad = torch.empty(B, dtype=torch.int32, device=logits.device)
    if B:
        _probs_kernel[(B,)](logits, logits.stride(0), temperature, top_k, top_p, min_p, out, bad, V,
                            **row_config(V, block), **_launch_opts(logits.device))
    return out, bad
