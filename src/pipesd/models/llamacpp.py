"""A draft model run by llama.cpp (``llama-cpp-python``) from a GGUF file.

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

__all__ = ["LlamaCppDraft", "require_llama_cpp", "INSTALL_HINT"]

INSTALL_HINT = ("install llama-cpp-python (it compiles llama.cpp from source, ~15-20 min on 2 cores): "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python  (see docs/llamacpp.md for BLAS/CUDA "
                "options); or run the torch draft (`--draft`) instead")


def require_llama_cpp():
    """``import llama_cpp``, or an ImportError that says how to get it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"the llama.cpp draft backend needs the `llama_cpp` module, which is not importable "
                          f"({e}); {INSTALL_HINT}") from e
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
