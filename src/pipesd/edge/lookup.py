"""Prompt-lookup proposals: draft tokens that cost no draft forward (docs/runtime.md,
"Prompt-lookup proposals").

Code repeats itself (identifiers, argument lists, whole lines), so the token after the last
few tokens has often been seen already. :class:`NgramIndex` finds, for the last ``n`` tokens of
the edge's sequence (prompt + committed + drafted), ``n`` from ``max_n`` down to ``min_n``, the
most recent earlier occurrence and proposes the token that followed it (vLLM's "ngram"
proposer, prompt lookup decoding). It keeps a hash index of every n-gram's end positions, so a
lookup is a few dict reads and an append or a rollback touches only the changed tokens.

:class:`LookupDraft` fuses it with the draft model in the compute thread: on a hit the
looked-up token is the draft (appended to the draft model's sequence with ``extend``, no
forward); on a miss the draft model steps as usual, and its KV cache catches up on the
looked-up tokens in that one forward (the runners' contract: the cache is valid for the longest
common prefix of what it fed and what it is asked about).

Terms: a **hit** is a lookup that found an earlier occurrence; a **lookup proposal** is a hit
used as the draft; each is one draft forward saved. A hit is not used once ``max_tokens``
proposals ran in a row (the draft model steps then, so its confidence and cache stay current),
nor, with ``confirm`` (the default), before the copy is **confirmed**: the draft model's own
last token equalled the lookup's proposal there (it is copying too); a confirmed copy runs
until a model step or a rollback. Unconfirmed lookups propose a wrong token far more often
than the draft does (bench/results/lookup-hit-rate.md), and a rejection costs a round trip. A lookup proposal is a deterministic draft: its q is one-hot (top-k wire: ids
``[x]``, probs ``[1.0]``), so the cloud's rejection rule (accept with ``p(x)``, else sample the
residual ``p`` without ``x``) stays exact. Its trigger confidence is the fixed ``confidence``
(``EdgeConfig.lookup_confidence``): a lookup has no probability of its own, and a fixed value
keeps the dual-threshold rules (token threshold, sequence product, hints, continuation)
unchanged.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from pipesd.models.runners import DraftStep

__all__ = ["LOOKUP_MODES", "NgramIndex", "LookupDraft", "one_hot_q"]

LOOKUP_MODES = ("off", "ngram", "shadow", "auto")
# off: none; ngram: lookup proposals; shadow: the draft model drafts every token, and what lookup
# would have proposed is measured against the target (the adaptive schedule's input); auto
# (pipesd-adaptive only): the schedule decides, per generation, from those measurements.


def one_hot_q(token: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k q of a deterministic draft: ids ``[token]``, probs ``[1.0]``."""
    return np.array([token], dtype=np.int32), np.array([1.0], dtype=np.float32)


