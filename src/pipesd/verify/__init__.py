"""Batched speculative-decoding verification and fused sampling (``docs/verify.md``).

Three functions, each running the Triton kernels (:mod:`pipesd.kernels`) on CUDA tensors and
the PyTorch reference (:mod:`pipesd.verify.reference`) elsewhere, with identical semantics
and identical random draws for the same seeds:

* :func:`verify_chain` — ragged batch of draft chains, greedy or lossless rejection sampling;
* :func:`verify_tree` — ragged batch of draft token trees (greedy walk or SpecInfer-style
  multi-candidate rejection sampling);
* :func:`sample` — temperature / top-k / top-p / min-p sampling from logits, no sort.

:func:`verify_chain` and :func:`verify_tree` are thin front-ends: they validate their layout
and build one :class:`NodeBatch` (the ragged batch as token trees, a chain being a path),
which either backend runs. ``backend(tensor)`` says which path runs (q rows wider than
``TRITON_MAX_Q_ENTRIES``, e.g. a full-vocabulary q, always take the reference;
``verdict.backend`` records the path taken); ``force_triton=True`` (or
``PIPESD_FORCE_TRITON=1``) runs the kernels on CPU tensors under ``TRITON_INTERPRET=1``;
``force_triton=False`` runs the reference even on CUDA.
"""
from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

from . import reference as _ref
from ._rng import STREAM_ACCEPT, STREAM_DRAW, philox_uniform, request_seeds

__all__ = ["ChainVerdict", "TreeVerdict", "NodeBatch", "verify_chain", "verify_tree", "sample", "backend",
           "philox_uniform", "request_seeds", "STREAM_ACCEPT", "STREAM_DRAW", "TRITON_MAX_Q_ENTRIES"]

#: the Triton kernels keep a node's q entries in registers: q rows wider than this (e.g. a
#: full-vocabulary q) are verified by the PyTorch reference on the same device instead.
TRITON_MAX_Q_ENTRIES = 128

Scalar = Union[int, float, bool]
PerRequest = Union[Scalar, torch.Tensor, None]
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ChainVerdict:
    """Result of :func:`verify_chain` (all int64, on the logits' device).

    ``accepted[B]``: drafts accepted; ``tokens[B, K+1]``: the accepted drafts followed by the
    correction (first rejection) or bonus token, -1 padded; ``num_tokens[B]``: valid entries of
    ``tokens`` (``accepted + 1``, or ``accepted`` when all drafts were accepted and bonus is off).
    """

    accepted: torch.Tensor
    tokens: torch.Tensor
    num_tokens: torch.Tensor
    backend: str = "torch"


@dataclass(frozen=True)
class TreeVerdict:
    """Result of :func:`verify_tree` (all int64, on the logits' device).

    ``accepted[B]``: accepted draft nodes (path length below the root); ``path[B, N]``: node 0
    then the accepted nodes in order, -1 padded (``accepted + 1`` entries); ``tokens[B, N]``:
    the accepted nodes' tokens then the correction/bonus token drawn at the last path node,
    -1 padded; ``num_tokens[B]``. ``tokens[b, i]`` is predicted by logits row ``path[b, i]``.
    """

    accepted: torch.Tensor
    path: torch.Tensor
    tokens: torch.Tensor
    num_tokens: torch.Tensor
    backend: str = "torch"


# ----------------------------------------------------------------------------- dispatch
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def backend(tensor: torch.Tensor, force_triton: Optional[bool] = None) -> str:
    """``"triton"`` or ``"torch"``: the path a call on ``tensor`` takes.

    ``force_triton``: True = Triton (CPU tensors need ``TRITON_INTERPRET=1``), False = the
    PyTorch reference, None = ``PIPESD_FORCE_TRITON=1`` forces Triton, else Triton on CUDA
    tensors when Triton is importable.
    """
    if force_triton is None and os.environ.get("PIPESD_FORCE_TRITON", "") not in ("", "0"):
        force_triton = True
    if force_triton is False:
        return "torch"
    if force_triton:
        return "triton"
    return "triton" if tensor.is_cuda and _triton_ok() else "torch"


