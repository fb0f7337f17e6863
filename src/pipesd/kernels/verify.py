"""Chain and tree verification kernels (greedy and lossless multi-candidate rejection sampling).

Two launches per batch:

1. ``_verify_nodes_kernel``, grid ``(B, N)``: program ``(b, n)`` reads node ``n``'s logits row
   (:func:`~pipesd.kernels.rowops.filtered_row`: max/argmax/block stats, threshold search when
   top-k/top-p/min-p are on; then the residual mass and one block for a draw) and decides which
   child of ``n`` is accepted and, if none, which token ``n`` emits. Every node is independent
   of the others, so all rows of all requests stream in parallel.
2. ``_walk_kernel``, grid ``(B,)``: follows accepted children from node 0 and writes the path,
   the tokens and the counts.

Layouts (padded + lengths, the fields of :class:`pipesd.verify.NodeBatch`): logits
``[B, N, V]`` (last dim contiguous). Chain: ``N = K + 1``, ``tok [B, K]`` drafts, ``len [B]`` =
num_draft; node ``j`` is row ``j``, draft ``j`` is node ``j + 1``. Tree: ``tok [B, N]`` node
tokens (node 0 = last verified token, its token unused), ``par [B, N]`` parents
(``par[0] = -1``, ``par[i] < i``), ``len [B]`` = num_nodes. Draft distributions ``q`` as
(ids, probs) ``[B, N_q, KQ]`` indexed by the *parent* node. Uniforms:
``philox_uniform(seed, child, STREAM_ACCEPT)`` for the acceptance test of a child,
``philox_uniform(seed, node, STREAM_DRAW)`` for the node's draw.

Reference: :func:`pipesd.verify.reference.node_decisions` (``verify_nodes_triton``) and
:func:`pipesd.verify.reference.walk` (``walk_triton``).
Tests: ``tests/test_verify_chain.py``, ``tests/test_verify_tree.py``.
"""
import torch
import triton
import triton.language as tl

from .rowops import (STREAM_ACCEPT, STREAM_DRAW, _pow2, filtered_row, kept, philox_uniform, row_block_mass,
                     row_config, row_draw, row_e, scatter_to_blocks)
from .sampling import _launch_opts

__all__ = ["verify_nodes_triton", "walk_triton"]


@triton.jit
def _mss_step(row, V, Ts, m, thr, S, ids, qv, rq, Z, rej, BS, acc, j, x, seed, qid_row, nq,
              BLOCK: tl.constexpr, NBLK: tl.constexpr):
    """Try child ``j`` (token ``x``) against the current residual (multi-candidate rejection)."""
    hit = ids == x
    qx = tl.sum(tl.where(hit, qv, 0.0), 0)
    inq = tl.sum(hit.to(tl.int32), 0) > 0
    ex = tl.exp(tl.load(row + x).to(tl.float32) / Ts - m)
    px = tl.where(kept(ex, thr), ex / S, 0.0)
    rx = tl.where(inq, tl.sum(tl.where(hit, rq, 0.0), 0), px)
    u = philox_uniform(seed, j, STREAM_ACCEPT)
    if (u * qx) * Z < rx:
        acc = j
    else:
        rq = tl.maximum(rq - Z * qv, 0.0)
        if rej == 0:
            BS = row_block_mass(row, V, Ts, m, thr, S, qid_row, nq, BLOCK, NBLK, True)
            rej = rej + 1
        Z = tl.sum(BS, 0) + tl.sum(rq, 0)
    return acc, rej, Z, rq, BS


@triton.jit
def _greedy_node(tok_row, par_row, n, nn, L, amax, IS_TREE: tl.constexpr):
    """Greedy decision at node ``n``: ``(accepted child or -1, emitted token or -1)``."""
    acc = n * 0 - 1
    if IS_TREE:
        for j in range(n + 1, nn):
            pj = tl.load(par_row + j).to(tl.int32)
            tj = tl.load(tok_row + j).to(tl.int32)
            acc = tl.where((pj == n) & (tj == amax) & (acc < 0), j, acc)
    else:
        if n < L:
            tj = tl.load(tok_row + n).to(tl.int32)
            acc = tl.where(tj == amax, n + 1, acc)
    return acc, tl.where(acc < 0, amax, -1)