class NgramIndex:
    """The most recent earlier occurrence of the sequence's last ``n`` tokens, longest ``n`` first.

    ``_ends[n][gram]`` lists, in increasing order, every ``p`` with ``tokens[p - n: p] == gram``;
    the last entry of the current suffix's list is ``len(tokens)`` itself, so the one before it
    is the most recent earlier occurrence, and ``tokens[p]`` followed it.
    """

    def __init__(self, max_n: int = 4, min_n: int = 3) -> None:
        if not (isinstance(min_n, int) and isinstance(max_n, int) and 1 <= min_n <= max_n):
            raise ValueError(f"need ints 1 <= lookup_min_n <= lookup_max_n, got {min_n!r}, {max_n!r}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple, list[int]]] = {n: {} for n in range(min_n, max_n + 1)}

    def __len__(self) -> int:
        return len(self.tokens)

    def reset(self, ids: Sequence[int]) -> None:
        self.tokens = []
        for d in self._ends.values():
            d.clear()
        self.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        for t in ids:
            self.append(t)

    def append(self, token: int) -> None:
        toks = self.tokens
        toks.append(int(token))
        end = len(toks)
        for n, d in self._ends.items():
            if end >= n:
                d.setdefault(tuple(toks[end - n:]), []).append(end)

    def truncate(self, length: int) -> None:
        """Keep ``tokens[:length]`` (a rollback): only the removed tokens' entries are touched."""
        toks = self.tokens
        for end in range(len(toks), max(length, 0), -1):
            for n, d in self._ends.items():
                if end >= n:
                    key = tuple(toks[end - n:end])
                    lst = d[key]
                    lst.pop()  # == end: entries are appended in order and removed newest first
                    if not lst:
                        del d[key]
        del toks[length:]

    def lookup(self) -> Optional[tuple[int, int]]:
        """``(token, n)``: the token after the most recent earlier occurrence of the last ``n``
        tokens, for the largest ``n`` that has one; None when none does (a miss)."""
        toks, end = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            lst = self._ends[n].get(tuple(toks[end - n:]))
            if lst is not None and len(lst) >= 2:
                return toks[lst[-2]], n
        return None


class LookupDraft:
    """The draft model with prompt-lookup proposals in front of it (the compute thread's draft).

    Same interface as the draft it wraps (``reset``, ``truncate``, ``extend``, ``step``; other
    attributes pass through). ``from_lookup[i]`` says whether token ``i`` of the sequence was a
    lookup proposal (prompt and cloud tokens: False). Counters: ``hits``, ``proposals`` (= draft
    forwards saved), ``model_steps`` and ``model_s`` (the draft model's steps and their time,
    catch-up forwards included).
    """

    def __init__(self, draft, index: Optional[NgramIndex] = None, *, confidence: float = 0.9,
                 max_tokens: int = 8, confirm: bool = True, shadow: bool = False) -> None:
        self.inner = draft
        # shadow: never propose; record in ``shadow_at`` (position -> token) what this wrapper
        # would have proposed, with the same run and confirmation rules (``shadow`` counts them).
        self.shadow = bool(shadow)
        self.shadow_at: dict[int, int] = {}
        self.shadow_count = 0
        self.index = index if index is not None else NgramIndex()
        self.confidence = float(confidence)
        self.max_tokens = int(max_tokens)
        self.confirm = bool(confirm)
        self.trusted = False  # confirm: the draft model's last token equalled the lookup's there
        self.from_lookup: list[bool] = []
        self.run = 0  # lookup proposals in a row since the draft model last stepped
        self.hits = self.proposals = self.model_steps = 0
        self.model_s = 0.0
        self.last_lookup = False  # the last step was a lookup proposal

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.index)

    def reset(self, prompt_ids: Sequence[int]) -> None:
        self.inner.reset(prompt_ids)
        self.index.reset(prompt_ids)
        self.from_lookup = [False] * len(self.index)
        self.shadow_at = {}
        self.run, self.trusted = 0, False

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)
        self.index.truncate(length)
        del self.from_lookup[length:]
        if self.shadow_at:
            self.shadow_at = {p: t for p, t in self.shadow_at.items() if p < length}
        self.run, self.trusted = 0, False

    def extend(self, ids: Sequence[int]) -> None:
        self.inner.extend(ids)
        self.index.extend(ids)
        self.from_lookup.extend([False] * len(ids))
        self.run, self.trusted = 0, False

    def step(self, params=None, generator=None, want_full_q: bool = False) -> DraftStep:
        """A lookup proposal when there is a hit (no forward), else the draft model's step. Not
        used: a hit after ``max_tokens`` proposals in a row, or (``confirm``) one not confirmed."""
        hit = self.index.lookup()
        self.hits += hit is not None
        use = hit is not None and self.run < self.max_tokens and (self.trusted or not self.confirm)
        if self.shadow:
            return self._shadow_step(hit, use, params, generator, want_full_q)
        if use:
            tok = hit[0]
            self.inner.extend([tok])
            qi, qp = one_hot_q(tok)
            full = None
            if want_full_q:
                full = np.zeros(self.inner.vocab_size, dtype=np.float32)
                full[tok] = 1.0
            self.run += 1
            self.proposals += 1
            self.last_lookup = True
            st = DraftStep(tok, self.confidence, qi, qp, None, full)
        else:
            t0 = time.perf_counter()
            st = self.inner.step(params, generator, want_full_q) if params is not None else self.inner.step()
            self.model_s += time.perf_counter() - t0
            self.model_steps += 1
            self.run = 0
            self.last_lookup = False
            self.trusted = hit is not None and hit[0] == st.token  # the model copied: trust the copy
        self.index.append(st.token)
        self.from_lookup.append(self.last_lookup)
        return st

    def _shadow_step(self, hit, use: bool, params, generator, want_full_q: bool) -> DraftStep:
        """The draft model steps; a proposal lookup would have made is only recorded."""
        t0 = time.perf_counter()
        st = self.inner.step(params, generator, want_full_q) if params is not None else self.inner.step()
        self.model_s += time.perf_counter() - t0
        self.model_steps += 1
        self.last_lookup = False
        if use:
            self.shadow_at[len(self.index)] = hit[0]
            self.shadow_count += 1
            self.run += 1  # as if proposed: the confirmation stands until the model would step
        else:
            self.run = 0
            self.trusted = hit is not None and hit[0] == st.token
        self.index.append(st.token)
        self.from_lookup.append(False)
        return st

    def shadow_check(self, start: int, end: int) -> tuple[int, int]:
        """``(checked, right)``: the shadow proposals at sequence positions ``[start, end)``, whose
        tokens are now the target's, and how many of them equal it; forget everything below ``end``."""
        toks = self.index.tokens
        checked = right = 0
        for p in range(max(0, start), min(end, len(toks))):
            t = self.shadow_at.get(p)
            if t is not None:
                checked += 1
                right += t == toks[p]
        if self.shadow_at:
            self.shadow_at = {p: t for p, t in self.shadow_at.items() if p >= end}
        return checked, right

    def lookup_tokens_in(self, start: int, end: int) -> int:
        """Lookup proposals among sequence positions ``[start, end)``."""
        return sum(self.from_lookup[max(0, start):end])
