"""PyTorch reference of the verification and sampling kernels (the CPU path, and the oracle).

Everything is phrased per *node* of a token tree (a chain is a tree that is a path):

* node ``n``'s logits row gives the target distribution ``p_n`` of the token that follows
  node ``n`` (:func:`pipesd.sampling.filtered_probs` with the request's parameters);
* node ``n``'s children are tried in increasing node order. Greedy rows (``mode="greedy"``
  or ``temperature == 0``) accept the first child whose token is ``argmax`` (lowest index on
  ties). Sampling rows run multi-candidate rejection (SpecInfer): with residual ``r = p_n``
  and mass ``Z = 1``, child ``c`` with token ``x`` (drawn from ``q_n``, the draft's top-k
  (ids, probs) at node ``n``) is accepted iff ``(u_c * q_n(x)) * Z < r(x)``
  (``u_c = philox(seed, c, STREAM_ACCEPT)``: probability ``min(1, (r(x)/Z) / q_n(x))``); on
  rejection ``r <- max(0, r - Z * q_n)`` and ``Z <- sum(r)``;
* if no child is accepted, the node emits a token drawn by inverse CDF with
  ``u = philox(seed, n, STREAM_DRAW)`` from ``r`` (the residual after the rejected children;
  ``p_n`` itself for a leaf: the bonus token; ``p_n`` again in the measure-zero case ``sum(r) == 0``);
  a leaf emits nothing when the request's ``bonus`` is off;
* the walk starts at node 0 (the last verified token) and follows accepted children.

The Triton kernels compute exactly these decisions (same uniforms, same stream constants
from :mod:`pipesd.verify._rng`); only fp32 rounding of sums may differ, which can flip a
decision only when a uniform lands within rounding of a boundary.

Kernel beside each reference (``src/pipesd/kernels/``): :func:`node_decisions` ~
``verify.verify_nodes_triton``, :func:`walk` ~ ``verify.walk_triton``, :func:`sample_ref` ~
``sampling.sample_triton``, :func:`inverse_cdf` ~ ``rowops.row_draw``. Tests:
``tests/test_verify_chain.py``, ``tests/test_verify_tree.py``, ``tests/test_sample.py``.
"""
from __future__ import annotations

import torch

from ..sampling import filtered_probs
from ._rng import STREAM_ACCEPT, STREAM_DRAW, philox_uniform

