"""Draft and target models run by llama.cpp (``llama-cpp-python``) from GGUF files.

The target (:class:`LlamaCppTarget`, below the draft) serves the cloud: one llama.cpp
context, one sequence per edge session, logits at every verified position (its docstring and
docs/llamacpp.md "Target on the cloud").

:class:`LlamaCppDraft` is a :class:`pipesd.models.DraftModel` whose forwards go to llama.cpp
instead of torch: ``step``, ``expand_tree``, ``logits``, ``reset/truncate/extend``, ``wire_topk``,
``tokenizer`` and ``full_q`` behave the same, because everything above the logits (argmax,
``pipesd.sampling.draft_distribution``, the draw from exactly the reported top-k q) is
DraftModel's own code. Only the logits source differs.

KV cache: llama.cpp's context holds one sequence; like the torch runner it stays valid for
the longest common prefix of what was fed and what is asked about. A rollback sets
``Llama.n_tokens`` back to the common prefix (``Llama.eval`` then removes the stale cells with
llama.cpp's memory ``seq_rm``) and feeds only the new tail. The next-token logits of the last
``MAX_KEPT_ROWS`` fed positions whose logits were computed are kept, so truncating to one of
them costs no forward.

Install notes (llama-cpp-python compiles llama.cpp from source): docs/llamacpp.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipesd.models.runners import MAX_KEPT_ROWS, DraftModel, _lcp

__all__ = ["LlamaCppDraft", "LlamaCppTarget", "LlamaCppTargetSession", "require_llama_cpp", "INSTALL_HINT",
           "TARGET_INSTALL_HINT"]

INSTALL_HINT = ("install llama-cpp-python (it compiles llama.cpp from source, ~15-20 min on 2 cores): "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python  (see docs/llamacpp.md for BLAS/CUDA "
                "options); or run the torch draft (`--draft`) instead")


TARGET_INSTALL_HINT = ("install it with `pip install 'pipesd[llama]'` (llama-cpp-python compiles llama.cpp from "
                       "source, ~15-20 min on 2 cores; see docs/llamacpp.md), or serve the torch target "
                       "(`--model`) instead")


def require_llama_cpp(role: str = "draft"):
    """``import llama_cpp``, or an ImportError that says how to get it (``role``: draft or target)."""
    try:
        import llama_cpp
    except ImportError as e:
        hint = TARGET_INSTALL_HINT if role == "target" else INSTALL_HINT
        raise ImportError(f"the llama.cpp {role} backend needs the `llama_cpp` module, which is not importable "
                          f"({e}); {hint}") from e
    return llama_cpp


class _LlamaLM:
    """The llama.cpp side of a draft: one sequence in one context, rows of next-token logits.

    Offers the one call :class:`DraftModel` makes on its forward backend:
    ``rows(state, seq, want_from)`` with ``want_from == len(seq) - 1`` (``state`` is unused:
    the context is the state).
    """

    def __init__(self, llm, n_ctx: int) -> None:
        self.llm = llm
        self.n_ctx = int(n_ctx)
        self.vocab_size = int(llm.n_vocab())
        self.device = torch.device("cpu")
        self.forwards = 0
        self._fed: list[int] = []
        self._rows: dict[int, np.ndarray] = {}  # position p of _fed -> logits after _fed[:p + 1]

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        if not ptr:
            raise RuntimeError("llama.cpp returned no logits for the last token")
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).astype(np.float32, copy=True)

    def rows(self, _state, seq: Sequence[int], want_from: int) -> list[torch.Tensor]:
        n = len(seq)
        if n == 0:
            raise ValueError("cannot score an empty sequence")
        if want_from != n - 1:
            raise ValueError("the llama.cpp draft gives the next-token logits of the last position only")
        if n > self.n_ctx:
            raise ValueError(f"sequence of {n} tokens exceeds the llama.cpp context (n_ctx={self.n_ctx}); "
                             "load the draft with a larger n_ctx")
        common = _lcp(self._fed, seq)
        if common == n and (n - 1) in self._rows:
            return [torch.from_numpy(self._rows[n - 1])]
        f = min(common, n - 1)
        for p in [p for p in self._rows if p >= f]:
            del self._rows[p]
        del self._fed[f:]
        self.llm.n_tokens = f  # eval() drops KV cells from here on (memory seq_rm) and feeds the tail
        self.llm.eval([int(t) for t in seq[f:]])
        self.forwards += n - f
        row = self._last_logits()
        self._fed = [int(t) for t in seq]
        self._rows[n - 1] = row
        if len(self._rows) > MAX_KEPT_ROWS:
            del self._rows[min(self._rows)]
        return [torch.from_numpy(row)]


class LlamaCppDraft(DraftModel):
    """The edge's draft model as a GGUF file run by llama.cpp (see the module docstring).

    ``n_ctx``: llama.cpp context length (prompt + generated tokens; 0 = the model's training
    context). ``threads``: llama.cpp threads for generation and prompt batches (default 1: the
    edge's other threads and, on a small machine, the cloud need the rest). ``n_gpu_layers``:
    layers offloaded where llama.cpp was built with a GPU backend (-1 = all). ``tokenizer``:
    a tokenizer object, a directory to load one from, or None = the Hugging Face tokenizer
    stored in the GGUF (:func:`pipesd.zoo.gguf_export.load_gguf_tokenizer`).
    """

    def __init__(self, path: str | Path, tokenizer=None, *, n_ctx: int = 2048, threads: Optional[int] = 1,
                 n_batch: int = 512, n_gpu_layers: int = 0, wire_topk: int = 8, **llama_kwargs) -> None:
        if not isinstance(wire_topk, (int, np.integer)) or wire_topk < 1:
            raise ValueError(f"wire_topk must be an int >= 1, got {wire_topk!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if int(n_ctx) < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        llama_cpp = require_llama_cpp()
        nt = int(threads) if threads is not None else max(1, os.cpu_count() or 1)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=int(n_ctx), n_threads=nt, n_threads_batch=nt,
                              n_batch=int(n_batch), n_gpu_layers=int(n_gpu_layers), logits_all=False,
                              verbose=bool(llama_kwargs.pop("verbose", False)), **llama_kwargs)
        # llama.cpp may round the context up; llama-cpp-python's token buffer keeps the size asked for
        self._lm = _LlamaLM(llm, min(llm.n_ctx(), len(llm.input_ids)))
        self._st = None
        self.model = llm
        self.path = path
        self.tokenizer = self._load_tokenizer(path, tokenizer)
        self.device = self._lm.device
        self.vocab_size = self._lm.vocab_size
        self.wire_topk = int(min(wire_topk, self.vocab_size))
        self._tokens: list[int] = []

    @staticmethod
    def _load_tokenizer(path: Path, tokenizer):
        if tokenizer is None:
            from pipesd.zoo.gguf_export import load_gguf_tokenizer

            return load_gguf_tokenizer(path)
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        return tokenizer

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "LlamaCppDraft":
        """Same as the constructor (named like :meth:`DraftModel.from_pretrained`)."""
        return cls(path, **kwargs)

    @property
    def n_ctx(self) -> int:
        return self._lm.n_ctx

    def close(self) -> None:
        """Free llama.cpp's model and context now (instead of at garbage collection)."""
        self.model.close()


# --------------------------------------------------------------------------- target
def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); convert a "
                         "transformers model with `python -m pipesd.zoo.gguf_export`")