@triton.jit
def _sample_node(row, V, Ts, m, thr, S, W, tok_row, par_row, n, nn, L, nq, qid_row, qp_row, seed,
                 IS_TREE: tl.constexpr, BLOCK: tl.constexpr, NBLK: tl.constexpr, KQP: tl.constexpr):
    """Sampled decision at node ``n``: multi-candidate rejection over its children against the
    ``nq`` q entries at ``qid_row``/``qp_row``, then the draw if none is accepted.
    Returns ``(accepted child or -1, emitted token or -1)``."""
    qa = tl.arange(0, KQP)
    qm = qa < nq
    ids = tl.load(qid_row + qa, mask=qm, other=-1).to(tl.int32)
    qv = tl.load(qp_row + qa, mask=qm, other=0.0).to(tl.float32)
    idv = ids >= 0
    qv = tl.where(idv, qv, 0.0)
    ee = row_e(row, ids, idv, Ts, m)
    rq = tl.where(idv & kept(ee, thr), ee / S, 0.0)
    Z = S * 0.0 + 1.0
    rej = n * 0
    acc = n * 0 - 1
    BS = tl.zeros([NBLK], dtype=tl.float32)
    if IS_TREE:
        for j in range(n + 1, nn):
            pj = tl.load(par_row + j).to(tl.int32)
            if (pj == n) & (acc < 0):
                x = tl.load(tok_row + j).to(tl.int32)
                acc, rej, Z, rq, BS = _mss_step(row, V, Ts, m, thr, S, ids, qv, rq, Z, rej, BS,
                                                acc, j, x, seed, qid_row, nq, BLOCK, NBLK)
    else:
        if n < L:
            x = tl.load(tok_row + n).to(tl.int32)
            acc, rej, Z, rq, BS = _mss_step(row, V, Ts, m, thr, S, ids, qv, rq, Z, rej, BS,
                                            acc, n + 1, x, seed, qid_row, nq, BLOCK, NBLK)
    cand = n * 0 - 1
    if acc < 0:
        u = philox_uniform(seed, n, STREAM_DRAW)
        resid = (rej > 0) & (Z > 0.0)
        if resid:
            W = BS + scatter_to_blocks(ids, rq, BLOCK, NBLK)
        cand = row_draw(row, V, Ts, m, thr, S, W, u, qid_row, nq, rq, resid, BLOCK, NBLK, KQP)
    return acc, cand