def _use_triton(tensor: torch.Tensor, force_triton: Optional[bool]) -> bool:
    if backend(tensor, force_triton) != "triton":
        return False
    if not _triton_ok():
        raise RuntimeError("pipesd.verify: the Triton path was forced but triton is not importable")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "") != "1":
        raise RuntimeError("pipesd.verify: the Triton path on CPU tensors needs TRITON_INTERPRET=1 "
                           "set before triton is imported")
    return True


# ----------------------------------------------------------------------------- validation
class _Checks:
    """Collect device-side violation flags; one host sync raises the first one found."""

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.msgs: list[str] = []

    def add(self, violated: torch.Tensor, msg: str) -> None:
        self.flags.append(violated.any().reshape(1))
        self.msgs.append(msg)

    def run(self) -> None:
        if not self.flags:
            return
        hit = torch.cat(self.flags).cpu()
        msgs = self.msgs
        self.flags, self.msgs = [], []
        for h, m in zip(hit.tolist(), msgs):
            if h:
                raise ValueError(m)


def _tensor(x, name: str, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(x.shape)}")
    return x


def _int_tensor(x, name: str, shape: tuple, device) -> torch.Tensor:
    x = _tensor(x, name, len(shape))
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.to(device)


def _logits(x, name: str, dim: int) -> torch.Tensor:
    x = _tensor(x, name, dim)
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name}: dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name}: the vocabulary dimension is empty")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _per_request(v: PerRequest, B: int, name: str, default: Scalar, kind: str, device) -> torch.Tensor:
    """A ``[B]`` tensor from a scalar / 0-d / [B] tensor; ``kind`` in {"float", "int", "bool"}."""
    if v is None:
        v = default
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            v = v.item()
        elif tuple(v.shape) != (B,):
            raise ValueError(f"{name}: expected a scalar or a tensor of shape [{B}], got {tuple(v.shape)}")
        else:
            if kind == "int" and (v.dtype.is_floating_point or v.dtype == torch.bool):
                raise ValueError(f"{name}: expected integers, got {v.dtype}")
            dtype = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}[kind]
            return v.to(device=device, dtype=dtype)
    if kind == "int" and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
        raise ValueError(f"{name}: expected an int, got {v!r}")
    if kind == "bool" and not isinstance(v, (bool, numbers.Integral)):
        raise ValueError(f"{name}: expected a bool, got {v!r}")
    if kind == "float" and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise ValueError(f"{name}: expected a number, got {v!r}")
    v = {"int": int, "bool": bool, "float": float}[kind](v)
    dtype = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}[kind]
    return torch.full((B,), v, dtype=dtype, device=device)


def _params(B: int, device, sample_mode: bool, temperature, top_k, top_p, min_p, checks: _Checks):
    if not sample_mode:
        z = torch.zeros(B, dtype=torch.float32, device=device)
        return z, torch.zeros(B, dtype=torch.int64, device=device), z + 1.0, z
    t = _per_request(temperature, B, "temperature", 1.0, "float", device)
    k = _per_request(top_k, B, "top_k", 0, "int", device)
    p = _per_request(top_p, B, "top_p", 1.0, "float", device)
    mp = _per_request(min_p, B, "min_p", 0.0, "float", device)
    checks.add(~torch.isfinite(t) | (t < 0), "temperature: must be finite and >= 0")
    checks.add(k < 0, "top_k: must be >= 0 (0 = off)")
    checks.add(~((p > 0) & (p <= 1)), "top_p: must be in (0, 1]")
    checks.add(~((mp >= 0) & (mp < 1)), "min_p: must be in [0, 1)")
    return t, k, p, mp


