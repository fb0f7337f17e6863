"""Draft and target runners over Hugging Face causal LMs, with KV caches that roll back.

A runner is asked about a *sequence* (a plain token list) and keeps its KV cache valid for the
longest common prefix (LCP) of what it has already fed and the sequence it is asked about:
rollback is just asking about a shorter or different sequence (the cache is cropped to the
common prefix and only the new tail is fed). Each sequence state also keeps the logits rows of
its recent forwards (positions it fed), so asking for the next-token logits of a sequence whose
last token is already cached costs no forward, and ``step()`` after ``extend()`` costs one
forward of the uncached tokens.

Threads: ``threads=None`` leaves torch's setting alone; an int calls
``torch.set_num_threads`` (process-wide: torch's intra-op pool is per process). An edge and a
cloud in one process therefore share one pool; the demo and the benchmarks run them as two
processes with ``torch.set_num_threads(1)`` each on a 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipesd.models._kvcache import _cache_kvs, _cache_kwarg, _cache_len, _crop, _new_cache
from pipesd.models.pairing import check_same_vocab  # re-exported: the pair check lives with PairMismatch
from pipesd.sampling import SamplingParams, draft_distribution, filtered_probs

__all__ = ["DraftModel", "TargetModel", "TargetSession", "DraftStep", "DraftTree", "check_same_vocab",
           "load_local"]

MAX_KEPT_ROWS = 64  # logits rows kept per sequence (the most recent fed positions)
PREFILL_ALONE = 32  # score_batch: a session with a longer uncached tail is prefilled on its own first


def load_local(path: str | Path, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) from a local directory; never reaches a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p} (models load from local paths only)")
    model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=dtype or torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _SeqState:
    """What one sequence has fed: token list, KV cache, and logits rows of recent positions.

    Invariant: ``cache`` holds exactly ``fed`` (``len(fed) == cache length``); ``rows[j]`` are
    the logits at position ``row_start + j`` of ``fed`` (predicting the token after it).
    """

    __slots__ = ("fed", "cache", "rows", "row_start")

    def __init__(self) -> None:
        self.fed: list[int] = []
        self.cache = None
        self.rows: list[torch.Tensor] = []
        self.row_start = 0

    def clear(self) -> None:
        self.fed, self.cache, self.rows, self.row_start = [], None, [], 0

    def plan(self, seq: Sequence[int], want_from: int) -> int:
        """Position from which ``seq`` must be fed to get logits rows ``[want_from, len(seq))``."""
        common = _lcp(self.fed, seq)
        valid_end = min(self.row_start + len(self.rows), common)  # stored rows stay valid below `common`
        if self.rows and self.row_start <= want_from < valid_end:
            return valid_end
        return min(common, want_from)

    def stored(self, start: int, end: int) -> list[torch.Tensor]:
        return self.rows[start - self.row_start:end - self.row_start] if end > start else []

    def prepare(self, f: int) -> None:
        """Crop the cache to the first ``f`` fed positions (before feeding ``seq[f:]``)."""
        self.cache = _crop(self.cache, f)
        del self.fed[f:]
        if self.row_start + len(self.rows) > f:  # rows at positions >= f go stale
            keep = max(0, f - self.row_start)
            self.rows = self.rows[:keep]
        if not self.rows:
            self.row_start = f

    def finish(self, seq: Sequence[int], f: int, want_from: int, new_rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Record a forward of ``seq[f:]`` whose kept rows start at ``max(f, want_from)``;
        return the rows ``[want_from, len(seq))``."""
        out = self.stored(want_from, f) + new_rows
        first_new = max(f, want_from)
        if self.rows and self.row_start + len(self.rows) == first_new:
            self.rows = self.rows + new_rows
        else:
            self.rows, self.row_start = list(new_rows), first_new
        if len(self.rows) > MAX_KEPT_ROWS:
            cut = len(self.rows) - MAX_KEPT_ROWS
            self.rows, self.row_start = self.rows[cut:], self.row_start + cut
        self.fed = [int(t) for t in seq]
        return out