__all__ = ["inverse_cdf", "bad_rows", "node_decisions", "walk", "chain_nodes", "tree_children", "sample_ref"]


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose running sum of ``w`` exceeds ``u * sum(w)`` among
    indices with ``w > 0`` (the last positive index if rounding runs past the end)."""
    V = w.shape[-1]
    cs = torch.cumsum(w, -1)
    target = u * cs[..., -1]
    ar = torch.arange(V, device=w.device)
    hit = (cs > target[..., None]) & (w > 0)
    first = torch.where(hit, ar, V).amin(-1)
    last = torch.where(w > 0, ar, -1).amax(-1)
    return torch.where(first == V, last, first).clamp(min=0)


def bad_rows(rows: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """Rows with NaN, ``+inf`` after temperature scaling, or no finite logit (greedy rows: T=1)."""
    x = rows.float()
    y = x / torch.where(temps > 0, temps, torch.ones_like(temps))[:, None]
    return torch.isnan(x).any(-1) | (y == float("inf")).any(-1) | (y.amax(-1) == float("-inf"))


def node_decisions(rows, temps, top_k, top_p, min_p, child_node, child_tok, q_ids, q_probs,
                   seeds, node, sample: bool):
    """Decisions for ``R`` used node rows.

    rows ``[R, V]`` logits; temps/top_k/top_p/min_p ``[R]``; child_node/child_tok ``[R, C]``
    (children in order, ``-1`` padded); q_ids/q_probs ``[R, kq]`` (``-1`` padded ids);
    seeds/node ``[R]``. Returns ``(acc_child[R], cand[R])``: the accepted child's node index
    (-1: none) and the token emitted when no child is accepted (-1 otherwise).
    """
    R = rows.shape[0]
    dev = rows.device
    greedy = temps <= 0 if sample else torch.ones(R, dtype=torch.bool, device=dev)
    acc = torch.full((R,), -1, dtype=torch.int64, device=dev)
    cand = torch.full((R,), -1, dtype=torch.int64, device=dev)
    g, s = greedy, ~greedy
    if bool(g.any()):
        acc[g], cand[g] = _greedy_decisions(rows[g], child_node[g], child_tok[g])
    if bool(s.any()):
        p = filtered_probs(rows[s], temps[s], top_k[s], top_p[s], min_p[s])
        acc[s], cand[s] = _sampled_decisions(p, child_node[s], child_tok[s].long(), q_ids[s].long(),
                                             q_probs[s].float(), seeds[s], node[s])
    return acc, cand


def _greedy_decisions(rows, child_node, child_tok):
    """Greedy rows: the first child whose token is the argmax, else emit the argmax."""
    dev = rows.device
    C = child_node.shape[1]
    amax = rows.float().argmax(-1)
    hit = (child_node >= 0) & (child_tok == amax[:, None])
    first = torch.where(hit, torch.arange(C, device=dev), C).amin(-1) if C else torch.zeros(
        rows.shape[0], dtype=torch.long, device=dev)
    has = first < C
    picked = child_node.gather(1, first.clamp(max=max(C - 1, 0))[:, None]).squeeze(1) if C else first
    return torch.where(has, picked, -1), torch.where(has, -1, amax)


def _sampled_decisions(p, cn, ct, ids, q_probs, sd, node):
    """Sampled rows with target ``p [Rs, V]``: multi-candidate rejection over the children
    ``cn``/``ct`` ``[Rs, C]`` against q (``ids``, ``q_probs`` ``[Rs, kq]``), then the draw."""
    Rs, V = p.shape
    dev = p.device
    qv = torch.where(ids >= 0, q_probs, 0.0)
    idc = torch.where(ids >= 0, ids, V)  # padding -> a dummy column
    r = torch.cat([p, p.new_zeros(Rs, 1)], 1)
    Z = torch.ones(Rs, dtype=torch.float32, device=dev)
    acc_s = torch.full((Rs,), -1, dtype=torch.int64, device=dev)
    rej = torch.zeros(Rs, dtype=torch.bool, device=dev)
    for c in range(cn.shape[1]):
        live = (cn[:, c] >= 0) & (acc_s < 0)
        if not bool(live.any()):
            continue
        x = ct[:, c].clamp(0, V - 1)
        qx = torch.where(ids == x[:, None], qv, 0.0).sum(-1)
        rx = r.gather(1, x[:, None]).squeeze(1)
        u = philox_uniform(sd, cn[:, c].clamp(min=0), STREAM_ACCEPT)
        accept = live & ((u * qx) * Z < rx)
        acc_s = torch.where(accept, cn[:, c], acc_s)
        reject = live & ~accept
        if bool(reject.any()):
            rid = r.gather(1, idc)
            new = torch.where(reject[:, None], torch.clamp(rid - Z[:, None] * qv, min=0.0), rid)
            r.scatter_(1, idc, new)
            r[:, V] = 0.0
            Z = torch.where(reject, r[:, :V].sum(-1), Z)
            rej |= reject
    u = philox_uniform(sd, node, STREAM_DRAW)
    w = torch.where((rej & (Z > 0))[:, None], r[:, :V], p)
    drawn = inverse_cdf(w, u)
    return acc_s, torch.where(acc_s < 0, drawn, -1)


def walk(acc: torch.Tensor, cand: torch.Tensor, node_tok: torch.Tensor):
    """Follow accepted children from node 0. ``acc``/``cand``/``node_tok`` are ``[B, N]``.

    Returns ``(path[B, N], tokens[B, N], accepted[B], num_tokens[B])``: ``path[b, 0] = 0``,
    then the accepted nodes; ``tokens`` the accepted nodes' tokens then the final token
    (``cand`` of the last node on the path, absent when -1); unused slots -1.
    """
    B, N = acc.shape
    dev = acc.device
    ar = torch.arange(B, device=dev)
    path = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    path[:, 0] = 0
    tokens = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    cur = torch.zeros(B, dtype=torch.int64, device=dev)
    depth = torch.zeros(B, dtype=torch.int64, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(N - 1):
        c = acc.gather(1, cur[:, None]).squeeze(1)
        go = live & (c >= 0)
        if not bool(go.any()):
            break
        cg = c.clamp(min=0)
        tokens[ar[go], depth[go]] = node_tok.long()[ar[go], cg[go]]
        depth = depth + go.long()
        path[ar[go], depth[go]] = c[go]
        cur = torch.where(go, c, cur)
        live = go
    final = cand.gather(1, cur[:, None]).squeeze(1)
    tokens[ar, depth] = final
    return path, tokens, depth, depth + (final >= 0).long()


def chain_nodes(draft_tokens: torch.Tensor, num_draft: torch.Tensor, N: int):
    """Chain as a path tree: node ``j``'s only child is node ``j+1`` (token ``draft[j]``) for ``j < num_draft``."""
    B = draft_tokens.shape[0]
    dev = draft_tokens.device
    j = torch.arange(N, device=dev)
    has = j[None, :] < num_draft.long()[:, None]
    child_node = torch.where(has, j[None, :] + 1, -1)[..., None]
    tok = torch.zeros(B, N, dtype=torch.int64, device=dev)
    tok[:, : N - 1] = draft_tokens.long()
    child_tok = torch.where(has, tok, 0)[..., None]
    node_tok = torch.zeros(B, N, dtype=torch.int64, device=dev)
    node_tok[:, 1:] = draft_tokens.long()
    return child_node, child_tok, node_tok


def tree_children(parents: torch.Tensor, num_nodes: torch.Tensor):
    """``child_node[B, N, C]``: node ``n``'s children in increasing order (-1 padded)."""
    B, N = parents.shape
    dev = parents.device
    j = torch.arange(N, device=dev)
    valid_j = j[None, :] < num_nodes.long()[:, None]
    is_child = (parents.long()[:, None, :] == j[None, :, None]) & valid_j[:, None, :] & (j[None, None, :] > j[None, :, None])
    C = max(int(is_child.sum(-1).max()) if is_child.numel() else 0, 1)
    key = torch.where(is_child, j[None, None, :], N).sort(-1).values[..., :C]
    return torch.where(key == N, -1, key)


def sample_ref(logits, temps, top_k, top_p, min_p, seeds) -> torch.Tensor:
    """Reference fused sampler: argmax for ``temperature == 0`` rows, else inverse CDF over
    ``filtered_probs`` with ``u = philox(seed, 0, STREAM_DRAW)``."""
    B, V = logits.shape
    out = logits.float().argmax(-1)
    s = temps > 0
    if bool(s.any()):
        p = filtered_probs(logits[s], temps[s], top_k[s], top_p[s], min_p[s])
        u = philox_uniform(seeds[s], 0, STREAM_DRAW)
        out[s] = inverse_cdf(p, u)
    return out