class LlamaCppTargetSession:
    """One edge session's verified sequence on a :class:`LlamaCppTarget` (the interface of
    :class:`pipesd.models.TargetSession`).

    Its KV cells live in one sequence (a *slot*) of the target's shared llama.cpp context while
    it holds one; ``fed`` is what that slot holds. Like the torch session, the cache stays valid
    for the longest common prefix of ``fed`` and what is asked about, so a rollback is asking
    about a shorter or different sequence.
    """

    def __init__(self, owner: "LlamaCppTarget", prompt_ids: Sequence[int]) -> None:
        from pipesd.models.runners import _checked_ids

        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self._owner = owner
        self._tokens = _checked_ids(prompt_ids, owner.vocab_size)
        self._slot: Optional[int] = None
        self._fed: list[int] = []
        self._rows: dict[int, np.ndarray] = {}  # position p of _fed -> logits after _fed[:p + 1]

    @property
    def tokens(self) -> list[int]:
        """The verified sequence (a copy): prompt + verified tokens."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def score(self, draft: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(draft) + 1, V]`` fp32: row i predicts the token after ``tokens + draft[:i]``.

        One llama.cpp decode over the uncached tail of ``tokens`` plus ``draft``; ``tokens`` is
        unchanged."""
        return self._owner.score_batch([self], [draft])[0]

    def commit(self, new_tokens: Sequence[int]) -> None:
        """Append verified tokens (accepted drafts + correction); the cache keeps the valid prefix."""
        from pipesd.models.runners import _checked_ids

        self._tokens.extend(_checked_ids(new_tokens, self._owner.vocab_size))

    def truncate(self, length: int) -> None:
        if not (1 <= length <= len(self._tokens)):
            raise ValueError(f"length {length} outside [1, {len(self._tokens)}]")
        del self._tokens[length:]

    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(tokens) + 1, V]`` of a draft tree, as :meth:`pipesd.models.TargetSession.score_tree`.

        llama.cpp has no tree attention mask, so each root-to-leaf chain is scored in turn with
        :meth:`score` (the prefix cache re-feeds only from where chains diverge). The cloud server
        verifies chains only; this is for callers that score trees themselves."""
        from pipesd.models.runners import _checked_ids

        toks = _checked_ids(tokens, self._owner.vocab_size)
        par = [int(p) for p in parents]
        if len(par) != len(toks):
            raise ValueError(f"{len(toks)} tokens but {len(par)} parents")
        for i, p in enumerate(par):
            if not (-1 <= p < i):
                raise ValueError(f"parents[{i}] = {p}: must be in [-1, {i}) (parents before children)")
        has_child = {p for p in par if p >= 0}
        out: list[Optional[torch.Tensor]] = [None] * (len(toks) + 1)
        out[0] = self.score([])[0]
        for leaf in (i for i in range(len(toks)) if i not in has_child):
            path = [leaf]
            while par[path[-1]] >= 0:
                path.append(par[path[-1]])
            path.reverse()
            rows = self.score([toks[i] for i in path])
            for k, node in enumerate(path):
                out[node + 1] = rows[k + 1]
        return torch.stack(out)

    def close(self) -> None:
        """Free the session's slot (the session can still be used; it re-feeds from scratch)."""
        self._owner._release(self)


