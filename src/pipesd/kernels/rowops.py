"""Row-level Triton building blocks shared by the sampling and verification kernels.

One program handles one row of logits ``x[0:V]`` (any float dtype, computed in fp32). With
``y = x / T`` (``T = 1`` for greedy rows), ``m = max(y)`` and ``e = exp(y - m)`` in ``[0, 1]``,
the filtered distribution of :func:`pipesd.sampling.filtered_probs` is
``p = e * [e >= thr] / S`` with ``S`` the kept mass, where the threshold ``thr`` is found
without sorting (see :func:`row_threshold`):

* top-k: ``thr_k`` = the k-th largest ``e`` (ties at the boundary all kept);
* top-p: ``thr_p`` = the smallest kept value ``v`` whose strictly-larger kept mass is
  ``< top_p * S_k`` (the smallest most-probable set reaching ``top_p`` after top-k
  renormalisation; ties at the edge all kept);
* min-p: ``e >= min_p`` (``max e == 1``, so this is ``p >= min_p * max p``).

Every kernel opens its row with :func:`filtered_row` (temperature, pass A, and for sampled
rows the filter: ``(thr, S, W)``). Thresholds are searched over the IEEE bit patterns of
``e`` (non-negative floats order like their int32 bits) with ``NPIV`` pivots per pass over
the row, each pass narrowing the interval ``NPIV + 1``-fold: about 8 passes per threshold for
``NPIV = 16``. Draws are by inverse CDF with one uniform: per-block weights (kept in
registers, ``NBLK`` of them, from :func:`row_block_mass`) select the block, one more read of
that block selects the token. Only tokens with positive weight are ever drawn, whatever the
rounding.

Random numbers: :func:`philox_uniform` with the named streams ``STREAM_ACCEPT`` /
``STREAM_DRAW`` of :mod:`pipesd.verify._rng` (one definition for both backends).

Reference: :func:`pipesd.sampling.filtered_probs` (the filter),
:func:`pipesd.verify.reference.inverse_cdf` (the draw), :func:`pipesd.verify._rng.philox_uniform`
(the uniforms). Tests: ``tests/test_sample.py`` (Philox bits, filtered distribution, sampler).
"""
import triton
import triton.language as tl

from ..verify import _rng

ONE_BITS = tl.constexpr(0x3F800000)  # bit pattern of 1.0f
#: Philox counter word ``c1`` of each random stream (values from :mod:`pipesd.verify._rng`)
STREAM_ACCEPT = tl.constexpr(_rng.STREAM_ACCEPT)  # acceptance test of a child node
STREAM_DRAW = tl.constexpr(_rng.STREAM_DRAW)  # the one draw at a node / a sampled row