class _LM:
    """A causal LM on a device; runs forwards for sequence states."""

    def __init__(self, model, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                 threads: Optional[int] = None) -> None:
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be >= 1 or None, got {threads}")
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        model = model.to(self.device)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
            else int(cfg.vocab_size)
        self.cache_kw = _cache_kwarg(model)
        self.forwards = 0
        self.param_dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def rows(self, st: _SeqState, seq: Sequence[int], want_from: int) -> list[torch.Tensor]:
        """Logits rows (fp32, ``[V]`` each) for positions ``[want_from, len(seq))`` of ``seq``."""
        n = len(seq)
        if not (0 <= want_from < n):
            raise ValueError("cannot score an empty sequence" if n == 0 else f"want_from {want_from} outside [0, {n})")
        f = st.plan(seq, want_from)
        if f >= n:
            return st.stored(want_from, n)
        st.prepare(f)
        keep = n - max(f, want_from)
        ids = torch.tensor([list(seq[f:])], dtype=torch.long, device=self.device)
        if st.cache is None:
            st.cache = _new_cache()
        out = self.model(input_ids=ids, **{self.cache_kw: st.cache}, use_cache=True, logits_to_keep=keep)
        self.forwards += n - f
        logits = out.logits[0, -keep:].float()
        return st.finish(seq, f, want_from, list(logits.unbind(0)))

    def mask_value(self) -> float:
        return float(torch.finfo(self.param_dtype if self.param_dtype.is_floating_point else torch.float32).min)


# --------------------------------------------------------------------------- draft
@dataclass
class DraftStep:
    """One drafted token.

    ``prob``: the trigger's confidence (greedy: softmax probability of the argmax at T=1;
    sampling: the q probability of the drawn token). ``(q_ids, q_probs)``: the top-``wire_topk``
    truncated q the token was drawn from (sampling) or the T=1 top-k (greedy, informational).
    ``logits``: the raw next-token logits ([V] fp32). ``full_q``: ``q`` scattered over the
    whole vocabulary (only with ``want_full_q=True``; the paper's "full-q" wire format).
    """

    token: int
    prob: float
    q_ids: np.ndarray
    q_probs: np.ndarray
    logits: Optional[torch.Tensor] = None
    full_q: Optional[np.ndarray] = None