class LlamaCppTarget:
    """The cloud's target model as a GGUF file run by llama.cpp: the interface of
    :class:`pipesd.models.TargetModel` that the cloud server uses (``new_session``,
    ``score_batch``, ``vocab_size``, ``tokenizer``, ``forwards``). Logits only: verification
    stays in :mod:`pipesd.verify`.

    Sessions: one llama.cpp context with ``slots`` sequences, each with its own ``n_ctx`` KV
    cells (``kv_unified=False``: a session attends only to its own cells, so its logits do
    not depend on which sessions share a launch). A session takes a free slot when it is
    first scored; when all are taken, the least recently scored session not in the launch
    loses its slot and re-feeds its sequence the next time it is scored. ``score_batch`` puts
    every session of a launch into one llama.cpp batch (ragged, no padding), in chunks of at
    most ``n_batch`` tokens; logits are computed only at the verified positions. Memory: the
    weights once, plus ``slots * n_ctx`` KV cells allocated up front (docs/llamacpp.md).

    ``n_ctx``: tokens per session (prompt + generated + drafts; 0 = the model's training
    context; never more than that). ``threads``: llama.cpp threads (None = all cores).
    ``tokenizer``: an object, a directory to load one from, or None = the Hugging Face
    tokenizer stored in the GGUF (None when the file has none: then the cloud cannot check the
    edge's tokenizer fingerprint, and does not stop at EOS).
    """

    def __init__(self, path: str | Path, tokenizer=None, *, n_ctx: int = 2048, slots: int = 8,
                 threads: Optional[int] = 1, n_batch: int = 512, n_gpu_layers: int = 0, verbose: bool = False) -> None:
        for name, v, lo in (("n_ctx", n_ctx, 0), ("slots", slots, 1), ("n_batch", n_batch, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        path = Path(path)
        _check_gguf_file(path)
        llama_cpp = require_llama_cpp("target")
        if slots > llama_cpp.llama_max_parallel_sequences():
            raise ValueError(f"slots must be <= {llama_cpp.llama_max_parallel_sequences()} (llama.cpp's limit), "
                             f"got {slots}")
        import threading

        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose
        from llama_cpp._utils import suppress_stdout_stderr

        set_verbose(verbose)
        with suppress_stdout_stderr(disable=verbose):
            llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else int(n_gpu_layers)
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=verbose)
        except ValueError as e:
            raise ValueError(f"llama.cpp could not load {path}: {e} (an architecture this llama.cpp build does "
                             "not know, or a damaged file)") from None
        train_ctx = int(self._model.n_ctx_train())
        per_seq = train_ctx if n_ctx == 0 else min(int(n_ctx), train_ctx)
        nt = int(threads) if threads is not None else max(1, os.cpu_count() or 1)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = per_seq * int(slots)
        cp.n_batch = cp.n_ubatch = int(n_batch)
        cp.n_seq_max = int(slots)
        cp.kv_unified = False
        cp.n_threads = cp.n_threads_batch = nt
        try:
            with suppress_stdout_stderr(disable=verbose):
                self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=verbose)
        except ValueError as e:
            self._model.close()
            raise ValueError(f"llama.cpp could not create a context of {slots} x {per_seq} tokens for {path}: {e} "
                             "(not enough memory? lower n_ctx or slots)") from None
        self._lc = llama_cpp
        self._batch = llama_cpp.llama_batch_init(int(n_batch), 0, 1)
        self._lock = threading.RLock()  # sessions close from the event loop's thread while shutting down
        self.path = path
        self.slots = int(slots)
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(self._ctx.ctx))
        self.n_batch = int(n_batch)
        self.threads = nt
        self.vocab_size = int(self._model.n_vocab())
        self.eos_token_id = int(self._model.token_eos())
        self.device = torch.device("cpu")
        self.tokenizer = LlamaCppDraft._load_tokenizer(path, tokenizer)
        if self.tokenizer is not None and len(self.tokenizer) > self.vocab_size:
            self.close()
            raise ValueError(f"tokenizer has {len(self.tokenizer)} ids but {path} only {self.vocab_size} logits: "
                             "not this model's tokenizer")
        self.forwards = 0  # token-forwards run so far, all sessions (prompt, drafts, re-feeds)
        self._free = list(range(self.slots))
        self._holders: dict[int, LlamaCppTargetSession] = {}  # slot -> session, least recently scored first

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "LlamaCppTarget":
        """Same as the constructor (named like :meth:`pipesd.models.TargetModel.from_pretrained`)."""
        return cls(path, **kwargs)

    def new_session(self, prompt_ids: Sequence[int]) -> LlamaCppTargetSession:
        """A session for one edge stream (touches no llama.cpp state: safe from any thread)."""
        return LlamaCppTargetSession(self, prompt_ids)

    def close(self) -> None:
        """Free llama.cpp's context and model now (instead of at garbage collection)."""
        with self._lock:
            if self._batch is not None:
                self._lc.llama_batch_free(self._batch)
                self._batch = None
            self._ctx.close()
            self._model.close()

    # ------------------------------------------------------------------ slots
    def _release(self, s: LlamaCppTargetSession) -> None:
        with self._lock:
            if s._slot is not None and self._holders.get(s._slot) is s:
                self._lc.llama_memory_seq_rm(self._ctx.memory, s._slot, 0, -1)
                del self._holders[s._slot]
                self._free.append(s._slot)
            s._slot, s._fed, s._rows = None, [], {}

    def _acquire(self, s: LlamaCppTargetSession, keep: set) -> None:
        """Give ``s`` a slot (most recently used from now); may evict a session not in ``keep``."""
        if s._slot is not None:
            self._holders[s._slot] = self._holders.pop(s._slot)  # to the end: most recently used
            return
        if not self._free:
            victim = next(v for v in self._holders.values() if id(v) not in keep)
            self._release(victim)
        s._slot, s._fed, s._rows = self._free.pop(), [], {}
        self._holders[s._slot] = s

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def _plan(s: LlamaCppTargetSession, seq: list[int], want_from: int) -> int:
        """Position from which ``seq`` must be fed for logits rows ``[want_from, len(seq))``."""
        common = _lcp(s._fed, seq) if s._slot is not None else 0
        m = want_from
        while m < len(seq) and m < common and m in s._rows:
            m += 1
        return len(seq) if m == len(seq) else min(common, m)

    def score_batch(self, sessions: Sequence[LlamaCppTargetSession],
                    drafts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``[s.score(d) for s, d in zip(sessions, drafts)]`` in one llama.cpp batch (up to
        ``slots`` sessions per batch, at most ``n_batch`` tokens per decode)."""
        from pipesd.models.runners import _checked_ids

        if len(sessions) != len(drafts):
            raise ValueError(f"{len(sessions)} sessions but {len(drafts)} drafts")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one batch")
        seqs = []
        for s, d in zip(sessions, drafts):
            if s._owner is not self:
                raise ValueError("a session of another LlamaCppTarget")
            seq = s._tokens + _checked_ids(d, self.vocab_size)
            if len(seq) > self.n_ctx:
                raise ValueError(f"sequence of {len(seq)} tokens exceeds the llama.cpp context of a session "
                                 f"(n_ctx={self.n_ctx}); load the target with a larger n_ctx")
            seqs.append(seq)
        out: list[torch.Tensor] = []
        with self._lock:
            for g in range(0, len(sessions), self.slots):
                out += self._score_group(list(sessions[g:g + self.slots]), seqs[g:g + self.slots])
        return out

    def _score_group(self, sessions: list, seqs: list) -> list[torch.Tensor]:
        lc, mem = self._lc, self._ctx.memory
        keep = {id(s) for s in sessions}
        wants, plans = [], []
        for s, seq in zip(sessions, seqs):
            self._acquire(s, keep)
            want = len(s._tokens) - 1
            f = self._plan(s, seq, want)
            if f < len(seq):
                lc.llama_memory_seq_rm(mem, s._slot, f, -1)
                del s._fed[f:]
                for p in [p for p in s._rows if p >= f]:
                    del s._rows[p]
            wants.append(want)
            plans.append(f)
        # one flat list of (session index, position, token, wants logits), decoded in chunks
        entries = [(b, p, seq[p], p >= wants[b]) for b, seq in enumerate(seqs) for p in range(plans[b], len(seq))]
        try:
            for c in range(0, len(entries), self.n_batch):
                self._decode(sessions, entries[c:c + self.n_batch])
        except BaseException:
            for s in sessions:  # some ubatches may have landed: re-feed these sessions from scratch
                self._release(s)
            raise
        result = []
        for b, (s, seq) in enumerate(zip(sessions, seqs)):
            if plans[b] < len(seq):  # else the slot still holds fed, of which seq is a prefix
                self.forwards += len(seq) - plans[b]
                s._fed = list(seq)
            result.append(torch.from_numpy(np.stack([s._rows[p] for p in range(wants[b], len(seq))])))
            if len(s._rows) > MAX_KEPT_ROWS:
                for p in sorted(s._rows)[:len(s._rows) - MAX_KEPT_ROWS]:
                    del s._rows[p]
        return result

    def _decode(self, sessions: list, chunk: list) -> None:
        lc, batch = self._lc, self._batch
        for j, (b, p, tok, logits) in enumerate(chunk):
            batch.token[j] = tok
            batch.pos[j] = p
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = sessions[b]._slot
            batch.logits[j] = logits
        batch.n_tokens = len(chunk)
        rc = lc.llama_decode(self._ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (1: no KV cells left, -1: invalid batch, "
                               "< -1: fatal error)")
        V = self.vocab_size
        for j, (b, p, _, logits) in enumerate(chunk):
            if logits:
                ptr = lc.llama_get_logits_ith(self._ctx.ctx, j)
                if not ptr:
                    raise RuntimeError(f"llama.cpp returned no logits for batch entry {j}")
                sessions[b]._rows[p] = np.ctypeslib.as_array(ptr, shape=(V,)).astype(np.float32, copy=True)