def _check_q(q_ids, q_probs, lead: tuple, device):
    """Validate the draft's top-k q (ids, probs) ``[*lead, kq]``; returns (ids int64, probs fp32)."""
    if q_ids is None or q_probs is None:
        raise ValueError("draft_topk_ids/draft_topk_probs: required in sample mode (the draft's top-k q)")
    q_ids = _tensor(q_ids, "draft_topk_ids", len(lead) + 1)
    q_probs = _tensor(q_probs, "draft_topk_probs", len(lead) + 1)
    if tuple(q_ids.shape[:-1]) != lead or q_ids.shape[-1] < 1:
        raise ValueError(f"draft_topk_ids: expected shape [{', '.join(map(str, lead))}, k>=1], got {tuple(q_ids.shape)}")
    if q_probs.shape != q_ids.shape:
        raise ValueError(f"draft_topk_probs: shape {tuple(q_probs.shape)} != draft_topk_ids shape {tuple(q_ids.shape)}")
    if q_ids.dtype.is_floating_point or q_ids.dtype == torch.bool:
        raise ValueError(f"draft_topk_ids: expected an integer tensor, got {q_ids.dtype}")
    if not q_probs.dtype.is_floating_point:
        raise ValueError(f"draft_topk_probs: expected a float tensor, got {q_probs.dtype}")
    q_ids = q_ids.to(device=device, dtype=torch.int64)
    q_probs = q_probs.to(device=device, dtype=torch.float32)
    # entries of probability 0 carry no mass: whatever their id, they are padding (-1)
    return torch.where(q_probs > 0, q_ids, -1), q_probs


def _check_q_rows(ids, probs, used_row: torch.Tensor, V: int, checks: _Checks) -> None:
    """Checks on the q rows that are used (``used_row`` bool ``[*lead]``)."""
    u = used_row[..., None]
    checks.add(u & (probs > 0) & ((ids < 0) | (ids >= V)),
               f"draft_topk_ids: ids with probability > 0 must be in [0, {V})")
    checks.add(u & (~torch.isfinite(probs) | (probs < 0)), "draft_topk_probs: must be finite and >= 0")
    checks.add(used_row & ((probs.sum(-1) - 1).abs() > 1e-3), "draft_topk_probs: each used q row must sum to 1 (+-1e-3)")
    s = torch.sort(torch.where(ids >= 0, ids, -1 - torch.arange(ids.shape[-1], device=ids.device)), -1).values
    checks.add(used_row & (s[..., 1:] == s[..., :-1]).any(-1) if ids.shape[-1] > 1 else used_row & False,
               "draft_topk_ids: ids with probability > 0 must be distinct within a q row")