@triton.jit
def philox_uniform(seed, c0, STREAM: tl.constexpr):
    """Uniform in (0, 1) from word 0 of Philox4x32-10, key = 64-bit ``seed``, counter = (c0, STREAM, 0, 0).

    ``STREAM`` is ``STREAM_ACCEPT`` or ``STREAM_DRAW``. Bit-identical to
    :func:`pipesd.verify._rng.philox_uniform`.
    """
    s = seed.to(tl.int64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x0 = (s * 0 + c0).to(tl.uint32)
    x1 = x0 * 0 + STREAM
    x2 = x0 * 0
    x3 = x0 * 0
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(x0, 0xD2511F53)
        lo0 = x0 * 0xD2511F53
        hi1 = tl.umulhi(x2, 0xCD9E8D57)
        lo1 = x2 * 0xCD9E8D57
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return ((x0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def row_pass_a(row_ptr, V, T, greedy, BLOCK: tl.constexpr, NBLK: tl.constexpr, STATS: tl.constexpr):
    """One read of the row: max and argmax of ``y`` (lowest index on ties), a bad-row flag (NaN,
    ``+inf`` in ``y``, or all ``-inf``) and, if ``STATS``, per-block max / sum-exp of ``y``.

    ``y = x`` for greedy rows (never divided: the argmax is exact), else ``x / T``. The argmax
    is kept per lane across blocks (no reduction per block); ``STATS`` adds two per block.
    Returns ``(m, argmax, bad, bmax[NBLK], bsum[NBLK])``.
    """
    offs = tl.arange(0, BLOCK)
    bidx = tl.arange(0, NBLK)
    bmax = tl.full([NBLK], float("-inf"), tl.float32)
    bsum = tl.zeros([NBLK], dtype=tl.float32)
    acc_v = tl.full([BLOCK], float("-inf"), tl.float32)
    acc_i = tl.zeros([BLOCK], dtype=tl.int32)
    badv = tl.zeros([BLOCK], dtype=tl.int32)
    for blk in range(0, tl.cdiv(V, BLOCK)):
        idx = blk * BLOCK + offs
        msk = idx < V
        x = tl.load(row_ptr + idx, mask=msk, other=float("-inf")).to(tl.float32)
        if STATS:
            y = tl.where(greedy, x, x / T)
        else:
            y = x
        badv = badv | ((x != x) | (y == float("inf"))).to(tl.int32)
        upd = y > acc_v  # strict: an earlier block keeps a tie on the same lane
        acc_i = tl.where(upd, idx, acc_i)
        acc_v = tl.where(upd, y, acc_v)
        if STATS:
            v = tl.max(y, 0)
            vs = tl.where(v == float("-inf"), 0.0, v)
            s = tl.sum(tl.where(msk, tl.exp(y - vs), 0.0), 0)
            bmax = tl.where(bidx == blk, v, bmax)
            bsum = tl.where(bidx == blk, s, bsum)
    m = tl.max(acc_v, 0)
    amax = tl.min(tl.where(acc_v == m, acc_i, 2147483647), 0)  # lowest index among the lanes' maxima
    bad = tl.max(badv, 0)
    bad = tl.where(m == float("-inf"), 1, bad)
    amax = tl.where(m == float("-inf"), 0, amax)
    return m, amax, bad, bmax, bsum


@triton.jit
def row_e(row_ptr, idx, msk, T, m):
    """``e = exp(x / T - m)`` at ``idx`` (0 where ``msk`` is false)."""
    x = tl.load(row_ptr + idx, mask=msk, other=float("-inf")).to(tl.float32)
    return tl.exp(x / T - m)


@triton.jit
def kept(e, thr):
    """Whether ``e`` survives the filter: ``bits(e) >= thr``."""
    return e.to(tl.int32, bitcast=True) >= thr


@triton.jit
def block_weights(bmax, bsum, m):
    """Per-block unfiltered mass ``sum(e)`` from :func:`row_pass_a`'s block statistics."""
    return tl.where(bmax == float("-inf"), 0.0, bsum * tl.exp(bmax - m))


@triton.jit
def _pivot_eval(row_ptr, V, T, m, piv, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    """For each pivot bit pattern: count and mass of ``e`` with ``bits(e) >= pivot``."""
    offs = tl.arange(0, PBLOCK)
    cnt = tl.zeros([NPIV], dtype=tl.int32)
    mass = tl.zeros([NPIV], dtype=tl.float32)
    for start in range(0, V, PBLOCK):
        idx = start + offs
        msk = idx < V
        e = row_e(row_ptr, idx, msk, T, m)
        bits = e.to(tl.int32, bitcast=True)
        ge = (bits[:, None] >= piv[None, :]) & msk[:, None]
        cnt += tl.sum(ge.to(tl.int32), 0)
        mass += tl.sum(tl.where(ge, e[:, None], 0.0), 0)
    return cnt, mass


@triton.jit
def _search(row_ptr, V, T, m, lo, hi, mass_lo, k_target, mass_target,
            TOPK: tl.constexpr, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    """Smallest bit pattern ``t`` in ``(lo, hi]`` with ``pred(t)``, given ``pred(lo)`` false and
    ``pred(hi)`` true; ``pred(t)`` = count(e >= t) < k_target (TOPK) or mass(e >= t) < mass_target.
    Returns ``(t - 1, mass(e >= t - 1))``: the threshold and the mass it keeps."""
    j = tl.arange(0, NPIV).to(tl.int64) + 1
    while hi - lo > 1:
        d = (hi - lo).to(tl.int64)
        piv = (lo.to(tl.int64) + (d * j) // (NPIV + 1)).to(tl.int32)
        cnt, mass = _pivot_eval(row_ptr, V, T, m, piv, PBLOCK, NPIV)
        if TOPK:
            pred = cnt < k_target
        else:
            pred = mass < mass_target
        mass_lo = tl.min(tl.where(pred, mass_lo, mass), 0)
        new_lo = tl.max(tl.where(pred, lo, piv), 0)
        hi = tl.min(tl.where(pred, piv, hi), 0)
        lo = new_lo
    return lo, mass_lo


@triton.jit
def row_threshold(row_ptr, V, T, m, S0, k, tp, mp, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    """Keep-threshold (int32 bits of ``e``; 0 keeps everything) for top-k / top-p / min-p."""
    lo = k * 0
    mass_lo = S0
    if (k > 0) & (k < V):
        lo, mass_lo = _search(row_ptr, V, T, m, lo, lo + (ONE_BITS + 1), mass_lo, k, 0.0,
                              True, PBLOCK, NPIV)
    if tp < 1.0:
        lo, mass_lo = _search(row_ptr, V, T, m, lo, lo * 0 + (ONE_BITS + 1), mass_lo, k, tp * mass_lo,
                              False, PBLOCK, NPIV)
    thr = lo
    if mp > 0.0:
        thr = tl.maximum(thr, mp.to(tl.float32).to(tl.int32, bitcast=True))
    return thr


@triton.jit
def row_block_mass(row_ptr, V, T, m, thr, S, qid_ptr, nq, BLOCK: tl.constexpr, NBLK: tl.constexpr,
                   RESID: tl.constexpr):
    """Per-block mass of the kept tokens, ``[NBLK]``.

    ``RESID`` false: ``sum(e * kept)`` (``S``, ``qid_ptr``, ``nq`` unused); ``RESID`` true: the
    filtered probability ``sum(e * kept / S)`` over tokens *not* among the ``nq`` ids at
    ``qid_ptr`` (the residual's mass outside the draft's q).
    """
    offs = tl.arange(0, BLOCK)
    bidx = tl.arange(0, NBLK)
    out = tl.zeros([NBLK], dtype=tl.float32)
    for blk in range(0, tl.cdiv(V, BLOCK)):
        idx = blk * BLOCK + offs
        msk = idx < V
        e = row_e(row_ptr, idx, msk, T, m)
        keep = msk & kept(e, thr)
        if RESID:
            for jj in range(0, nq):
                keep = keep & (idx != tl.load(qid_ptr + jj).to(tl.int32))
            w = e / S
        else:
            w = e
        out = tl.where(bidx == blk, tl.sum(tl.where(keep, w, 0.0), 0), out)
    return out


@triton.jit
def filtered_row(row_ptr, V, b, temp_ptr, topk_ptr, topp_ptr, minp_ptr, FILTER: tl.constexpr,
                 BLOCK: tl.constexpr, NBLK: tl.constexpr, PBLOCK: tl.constexpr, NPIV: tl.constexpr):
    """The opening every kernel's row shares: request ``b``'s temperature, pass A and, if
    ``FILTER`` and the row is sampled (``T > 0``), its top-k / top-p / min-p filter.

    Returns ``(Ts, greedy, m, amax, bad, thr, S, W)``: the temperature used (1 for greedy rows),
    the greedy flag, pass A's max / argmax / bad flag, the keep threshold (0: everything
    kept), the kept mass ``S`` and the per-block kept masses ``W[NBLK]`` (in units of ``e``;
    ``p = e * kept(e, thr) / S``). ``thr``, ``S`` and ``W`` are meaningful for sampled rows only.
    """
    T = tl.load(temp_ptr + b).to(tl.float32)
    greedy = T <= 0.0
    Ts = tl.where(greedy, 1.0, T)
    m, amax, bad, bmax, bsum = row_pass_a(row_ptr, V, Ts, greedy, BLOCK, NBLK, FILTER)
    W = block_weights(bmax, bsum, m)
    S = tl.sum(W, 0)
    thr = amax * 0
    if FILTER:
        if not greedy:
            k = tl.load(topk_ptr + b).to(tl.int32)
            tp = tl.load(topp_ptr + b).to(tl.float32)
            mp = tl.load(minp_ptr + b).to(tl.float32)
            thr = row_threshold(row_ptr, V, Ts, m, S, k, tp, mp, PBLOCK, NPIV)
            if thr > 0:
                W = row_block_mass(row_ptr, V, Ts, m, thr, S, topk_ptr, 0, BLOCK, NBLK, False)
                S = tl.sum(W, 0)
    return Ts, greedy, m, amax, bad, thr, S, W


@triton.jit
def scatter_to_blocks(ids, vals, BLOCK: tl.constexpr, NBLK: tl.constexpr):
    """``out[blk] = sum(vals[j] for ids[j] in blk)`` (ids < 0 ignored)."""
    bidx = tl.arange(0, NBLK)
    blk_of = tl.where(ids >= 0, ids // BLOCK, -1)
    return tl.sum(tl.where(bidx[:, None] == blk_of[None, :], vals[None, :], 0.0), 1)


@triton.jit
def row_draw(row_ptr, V, T, m, thr, S, W, u, qid_ptr, nq, rq, resid,
             BLOCK: tl.constexpr, NBLK: tl.constexpr, KQP: tl.constexpr):
    """Inverse-CDF draw with uniform ``u`` over the row's weights.

    ``resid`` false: weights ``e * kept`` (block masses ``W`` in the same units);
    ``resid`` true: weights ``p = e * kept / S`` except ``rq[j]`` at token ``qid_ptr[j]``
    (``j < nq``). Picks the first token whose running sum exceeds ``u * total`` among tokens
    of positive weight (block first, then inside the block); the last positive one if
    rounding runs past the end.
    """
    offs = tl.arange(0, BLOCK)
    bidx = tl.arange(0, NBLK)
    qa = tl.arange(0, KQP)
    Wv = tl.where(bidx < tl.cdiv(V, BLOCK), W, 0.0)
    cw = tl.cumsum(Wv, 0)
    total = tl.max(cw, 0)
    target = u * total
    beta = tl.min(tl.where((cw > target) & (Wv > 0), bidx, NBLK), 0)
    lastb = tl.max(tl.where(Wv > 0, bidx, -1), 0)
    beta = tl.where(beta == NBLK, lastb, beta)
    beta = tl.maximum(beta, 0)
    carry = tl.sum(tl.where(bidx == beta, cw - Wv, 0.0), 0)
    t2 = target - carry
    idx = beta * BLOCK + offs
    msk = idx < V
    e = row_e(row_ptr, idx, msk, T, m)
    w = tl.where(msk & kept(e, thr), tl.where(resid, e / S, e), 0.0)
    if resid:
        for jj in range(0, nq):
            idj = tl.load(qid_ptr + jj).to(tl.int32)
            rj = tl.sum(tl.where(qa == jj, rq, 0.0), 0)
            w = tl.where(msk & (idx == idj), rj, w)
    cs = tl.cumsum(w, 0)
    pos = tl.min(tl.where((cs > t2) & (w > 0), offs, BLOCK), 0)
    lastp = tl.max(tl.where(w > 0, offs, -1), 0)
    pos = tl.where(pos == BLOCK, lastp, pos)
    pos = tl.maximum(pos, 0)
    return beta * BLOCK + pos


def _pow2(n: int, lo: int = 2) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def row_config(V: int, block: int | None = None) -> dict:
    """Launch constants for rows of ``V`` logits (``block`` overrides the streaming block): the
    keyword arguments ``BLOCK``, ``NBLK``, ``PBLOCK``, ``NPIV``, ``num_warps`` of a row kernel's launch."""
    import os

    if block is None:
        block = int(os.environ.get("PIPESD_TRITON_BLOCK", "0")) or min(2048, _pow2(V, 16))
    block = _pow2(block, 16)
    pblock = min(block, int(os.environ.get("PIPESD_TRITON_PBLOCK", "0")) or 256)
    nblk = _pow2(triton.cdiv(V, block))
    num_warps = int(os.environ.get("PIPESD_TRITON_WARPS", "0")) or (8 if block >= 2048 else 4)
    return dict(BLOCK=block, NBLK=nblk, PBLOCK=_pow2(pblock, 16), NPIV=16, num_warps=num_warps)