@triton.jit
def _verify_nodes_kernel(
    logits_ptr, stride_lb, stride_ln,
    tok_ptr, stride_tb,
    par_ptr, stride_pb,
    len_ptr,
    qid_ptr, qp_ptr, stride_qb, stride_qn, KQ,
    temp_ptr, topk_ptr, topp_ptr, minp_ptr, bonus_ptr, seed_ptr,
    acc_ptr, cand_ptr, bad_ptr,
    N, V,
    IS_TREE: tl.constexpr, SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr, NBLK: tl.constexpr, PBLOCK: tl.constexpr, NPIV: tl.constexpr,
    KQP: tl.constexpr, NP: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.program_id(1)
    b64 = b.to(tl.int64)
    L = tl.load(len_ptr + b).to(tl.int32)
    if IS_TREE:
        nn = L
        ar = tl.arange(0, NP)
        par = tl.load(par_ptr + b64 * stride_pb + ar, mask=ar < nn, other=-2).to(tl.int32)
        nchild = tl.sum(((par == n) & (ar > n)).to(tl.int32), 0)
    else:
        nn = L + 1
        nchild = (n < L).to(tl.int32)
    bonus = tl.load(bonus_ptr + b) != 0
    acc = n * 0 - 1
    cand = n * 0 - 1
    bad = n * 0
    if (n < nn) & ((nchild > 0) | bonus):
        row = logits_ptr + b64 * stride_lb + n.to(tl.int64) * stride_ln
        Ts, greedy, m, amax, bad, thr, S, W = filtered_row(row, V, b, temp_ptr, topk_ptr, topp_ptr, minp_ptr,
                                                           SAMPLE, BLOCK, NBLK, PBLOCK, NPIV)
        # row pointers formed after pass A: live across fewer loops (no stack use at sm_90)
        tok_row = tok_ptr + b64 * stride_tb
        par_row = par_ptr + b64 * stride_pb
        if greedy:
            acc, cand = _greedy_node(tok_row, par_row, n, nn, L, amax, IS_TREE)
        else:
            if SAMPLE:
                qbase = b64 * stride_qb + n.to(tl.int64) * stride_qn
                acc, cand = _sample_node(row, V, Ts, m, thr, S, W, tok_row, par_row, n, nn, L,
                                         tl.where(nchild > 0, KQ, 0), qid_ptr + qbase, qp_ptr + qbase,
                                         tl.load(seed_ptr + b), IS_TREE, BLOCK, NBLK, KQP)
    o = b64 * N + n
    tl.store(acc_ptr + o, acc)
    tl.store(cand_ptr + o, cand)
    tl.store(bad_ptr + o, bad)


@triton.jit
def _walk_kernel(acc_ptr, cand_ptr, tok_ptr, stride_tb, path_ptr, tokens_ptr, nacc_ptr, ntok_ptr, N,
                 IS_TREE: tl.constexpr, NP: tl.constexpr):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    ar = tl.arange(0, NP)
    path = tl.where(ar == 0, 0, -1).to(tl.int64)
    toks = tl.where(ar < 0, 0, -1).to(tl.int64)
    cur = b * 0
    depth = b * 0
    done = b * 0
    for _i in range(1, N):
        c = tl.load(acc_ptr + b64 * N + cur)
        if (done == 0) & (c >= 0):
            if IS_TREE:
                t = tl.load(tok_ptr + b64 * stride_tb + c).to(tl.int64)
            else:
                t = tl.load(tok_ptr + b64 * stride_tb + c - 1).to(tl.int64)
            toks = tl.where(ar == depth, t, toks)
            depth = depth + 1
            path = tl.where(ar == depth, c.to(tl.int64), path)
            cur = c
        else:
            done = done + 1
    final = tl.load(cand_ptr + b64 * N + cur).to(tl.int64)
    toks = tl.where(ar == depth, final, toks)
    tl.store(path_ptr + b64 * N + ar, path, mask=ar < N)
    tl.store(tokens_ptr + b64 * N + ar, toks, mask=ar < N)
    tl.store(nacc_ptr + b, depth.to(tl.int64))
    tl.store(ntok_ptr + b, (depth + (final >= 0).to(tl.int32)).to(tl.int64))


def verify_nodes_triton(logits, tok, par, lengths, q_ids, q_probs, temps, top_k, top_p, min_p, bonus, seeds,
                        *, is_tree: bool, sample: bool, block=None):
    """Per-node decisions (layout: the module docstring / :class:`pipesd.verify.NodeBatch`). All
    per-request tensors ``[B]`` on the logits' device (temps fp32, top_k int32, top_p/min_p fp32,
    bonus int8, seeds int64); ``par`` None for chains; ``q_ids``/``q_probs`` None when greedy.
    Returns ``(acc, cand, bad)`` ``[B, N]`` int32."""
    B, N, V = logits.shape
    dev = logits.device
    acc = torch.empty(B, N, dtype=torch.int32, device=dev)
    cand = torch.empty(B, N, dtype=torch.int32, device=dev)
    bad = torch.empty(B, N, dtype=torch.int32, device=dev)
    if B == 0:
        return acc, cand, bad
    if q_ids is None:
        q_ids = torch.full((1, 1, 1), -1, dtype=torch.int32, device=dev)
        q_probs = torch.zeros((1, 1, 1), dtype=torch.float32, device=dev)
    KQ = q_ids.shape[-1]
    if par is None:
        par = lengths  # unused (chain)
    _verify_nodes_kernel[(B, N)](
        logits, logits.stride(0), logits.stride(1),
        tok, tok.stride(0) if tok.dim() == 2 else 0,
        par, par.stride(0) if par.dim() == 2 else 0,
        lengths,
        q_ids, q_probs, q_ids.stride(0), q_ids.stride(1), KQ,
        temps, top_k, top_p, min_p, bonus, seeds,
        acc, cand, bad, N, V,
        IS_TREE=is_tree, SAMPLE=sample, KQP=_pow2(KQ), NP=_pow2(N) if is_tree else 2,
        **row_config(V, block), **_launch_opts(dev))
    return acc, cand, bad


def walk_triton(acc, cand, tok, *, is_tree: bool):
    """Follow accepted children. Returns ``(path[B, N], tokens[B, N], accepted[B], num_tokens[B])`` int64."""
    B, N = acc.shape
    dev = acc.device
    path = torch.empty(B, N, dtype=torch.int64, device=dev)
    tokens = torch.empty(B, N, dtype=torch.int64, device=dev)
    nacc = torch.empty(B, dtype=torch.int64, device=dev)
    ntok = torch.empty(B, dtype=torch.int64, device=dev)
    if B:
        _walk_kernel[(B,)](acc, cand, tok, tok.stride(0) if tok.dim() == 2 else 0, path, tokens, nacc, ntok, N,
                           IS_TREE=is_tree, NP=_pow2(N), num_warps=1)
    return path, tokens, nacc, ntok