@dataclass
class DraftTree:
    """A drafted token tree below the current sequence.

    Node ``i`` has token ``tokens[i]`` and parent ``parents[i]`` (``-1``: a child of the root,
    i.e. of the last token of the sequence); parents come before children. ``q_ids/q_probs``
    have ``n + 1`` rows: row 0 is the q the root's children were drawn from, row ``i + 1`` the q
    node ``i``'s children were drawn from (zeros for nodes that were not expanded) — the layout
    of :func:`pipesd.verify.verify_tree` with node 0 as the root. ``probs[i]``: the draft's
    probability of node ``i``'s token under its parent's q.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    q_ids: Optional[np.ndarray] = None
    q_probs: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.tokens)

    def depth(self, i: int) -> int:
        d = 1
        while self.parents[i] >= 0:
            i, d = self.parents[i], d + 1
        return d

    def path(self, i: int) -> list[int]:
        out = []
        while i >= 0:
            out.append(self.tokens[i])
            i = self.parents[i]
        return out[::-1]


#: Most q entries one draft token carries on the wire (the native ring's record holds at most
#: this many: ``pipesd.ring.MAX_TOPK``; a test keeps the two equal).
MAX_WIRE_TOPK = 256


def check_wire_topk(wire_topk) -> None:
    """Refuse a ``wire_topk`` the edge could not send, when the draft is made (not at generate time)."""
    if not isinstance(wire_topk, (int, np.integer)) or isinstance(wire_topk, bool) or \
            not 1 <= wire_topk <= MAX_WIRE_TOPK:
        raise ValueError(f"wire_topk must be an int in [1, {MAX_WIRE_TOPK}], got {wire_topk!r}")


class DraftModel:
    """The edge's small model: one sequence, drafted one token at a time."""

    def __init__(self, model, tokenizer=None, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                 threads: Optional[int] = None, wire_topk: int = 8) -> None:
        check_wire_topk(wire_topk)
        self._lm = _LM(model, device, dtype, threads)
        self._st = _SeqState()
        self.model = self._lm.model
        self.tokenizer = tokenizer
        self.device = self._lm.device
        self.vocab_size = self._lm.vocab_size
        self.wire_topk = int(min(wire_topk, self.vocab_size))
        self._tokens: list[int] = []

    @classmethod
    def from_pretrained(cls, path, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                        threads: Optional[int] = None, wire_topk: int = 8) -> "DraftModel":
        model, tok = load_local(path, dtype)
        return cls(model, tok, device=device, dtype=dtype, threads=threads, wire_topk=wire_topk)

    @property
    def tokens(self) -> list[int]:
        """The current sequence (a copy): prompt + drafted / accepted tokens."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def forwards(self) -> int:
        """Token-forwards run so far."""
        return self._lm.forwards

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """Start a new sequence (the cache is reused for the common prefix)."""
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self._tokens = _checked_ids(prompt_ids, self.vocab_size)

    def truncate(self, length: int) -> None:
        """Keep ``tokens[:length]`` (rollback); the cache is cropped lazily, on the next forward."""
        if not (1 <= length <= len(self._tokens)):
            raise ValueError(f"length {length} outside [1, {len(self._tokens)}]")
        del self._tokens[length:]

    def extend(self, ids: Sequence[int]) -> None:
        """Append tokens (e.g. the cloud's correction) without drafting."""
        self._tokens.extend(_checked_ids(ids, self.vocab_size))

    def logits(self) -> torch.Tensor:
        """Logits for the token after ``tokens`` ([V], fp32; costs a forward of the uncached tail only)."""
        if not self._tokens:
            raise ValueError("no sequence: call reset(prompt_ids) first")
        return self._lm.rows(self._st, self._tokens, len(self._tokens) - 1)[0]

    def full_distribution(self, params: SamplingParams = SamplingParams(temperature=1.0)) -> torch.Tensor:
        """The untruncated filtered distribution over the whole vocabulary ([V], fp32; informational:
        tokens are drawn from the top-``wire_topk`` q of :meth:`step`)."""
        return filtered_probs(self.logits(), params.temperature, params.top_k, params.top_p, params.min_p)

    def _q(self, logits: torch.Tensor, params: SamplingParams):
        qp = params if not params.greedy else SamplingParams(temperature=1.0)
        q_ids, q_probs = draft_distribution(logits, qp, self.wire_topk)
        return q_ids.cpu(), q_probs.cpu()

    @torch.inference_mode()
    def step(self, params: SamplingParams = SamplingParams(), generator: Optional[torch.Generator] = None,
             want_full_q: bool = False) -> DraftStep:
        """Draft the next token after ``tokens``, append it and return it with its q.

        Greedy (``params.greedy``): the argmax; ``prob`` = its softmax probability at T=1.
        Sampling: drawn (with ``generator``, a CPU generator; None = torch's global RNG) from
        exactly ``draft_distribution(logits, params, wire_topk)``, which is what is returned.
        """
        logits = self.logits()
        q_ids, q_probs = self._q(logits, params)
        if params.greedy:
            token = int(torch.argmax(logits))
            prob = float(torch.softmax(logits, -1)[token])
        else:
            idx = int(torch.multinomial(q_probs, 1, generator=generator))
            token = int(q_ids[idx])
            prob = float(q_probs[idx])
        self._tokens.append(token)
        qi, qp = q_ids.numpy().astype(np.int32), q_probs.numpy().astype(np.float32)
        full = None
        if want_full_q:
            full = np.zeros(self.vocab_size, dtype=np.float32)
            full[qi.astype(np.int64)] = qp
        return DraftStep(token, prob, qi, qp, logits, full)

    @torch.inference_mode()
    def expand_tree(self, params: SamplingParams = SamplingParams(), width: int = 2, depth: int = 4,
                    confidence: float = 0.8, max_nodes: int = 32,
                    generator: Optional[torch.Generator] = None) -> DraftTree:
        """Draft a token tree below ``tokens`` (which are left unchanged).

        Depth-first from the root: at a node whose top-1 q probability is below ``confidence``
        the node gets ``width`` children, otherwise one; no node deeper than ``depth``, at most
        ``max_nodes`` nodes. Greedy: the children are the top-``width`` (or top-1) tokens of the
        T=1 q. Sampling: the children are ``width`` (or 1) independent draws, with replacement,
        from the node's q (duplicates kept: SpecInfer multi-candidate verification needs them).
        Costs about one draft forward per expanded node (the LCP cache re-feeds the path when
        it switches branches).
        """
        if width < 1 or depth < 1 or max_nodes < 1:
            raise ValueError("width, depth and max_nodes must be >= 1")
        if not self._tokens:
            raise ValueError("no sequence: call reset(prompt_ids) first")
        base = list(self._tokens)
        tree = DraftTree()
        qrows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def expand(node: int, path: list[int], d: int) -> None:
            if d >= depth or len(tree.tokens) >= max_nodes:
                return
            seq = base + path
            logits = self._lm.rows(self._st, seq, len(seq) - 1)[0]
            q_ids, q_probs = self._q(logits, params)
            qrows[node + 1] = (q_ids.numpy().astype(np.int32), q_probs.numpy().astype(np.float32))
            top1 = float(torch.softmax(logits, -1).max()) if params.greedy else float(q_probs[0])
            n_children = width if top1 < confidence else 1
            if params.greedy:
                idxs = list(range(min(n_children, len(q_ids))))
            else:
                idxs = torch.multinomial(q_probs, n_children, replacement=True, generator=generator).tolist()
            children = []
            for j in idxs:
                if len(tree.tokens) >= max_nodes:
                    break
                tree.tokens.append(int(q_ids[j]))
                tree.parents.append(node)
                tree.probs.append(float(q_probs[j]))
                children.append(len(tree.tokens) - 1)
            for c in children:
                expand(c, path + [tree.tokens[c]], d + 1)

        expand(-1, [], 0)
        n, k = len(tree.tokens), self.wire_topk
        tree.q_ids = np.zeros((n + 1, k), dtype=np.int32)
        tree.q_probs = np.zeros((n + 1, k), dtype=np.float32)
        for r, (qi, qp) in qrows.items():
            tree.q_ids[r, :len(qi)], tree.q_probs[r, :len(qp)] = qi, qp
        return tree


def _checked_ids(ids: Sequence[int], vocab: int) -> list[int]:
    out = [int(t) for t in ids]
    if out and (min(out) < 0 or max(out) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got min {min(out)} max {max(out)}")
    return out


# --------------------------------------------------------------------------- target
class TargetSession:
    """One stream's verified sequence and KV cache on the cloud."""

    def __init__(self, owner: "TargetModel", prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self._owner = owner
        self._st = _SeqState()
        self._tokens = _checked_ids(prompt_ids, owner.vocab_size)

    @property
    def tokens(self) -> list[int]:
        """The verified sequence (a copy): prompt + verified tokens."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def score(self, draft: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(draft) + 1, V]`` fp32: row i predicts the token after ``tokens + draft[:i]``.

        One forward over the uncached tail of ``tokens`` plus ``draft``; ``tokens`` is unchanged.
        """
        seq = self._tokens + _checked_ids(draft, self._owner.vocab_size)
        return torch.stack(self._owner._lm.rows(self._st, seq, len(self._tokens) - 1))

    def commit(self, new_tokens: Sequence[int]) -> None:
        """Append verified tokens (accepted drafts + correction); the cache keeps the valid prefix."""
        self._tokens.extend(_checked_ids(new_tokens, self._owner.vocab_size))

    def truncate(self, length: int) -> None:
        if not (1 <= length <= len(self._tokens)):
            raise ValueError(f"length {length} outside [1, {len(self._tokens)}]")
        del self._tokens[length:]

    @torch.inference_mode()
    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(tokens) + 1, V]`` of a draft tree, in one forward with a tree mask.

        ``parents[i]`` is the parent node of node ``i`` (``-1``: a child of the root, the last
        verified token) and must be ``< i``. Row 0 = logits after ``self.tokens``; row ``i + 1``
        = logits after ``self.tokens`` + the path to node ``i``. Equals scoring each
        root-to-leaf chain with :meth:`score`. ``tokens`` / the cache's valid prefix are unchanged.
        """
        lm = self._owner._lm
        toks = _checked_ids(tokens, lm.vocab_size)
        par = [int(p) for p in parents]
        if len(par) != len(toks):
            raise ValueError(f"{len(toks)} tokens but {len(par)} parents")
        for i, p in enumerate(par):
            if not (-1 <= p < i):
                raise ValueError(f"parents[{i}] = {p}: must be in [-1, {i}) (parents before children)")
        row0 = lm.rows(self._st, self._tokens, len(self._tokens) - 1)[0]
        n = len(toks)
        if n == 0:
            return row0[None]
        st, L = self._st, len(self._tokens)
        st.prepare(L)  # the cache holds exactly self.tokens; the tree goes on top, then is cropped off
        anc = torch.zeros(n, n, dtype=torch.bool)
        depth = [0] * n
        for i, p in enumerate(par):
            anc[i, i] = True
            if p >= 0:
                anc[i] |= anc[p]
                depth[i] = depth[p] + 1
        mask = torch.full((1, 1, n, L + n), lm.mask_value(), dtype=lm.param_dtype)
        mask[..., :L] = 0
        mask[0, 0, :, L:].masked_fill_(anc, 0)
        pos = torch.tensor([[L + d for d in depth]], dtype=torch.long, device=lm.device)
        ids = torch.tensor([toks], dtype=torch.long, device=lm.device)
        out = lm.model(input_ids=ids, attention_mask=mask.to(lm.device), position_ids=pos,
                       **{lm.cache_kw: st.cache}, use_cache=True)
        st.cache = _crop(st.cache, L)
        lm.forwards += n
        return torch.cat([row0[None], out.logits[0].float()], 0)

    def close(self) -> None:
        """Free the cache (the session can still be used; it re-feeds from scratch)."""
        self._st.clear()


class TargetModel:
    """The cloud's large model; sessions share the weights, each has its own cache."""

    def __init__(self, model, tokenizer=None, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                 threads: Optional[int] = None) -> None:
        self._lm = _LM(model, device, dtype, threads)
        self.model = self._lm.model
        self.device = self._lm.device
        self.vocab_size = self._lm.vocab_size
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                        threads: Optional[int] = None) -> "TargetModel":
        model, tok = load_local(path, dtype)
        return cls(model, tok, device=device, dtype=dtype, threads=threads)

    @property
    def forwards(self) -> int:
        """Token-forwards run so far, all sessions (prefill, drafts, tree nodes; padding excluded)."""
        return self._lm.forwards

    def new_session(self, prompt_ids: Sequence[int]) -> TargetSession:
        return TargetSession(self, prompt_ids)

    @torch.inference_mode()
    def score_batch(self, sessions: Sequence[TargetSession], drafts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``[s.score(d) for s, d in zip(sessions, drafts)]`` in one batched forward.

        Ragged batch: each session's cache is cropped to its valid prefix and the caches are
        stacked left-padded to the longest; the new tokens are right-padded; a 4D additive
        mask hides the padding and keeps attention causal; position ids follow each session's
        own length. The new keys/values are split back into per-session caches. A session whose
        uncached tail of ``tokens`` is longer than ``PREFILL_ALONE`` tokens (a fresh prompt) is
        prefilled on its own first, so one long prompt does not pad the whole batch.
        """
        if len(sessions) != len(drafts):
            raise ValueError(f"{len(sessions)} sessions but {len(drafts)} drafts")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one batch")
        lm = self._lm
        seqs, wants, plans = [], [], []
        for s, d in zip(sessions, drafts):
            if s._owner is not self:
                raise ValueError("a session of another TargetModel")
            seq = s._tokens + _checked_ids(d, self.vocab_size)
            want = len(s._tokens) - 1
            f = s._st.plan(seq, want)
            if len(s._tokens) - f > PREFILL_ALONE:
                lm.rows(s._st, s._tokens, want)
                f = s._st.plan(seq, want)
            seqs.append(seq)
            wants.append(want)
            plans.append(f)
        results: list[Optional[list[torch.Tensor]]] = [None] * len(sessions)
        live = [i for i in range(len(sessions)) if plans[i] < len(seqs[i])]
        for i in range(len(sessions)):
            if i not in live:
                results[i] = sessions[i]._st.stored(wants[i], len(seqs[i]))
        if len(live) == 1:
            i = live[0]
            results[i] = lm.rows(sessions[i]._st, seqs[i], wants[i])
        elif live:
            self._batched_forward([sessions[i]._st for i in live], [seqs[i] for i in live],
                                  [wants[i] for i in live], [plans[i] for i in live], results, live)
        return [torch.stack(r) for r in results]

    def _batched_forward(self, states, seqs, wants, plans, results, where) -> None:
        lm = self._lm
        B = len(states)
        for st, f in zip(states, plans):
            st.prepare(f)
        lens = [_cache_len(st.cache) for st in states]
        assert lens == plans, (lens, plans)
        news = [len(seq) - f for seq, f in zip(seqs, plans)]
        Lmax, Nmax = max(lens), max(news)
        ids = torch.zeros(B, Nmax, dtype=torch.long)
        pos = torch.zeros(B, Nmax, dtype=torch.long)
        mask = torch.full((B, 1, Nmax, Lmax + Nmax), lm.mask_value(), dtype=lm.param_dtype)
        causal = torch.ones(Nmax, Nmax, dtype=torch.bool).tril()
        for b, (seq, f, n) in enumerate(zip(seqs, plans, news)):
            ids[b, :n] = torch.tensor(seq[f:], dtype=torch.long)
            pos[b] = f + torch.arange(Nmax)
            mask[b, 0, :, Lmax - f:Lmax] = 0
            mask[b, 0, :, Lmax:].masked_fill_(causal, 0)  # padded query rows attend causally too (no NaN rows)
        cache = None
        if Lmax > 0:
            per_layer = [_cache_kvs(st.cache) if st.cache is not None else None for st in states]
            n_layers = next(len(p) for p in per_layer if p is not None)
            kvs = []
            for layer in range(n_layers):
                ks, vs = [], []
                ref_k, ref_v = next(p[layer] for p in per_layer if p is not None)
                for b in range(B):
                    pad = Lmax - lens[b]
                    shape_k = (1, ref_k.shape[1], pad, ref_k.shape[3])
                    shape_v = (1, ref_v.shape[1], pad, ref_v.shape[3])
                    if per_layer[b] is None:
                        ks.append(ref_k.new_zeros(shape_k))
                        vs.append(ref_v.new_zeros(shape_v))
                    else:
                        k, v = per_layer[b][layer]
                        ks.append(torch.cat([k.new_zeros(shape_k), k], 2) if pad else k)
                        vs.append(torch.cat([v.new_zeros(shape_v), v], 2) if pad else v)
                kvs.append((torch.cat(ks, 0), torch.cat(vs, 0)))
            cache = _new_cache(kvs)
        else:
            cache = _new_cache()
        out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), position_ids=pos.to(lm.device),
                       **{lm.cache_kw: cache}, use_cache=True)
        lm.forwards += sum(news)
        all_kvs = _cache_kvs(cache)
        for b, (st, seq, f, n, want) in enumerate(zip(states, seqs, plans, news, wants)):
            st.cache = _new_cache([(k[b:b + 1, :, Lmax - f:Lmax + n].contiguous(),
                                    v[b:b + 1, :, Lmax - f:Lmax + n].contiguous()) for k, v in all_kvs])
            first = max(f, want)
            rows = out.logits[b, first - f:n].float()
            results[where[b]] = st.finish(seq, f, want, list(rows.unbind(0)))
