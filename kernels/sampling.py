"""Fused sampling from logits: temperature, top-k, top-p, min-p and the draw in one kernel.

No sort: thresholds are found by a pivot search over the row (see :mod:`pipesd.kernels.rowops`).
Semantics are those of :func:`pipesd.sampling.filtered_probs`; the draw is inverse CDF with
the uniform ``philox_uniform(seed[b], 0, STREAM_DRAW)``, the same one the PyTorch reference
(``pipesd.verify.reference.sample_ref``) uses. ``temperature == 0`` rows give the argmax
(lowest index on ties).
"""
import torch
import triton
import triton.language as tl

from .rowops import (block_weights, philox_uniform, row_config, row_draw, row_kept_blocks,
                     row_pass_a, row_threshold)

__all__ = ["sample_triton", "filtered_probs_triton"]


@triton.jit
def _sample_kernel(logits_ptr, stride_lb, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr,
                   out_ptr, bad_ptr, V,
                   BLOCK: tl.constexpr, NBLK: tl.constexpr, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    b = tl.program_id(0)
    row = logits_ptr + b.to(tl.int64) * stride_lb
    T = tl.load(temp_ptr + b).to(tl.float32)
    greedy = T <= 0.0
    Ts = tl.where(greedy, 1.0, T)
    m, amax, bad, bmax, bsum = row_pass_a(row, V, Ts, greedy, BLOCK, NBLK, True)
    tok = amax
    if not greedy:
        k = tl.load(topk_ptr + b).to(tl.int32)
        tp = tl.load(topp_ptr + b).to(tl.float32)
        mp = tl.load(minp_ptr + b).to(tl.float32)
        W = block_weights(bmax, bsum, m)
        S = tl.sum(W, 0)
        thr = row_threshold(row, V, Ts, m, S, k, tp, mp, PBLOCK, NPIV)
        if thr > 0:
            W = row_kept_blocks(row, V, Ts, m, thr, BLOCK, NBLK)
            S = tl.sum(W, 0)
        u = philox_uniform(tl.load(seed_ptr + b), b * 0, 1)
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
    T = tl.load(temp_ptr + b).to(tl.float32)
    greedy = T <= 0.0
    Ts = tl.where(greedy, 1.0, T)
    m, amax, bad, bmax, bsum = row_pass_a(row, V, Ts, greedy, BLOCK, NBLK, True)
    k = tl.load(topk_ptr + b).to(tl.int32)
    tp = tl.load(topp_ptr + b).to(tl.float32)
    mp = tl.load(minp_ptr + b).to(tl.float32)
    W = block_weights(bmax, bsum, m)
    S = tl.sum(W, 0)
    thr = k * 0
    if not greedy:
        thr = row_threshold(row, V, Ts, m, S, k, tp, mp, PBLOCK, NPIV)
        if thr > 0:
            W = row_kept_blocks(row, V, Ts, m, thr, BLOCK, NBLK)
            S = tl.sum(W, 0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        msk = idx < V
        x = tl.load(row + idx, mask=msk, other=float("-inf")).to(tl.float32)
        e = tl.exp(x / Ts - m)
        keep = e.to(tl.int32, bitcast=True) >= thr
        p = tl.where(keep, e / S, 0.0)
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
    cfg = row_config(V, block)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    bad = torch.empty(B, dtype=torch.int32, device=logits.device)
    if B:
        _sample_kernel[(B,)](logits, logits.stride(0), temperature, top_k, top_p, min_p, seeds, out, bad, V,
                             BLOCK=cfg["BLOCK"], NBLK=cfg["NBLK"], PBLOCK=cfg["PBLOCK"], NPIV=cfg["NPIV"],
                             num_warps=cfg["num_warps"], **_launch_opts(logits.device))
    return out, bad


def filtered_probs_triton(logits, temperature, top_k, top_p, min_p, block=None):
    """The filtered distribution as the kernels see it (``[B, V]`` fp32) — for tests and tools."""
    B, V = logits.shape
    cfg = row_config(V, block)
    out = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    bad = torch.empty(B, dtype=torch.int32, device=logits.device)
    if B:
        _probs_kernel[(B,)](logits, logits.stride(0), temperature, top_k, top_p, min_p, out, bad, V,
                            BLOCK=cfg["BLOCK"], NBLK=cfg["NBLK"], PBLOCK=cfg["PBLOCK"], NPIV=cfg["NPIV"],
                            num_warps=cfg["num_warps"], **_launch_opts(logits.device))
    return out, bad
