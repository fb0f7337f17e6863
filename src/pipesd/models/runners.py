"""Draft and target runners over Hugging Face causal LMs, with KV caches that roll back.

A runner is asked about a *sequence* (a plain token list) and keeps its KV cache valid for the
longest common prefix of what it has already fed and the sequence it is asked about: rollback
is just asking about a shorter or different sequence (the cache is cropped to the common
prefix, and only the new tail is fed). The last token of a sequence is always (re)fed so its
logits come out of the same forward as the new tokens: one code path, no stale logits.

Threads: ``threads=None`` leaves torch's setting alone. torch's intra-op pool is per
process, so an edge and a cloud that share a process also share it; the demo and the
benchmarks run them as two processes with one thread each on a 2-core machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipesd.sampling import SamplingParams, draft_distribution

__all__ = ["DraftModel", "TargetModel", "TargetSession", "DraftStep", "check_same_vocab", "load_local"]


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


def _cache_kwarg(model) -> str:
    """transformers 5.x calls the KV cache argument ``cache``; 4.x ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _CachedLM:
    """A causal LM plus one KV cache over one token sequence."""

    def __init__(self, model, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                 threads: Optional[int] = None) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.model = model.to(self.device)
        if dtype is not None:
            self.model = self.model.to(dtype)
        self.model.eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self._cache_kw = _cache_kwarg(self.model)
        self._fed: list[int] = []
        self._cache = None
        self.forwards = 0  # token-forwards run (for energy / waste accounting)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.inference_mode()
    def _logits_for(self, tokens: Sequence[int], extra: Sequence[int] = ()) -> torch.Tensor:
        """Logits after each of ``tokens[-1], *extra`` (``1 + len(extra)`` rows, fp32)."""
        seq = list(tokens) + list(extra)
        if not tokens:
            raise ValueError("cannot score an empty sequence")
        common = 0
        fed = self._fed
        limit = min(len(fed), len(tokens) - 1)  # always re-feed tokens[-1]
        while common < limit and fed[common] == seq[common]:
            common += 1
        if self._cache is None or common == 0:
            self._cache = self._new_cache()
            common = 0
        elif common < len(fed):
            # A negative count removes that many tokens (transformers 4.4x and 5.x alike).
            self._cache.crop(-(len(fed) - common))
        new = seq[common:]
        ids = torch.tensor([new], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, **{self._cache_kw: self._cache}, use_cache=True)
        returned = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if returned is not None:
            self._cache = returned
        self._fed = seq
        self.forwards += len(new)
        k = 1 + len(extra)
        return out.logits[0, -k:].float()

    def release(self) -> None:
        self._cache = None
        self._fed = []


@dataclass
class DraftStep:
    """One drafted token: ``prob`` is the trigger's confidence; ``(q_ids, q_probs)`` the top-k
    truncated distribution the token was drawn from (sampling) or the top-k of the softmax (greedy)."""

    token: int
    prob: float
    q_ids: np.ndarray
    q_probs: np.ndarray
    full_q: Optional[np.ndarray] = None


class DraftModel:
    """The edge's small model: one sequence, drafted one token at a time."""

    def __init__(self, model, tokenizer=None, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                 threads: Optional[int] = None, wire_topk: int = 8) -> None:
        if not (1 <= wire_topk <= 256):
            raise ValueError(f"wire_topk must be in [1, 256], got {wire_topk}")
        self._lm = _CachedLM(model, device, dtype, threads)
        self.model = self._lm.model
        self.tokenizer = tokenizer
        self.vocab_size = self._lm.vocab_size
        self.wire_topk = min(wire_topk, self.vocab_size)
        self.tokens: list[int] = []

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "DraftModel":
        model, tok = load_local(path, kwargs.get("dtype"))
        return cls(model, tok, **kwargs)

    @property
    def forwards(self) -> int:
        return self._lm.forwards

    def reset(self, prompt_ids: Sequence[int]) -> None:
        """Start a new sequence (the cache is reused for the common prefix)."""
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self.tokens = [int(t) for t in prompt_ids]

    def truncate(self, length: int) -> None:
        """Keep ``tokens[:length]`` (rollback)."""
        if not (1 <= length <= len(self.tokens)):
            raise ValueError(f"length {length} outside [1, {len(self.tokens)}]")
        del self.tokens[length:]

    def extend(self, ids: Sequence[int]) -> None:
        """Append tokens (e.g. the cloud's correction) without drafting."""
        self.tokens.extend(int(t) for t in ids)

    def logits(self) -> torch.Tensor:
        """Logits for the token after ``tokens`` ([V], fp32)."""
        return self._lm._logits_for(self.tokens)[0]

    @torch.inference_mode()
    def step(self, params: SamplingParams = SamplingParams(), generator: Optional[torch.Generator] = None,
             want_full_q: bool = False) -> DraftStep:
        """Draft the next token, append it to ``tokens`` and return it with its q."""
        logits = self.logits()
        if params.greedy:
            probs = torch.softmax(logits, -1)
            token = int(torch.argmax(logits))
            prob = float(probs[token])
            q_probs, q_ids = torch.topk(probs, self.wire_topk)
            q_probs = q_probs / q_probs.sum()
            q_ids = q_ids.to(torch.int32)
        else:
            q_ids, q_probs = draft_distribution(logits, params, self.wire_topk)
            idx = int(torch.multinomial(q_probs, 1, generator=generator))
            token = int(q_ids[idx])
            prob = float(q_probs[idx])
        self.tokens.append(token)
        full = None
        if want_full_q:
            full = np.zeros(self.vocab_size, dtype=np.float32)
            full[q_ids.numpy()] = q_probs.numpy()
        return DraftStep(token, prob, q_ids.numpy().astype(np.int32), q_probs.numpy().astype(np.float32), full)