def _raise_bad(bad: torch.Tensor, what: str, arg: str = "target_logits") -> None:
    """``bad [B, N]`` flags from either path -> ValueError naming the first bad row."""
    if bool(bad.any()):
        b, n = (int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{arg}: {what} (b={b}, row={n}) has NaN, +inf (after temperature "
                         f"scaling) or no finite logit")


def _lengths(x, name: str, B: int, default: int, device) -> torch.Tensor:
    """``num_draft`` / ``num_nodes``: a ``[B]`` int64 tensor, ``default`` everywhere when None."""
    if x is None:
        return torch.full((B,), default, dtype=torch.int64, device=device)
    return _int_tensor(x, name, (B,), device).long()


def _seeds(B: int, sample_mode: bool, seed, generator, device) -> torch.Tensor:
    """Per-request Philox keys ``[B]`` (zeros in greedy mode: no randomness is used)."""
    if not sample_mode:
        return torch.zeros(B, dtype=torch.int64, device=device)
    return request_seeds(B, seed, generator, device)


def _k32(top_k: torch.Tensor) -> torch.Tensor:
    """top_k as the kernels take it (int32; anything >= 2**31 is "off" like >= V)."""
    return top_k.clamp(max=2**31 - 1).to(torch.int32)


# ----------------------------------------------------------------------------- the node batch
@dataclass(frozen=True)
class NodeBatch:
    """A validated ragged batch of token trees in the kernels' layout (a chain is a path tree).

    The one object both backends run (:func:`_run_triton`, :func:`_run_reference`), built by
    the thin front-ends :func:`verify_chain` and :func:`verify_tree` (``B`` requests, ``N``
    rows/nodes, ``V`` vocabulary, ``kq`` q entries per row). Node ``n`` owns logits row ``n``;
    its children are the nodes whose parent it is, tried in increasing node order.
    """

    logits: torch.Tensor             # [B, N, V] fp32/fp16/bf16, last dim contiguous: row n predicts the token after node n
    is_tree: bool                    # the layout of tok / parents / lengths below
    sample: bool                     # mode == "sample" (else every row is greedy)
    tok: torch.Tensor                # chain [B, N-1]: drafts, draft j = node j+1; tree [B, N]: node tokens (node 0's unused)
    parents: Optional[torch.Tensor]  # tree [B, N] int64: parents[b, 0] = -1, parents[b, i] < i; chain None (node j+1 -> j)
    lengths: torch.Tensor            # [B] int64: chain num_draft (num_draft + 1 nodes); tree num_nodes
    has_child: torch.Tensor          # [B, N] bool: node n is the parent of a live node
    q_ids: Optional[torch.Tensor]    # [B, N, kq] int64: row n = the q node n's children were drawn from, -1 padding; greedy None
    q_probs: Optional[torch.Tensor]  # [B, N, kq] fp32, 0 at padding; greedy None
    temps: torch.Tensor              # [B] fp32 temperature (0: greedy row)
    top_k: torch.Tensor              # [B] int64 (0: off)
    top_p: torch.Tensor              # [B] fp32 (1: off)
    min_p: torch.Tensor              # [B] fp32 (0: off)
    bonus: torch.Tensor              # [B] bool: a fully accepted leaf emits a token
    seeds: torch.Tensor              # [B] int64 per-request Philox keys (zeros when greedy)

    @property
    def what(self) -> str:
        """What a row is called in error messages."""
        return "node" if self.is_tree else "position"

    def num_nodes(self) -> torch.Tensor:
        """``[B]`` int64: live nodes per request (node 0 included)."""
        return self.lengths if self.is_tree else self.lengths + 1

    def used(self) -> torch.Tensor:
        """``[B, N]`` bool: the rows that are read (live nodes with a child; leaves when bonus)."""
        n = torch.arange(self.logits.shape[1], device=self.logits.device)
        return (n[None, :] < self.num_nodes()[:, None]) & (self.has_child | self.bonus[:, None])

    def children(self):
        """The reference's per-node view: ``(child_node[B, N, C], child_tok[B, N, C], node_tok[B, N])``
        (children in increasing order, ``-1`` padded)."""
        N = self.logits.shape[1]
        if not self.is_tree:
            return _ref.chain_nodes(self.tok, self.lengths, N)
        n = torch.arange(N, device=self.logits.device)
        child_node = _ref.tree_children(torch.where(n[None, :] < self.lengths[:, None], self.parents, -1), self.lengths)
        child_tok = self.tok.long().gather(1, child_node.clamp(min=0).flatten(1)).view_as(child_node)
        return child_node, child_tok, self.tok


def _run_triton(nb: NodeBatch):
    """Decisions + walk by the kernels. Returns ``(path, tokens, accepted, num_tokens)``."""
    from pipesd.kernels.verify import verify_nodes_triton, walk_triton

    def i32(t):
        return None if t is None else t.to(torch.int32).contiguous()

    tok = nb.tok.contiguous()
    acc, cand, bad = verify_nodes_triton(
        nb.logits, tok, i32(nb.parents), i32(nb.lengths), i32(nb.q_ids),
        None if nb.q_probs is None else nb.q_probs.contiguous(),
        nb.temps.contiguous(), _k32(nb.top_k), nb.top_p.contiguous(), nb.min_p.contiguous(),
        nb.bonus.to(torch.int8), nb.seeds.contiguous(), is_tree=nb.is_tree, sample=nb.sample)
    _raise_bad(bad != 0, nb.what)
    return walk_triton(acc, cand, tok, is_tree=nb.is_tree)


def _run_reference(nb: NodeBatch):
    """Decisions + walk by the PyTorch reference, on the used rows only. Same return as :func:`_run_triton`."""
    B, N, V = nb.logits.shape
    dev = nb.logits.device
    child_node, child_tok, node_tok = nb.children()
    bi, ni = nb.used().nonzero(as_tuple=True)
    acc = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    cand = torch.full((B, N), -1, dtype=torch.int64, device=dev)
    if bi.numel():
        rows = nb.logits[bi, ni]
        bad = torch.zeros(B, N, dtype=torch.bool, device=dev)
        bad[bi, ni] = _ref.bad_rows(rows, nb.temps[bi])
        _raise_bad(bad, nb.what)
        if nb.q_ids is None:
            qi = torch.full((bi.numel(), 1), -1, dtype=torch.int64, device=dev)
            qp = torch.zeros((bi.numel(), 1), dtype=torch.float32, device=dev)
        else:
            qi, qp = nb.q_ids[bi, ni], nb.q_probs[bi, ni]
        acc[bi, ni], cand[bi, ni] = _ref.node_decisions(
            rows, nb.temps[bi], nb.top_k[bi], nb.top_p[bi], nb.min_p[bi], child_node[bi, ni],
            child_tok[bi, ni], qi, qp, nb.seeds[bi], ni, nb.sample)
    return _ref.walk(acc, cand, node_tok)


def _run_nodes(nb: NodeBatch, force_triton: Optional[bool]):
    """Either backend on ``nb``: ``(path, tokens, accepted, num_tokens, backend)``. q rows wider than
    ``TRITON_MAX_Q_ENTRIES`` take the reference."""
    wide_q = nb.sample and nb.q_ids.shape[-1] > TRITON_MAX_Q_ENTRIES
    if _use_triton(nb.logits, force_triton) and not wide_q:
        return (*_run_triton(nb), "triton")
    return (*_run_reference(nb), "torch")


# ----------------------------------------------------------------------------- front-ends
@dataclass(frozen=True)
class _Options:
    """The keyword-only arguments :func:`verify_chain` and :func:`verify_tree` share, declared
    once (documented at :func:`verify_chain`); :func:`_shared_options` lists them in both
    public signatures."""

    mode: str = "greedy"
    draft_topk_ids: Optional[torch.Tensor] = None
    draft_topk_probs: Optional[torch.Tensor] = None
    temperature: PerRequest = None
    top_k: PerRequest = None
    top_p: PerRequest = None
    min_p: PerRequest = None
    seed: Union[int, torch.Tensor, None] = None
    generator: Optional[torch.Generator] = None
    bonus: Union[bool, torch.Tensor] = True
    force_triton: Optional[bool] = None

    @classmethod
    def of(cls, fn: str, options: dict) -> "_Options":
        """The ``**options`` of a call of ``fn``; an unknown name is the ``TypeError`` Python raises."""
        for name in options:
            if name not in _OPTION_NAMES:
                raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")
        return cls(**options)

    def open(self, target_logits):
        """The opening both verifiers share: ``(logits[B, N, V], sample_mode, checks)``."""
        logits = _logits(target_logits, "target_logits", 3)
        if self.mode not in ("greedy", "sample"):
            raise ValueError(f"mode: must be 'greedy' or 'sample', got {self.mode!r}")
        return logits, self.mode == "sample", _Checks()

    def knobs(self, B: int, device, sample_mode: bool, checks: _Checks) -> dict:
        """The per-request sampling parameters and bonus flags: NodeBatch's ``temps`` .. ``bonus`` fields."""
        temps, tk, tp, mp = _params(B, device, sample_mode, self.temperature, self.top_k, self.top_p, self.min_p,
                                    checks)
        return dict(temps=temps, top_k=tk, top_p=tp, min_p=mp,
                    bonus=_per_request(self.bonus, B, "bonus", True, "bool", device))


_OPTION_NAMES = frozenset(f.name for f in fields(_Options))


def _shared_options(fn):
    """``fn(<layout>, **options)`` shows its true signature: ``**options`` are :class:`_Options`'
    fields, keyword-only, with their annotations and defaults (``help``, ``inspect``, docs)."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in fields(_Options)]
    fn.__signature__ = sig.replace(parameters=own + shared)
    return fn


# ----------------------------------------------------------------------------- public API
@_shared_options
def verify_chain(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_draft: Optional[torch.Tensor] = None,
    **options,
) -> ChainVerdict:
    """Verify a ragged batch of draft chains in one launch.

    ``**options``: the keyword-only ``mode``, ``draft_topk_ids``, ``draft_topk_probs``,
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``generator``, ``bonus``,
    ``force_triton`` (declared once, in :class:`_Options`; ``inspect.signature`` lists them).

    ``target_logits [B, K+1, V]`` (fp32/fp16/bf16; row ``j`` predicts the token after
    ``j`` drafts), ``draft_tokens [B, K]``, ``num_draft [B]`` (0..K; default K). Rows past
    ``num_draft[b]`` (and row ``num_draft[b]`` when bonus is off) are never read.

    ``mode="greedy"``: accept while draft == argmax (lowest index on ties), then the argmax.
    ``mode="sample"``: lossless rejection sampling against ``p`` = ``filtered_probs`` of the
    row with the request's ``temperature`` (default 1; 0 = greedy) / ``top_k`` / ``top_p`` /
    ``min_p`` (scalars or ``[B]``); ``draft_topk_ids/probs [B, K, k]`` is the exact top-k q each
    draft was sampled from (entries of probability 0 are padding, whatever their id). ``bonus`` (bool or ``[B]``): emit a token
    after full acceptance. Randomness: ``seed`` (int, or ``[B]`` per-request seeds) or
    ``generator``; see ``docs/verify.md``.
    """
    o = _Options.of("verify_chain", options)
    logits, sample_mode, checks = o.open(target_logits)
    B, N, V = logits.shape
    K = N - 1
    dev = logits.device
    draft = _int_tensor(draft_tokens, "draft_tokens", (B, K), dev)
    nd = _lengths(num_draft, "num_draft", B, K, dev)
    checks.add((nd < 0) | (nd > K), f"num_draft: must be in [0, {K}] (K = target_logits.shape[1] - 1)")
    live = torch.arange(K, device=dev)[None, :] < nd[:, None]
    checks.add(live & ((draft < 0) | (draft >= V)), f"draft_tokens: tokens must be in [0, {V})")
    knobs = o.knobs(B, dev, sample_mode, checks)
    q_ids = q_probs = None
    if sample_mode:
        q_ids, q_probs = _check_q(o.draft_topk_ids, o.draft_topk_probs, (B, K), dev)
        _check_q_rows(q_ids, q_probs, live, V, checks)
        inq = ((q_ids == draft[..., None]) & (q_probs > 0)).any(-1)
        checks.add(live & ~inq, "draft_topk_ids: each draft token must be in its q ids with probability > 0")
        # one q row per node: the last node (row K) has no child
        q_ids = torch.cat([q_ids, q_ids.new_full((B, 1, q_ids.shape[-1]), -1)], 1)
        q_probs = torch.cat([q_probs, q_probs.new_zeros((B, 1, q_probs.shape[-1]))], 1)
    checks.run()
    nb = NodeBatch(logits, False, sample_mode, tok=draft, parents=None, lengths=nd,
                   has_child=torch.cat([live, live.new_zeros(B, 1)], 1), q_ids=q_ids, q_probs=q_probs,
                   seeds=_seeds(B, sample_mode, o.seed, o.generator, dev), **knobs)
    _, tokens, acc, ntok, taken = _run_nodes(nb, o.force_triton)
    return ChainVerdict(acc, tokens, ntok, taken)


@_shared_options
def verify_tree(
    target_logits: torch.Tensor,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    num_nodes: Optional[torch.Tensor] = None,
    **options,
) -> TreeVerdict:
    """Verify a ragged batch of draft token trees in one launch.

    Node 0 is the root: the last verified token (``tokens[b, 0]`` is ignored); nodes
    ``1..num_nodes[b]-1`` are draft tokens with ``parents[b, i] < i`` (``parents[b, 0] = -1``).
    ``target_logits [B, N, V]``: row ``n`` = the target's logits after the path to node ``n``.
    Children are tried in increasing node order. Greedy: follow the child equal to the argmax
    (the first such child). Sample: SpecInfer multi-candidate rejection; ``draft_topk_ids/probs
    [B, N, k]`` row ``n`` is the q that *all* children of node ``n`` were drawn from,
    independently (with replacement: duplicates allowed and must all be sent). Bonus token
    at a fully accepted leaf when ``bonus``. Other arguments as in :func:`verify_chain`.
    """
    o = _Options.of("verify_tree", options)
    logits, sample_mode, checks = o.open(target_logits)
    B, N, V = logits.shape
    dev = logits.device
    tok = _int_tensor(tokens, "tokens", (B, N), dev)
    par = _int_tensor(parents, "parents", (B, N), dev).long()
    nn = _lengths(num_nodes, "num_nodes", B, N, dev)
    checks.add((nn < 1) | (nn > N), f"num_nodes: must be in [1, {N}] (node 0 is the root)")
    i = torch.arange(N, device=dev)
    live = (i[None, :] >= 1) & (i[None, :] < nn[:, None])
    checks.add(par[:, 0] != -1, "parents: parents[b, 0] must be -1 (node 0 is the root)")
    checks.add(live & ((par < 0) | (par >= i[None, :])),
               "parents: parents[b, i] must be in [0, i) for 1 <= i < num_nodes[b] (nodes in topological order)")
    checks.add(live & ((tok < 0) | (tok >= V)), f"tokens: tokens must be in [0, {V})")
    knobs = o.knobs(B, dev, sample_mode, checks)
    checks.run()
    parc = torch.where(live, par, 0).clamp(0, N - 1)
    # node n has a child iff some live node i points to it
    has_child = torch.zeros(B, N, dtype=torch.int64, device=dev).scatter_add_(1, parc, live.long()) > 0
    q_ids = q_probs = None
    if sample_mode:
        q_ids, q_probs = _check_q(o.draft_topk_ids, o.draft_topk_probs, (B, N), dev)
        _check_q_rows(q_ids, q_probs, has_child, V, checks)
        pid = q_ids.gather(1, parc[..., None].expand(-1, -1, q_ids.shape[-1]))
        pp = q_probs.gather(1, parc[..., None].expand(-1, -1, q_ids.shape[-1]))
        inq = ((pid == tok.long()[..., None]) & (pp > 0)).any(-1)
        checks.add(live & ~inq, "draft_topk_ids: each node's token must be in its parent's q ids with probability > 0")
        checks.run()
    nb = NodeBatch(logits, True, sample_mode, tok=tok, parents=par, lengths=nn, has_child=has_child,
                   q_ids=q_ids, q_probs=q_probs, seeds=_seeds(B, sample_mode, o.seed, o.generator, dev), **knobs)
    path, tokens_out, acc, ntok, taken = _run_nodes(nb, o.force_triton)
    return TreeVerdict(acc, path, tokens_out, ntok, taken)


def sample(
    logits: torch.Tensor,
    temperature: PerRequest = 1.0,
    top_k: PerRequest = 0,
    top_p: PerRequest = 1.0,
    min_p: PerRequest = 0.0,
    seed: Union[int, torch.Tensor, None] = None,
    *,
    generator: Optional[torch.Generator] = None,
    force_triton: Optional[bool] = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` from ``filtered_probs(logits, ...)`` (parameters
    scalars or ``[B]``; ``temperature == 0`` = argmax, lowest index on ties). Returns int64 ``[B]``.
    The draw is inverse CDF with ``u = philox(seed[b], 0, STREAM_DRAW)``: reproducible,
    batch-independent with ``[B]`` seeds."""
    logits = _logits(logits, "logits", 2)
    B, V = logits.shape
    dev = logits.device
    checks = _Checks()
    temps, tk, tp, mp = _params(B, dev, True, temperature, top_k, top_p, min_p, checks)
    checks.run()
    seeds = request_seeds(B, seed, generator, dev)
    if _use_triton(logits, force_triton):
        from pipesd.kernels.sampling import sample_triton

        out, bad = sample_triton(logits, temps, _k32(tk), tp, mp, seeds)
        _raise_bad((bad != 0)[:, None], "row", "logits")
        return out
    _raise_bad(_ref.bad_rows(logits, temps)[:, None], "row", "logits")
    return _ref.sample_ref(logits, temps, tk, tp, mp, seeds)