class TargetSession:
    """One stream's verified sequence and KV cache on the cloud."""

    def __init__(self, owner: "TargetModel", prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self._owner = owner
        self._lm = _CachedLM.__new__(_CachedLM)
        self._lm.device, self._lm.model, self._lm.vocab_size = owner.device, owner.model, owner.vocab_size
        self._lm._cache_kw = _cache_kwarg(owner.model)
        self._lm._fed, self._lm._cache, self._lm.forwards = [], None, 0
        self.tokens: list[int] = [int(t) for t in prompt_ids]

    def score(self, draft: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(draft) + 1, V]``: row i predicts the token after ``tokens + draft[:i]``."""
        before = self._lm.forwards
        out = self._lm._logits_for(self.tokens, [int(t) for t in draft])
        self._owner.forwards += self._lm.forwards - before
        return out

    def commit(self, new_tokens: Sequence[int]) -> None:
        """Append verified tokens; the cache keeps whatever prefix stays valid."""
        self.tokens.extend(int(t) for t in new_tokens)

    def truncate(self, length: int) -> None:
        if not (1 <= length <= len(self.tokens)):
            raise ValueError(f"length {length} outside [1, {len(self.tokens)}]")
        del self.tokens[length:]

    def close(self) -> None:
        self._lm.release()


class TargetModel:
    """The cloud's large model; sessions share the weights, each has its own cache."""

    def __init__(self, model, tokenizer=None, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
                 threads: Optional[int] = None) -> None:
        lm = _CachedLM(model, device, dtype, threads)
        self.model = lm.model
        self.device = lm.device
        self.vocab_size = lm.vocab_size
        self.tokenizer = tokenizer
        self.forwards = 0

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "TargetModel":
        model, tok = load_local(path, kwargs.get("dtype"))
        return cls(model, tok, **kwargs)

    def new_session(self, prompt_ids: Sequence[int]) -> TargetSession:
        return TargetSession(self, prompt_ids)

    def score_batch(self, sessions: Sequence[TargetSession], drafts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Score several sessions' drafts. Runs the sessions' forwards one after another (each on
        its own cache); the verification that follows is one batched launch."""
        if len(sessions) != len(drafts):
            raise ValueError(f"{len(sessions)} sessions but {len(drafts)} drafts")
        return [s.score(d) for s, d in zip(sessions, drafts)]


def check_same_vocab(draft, target) -> None:
    """Refuse a draft/target pair that does not share one tokenizer (padded logits are fine)."""
    dt, tt = getattr(draft, "tokenizer", None), getattr(target, "tokenizer", None)
    if dt is not None and tt is not None:
        if dt.get_vocab() != tt.get_vocab():
            raise ValueError(f"draft and target tokenizers differ (draft {len(dt)} tokens, target {len(tt)} tokens): "
                             "speculative decoding needs one shared tokenizer")
        n = len(dt)
        if draft.vocab_size < n or target.vocab_size < n:
            raise ValueError(f"a model has fewer logits than the tokenizer has tokens: draft {draft.vocab_size}, "
                             f"target {target.vocab_size}, tokenizer {n}")
        return
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"vocabulary sizes differ: draft {draft.vocab_size}, target {target.vocab_size}")
