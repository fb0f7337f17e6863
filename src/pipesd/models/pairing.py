"""Is a draft/target pair usable together? One shared tokenizer, and logits that cover it.

The one check behind :func:`check_same_vocab` (the runners' guard when a pair is loaded) and
``pipesd check-pair`` (:func:`pipesd.checkpair.check_pair`).
"""
from __future__ import annotations

__all__ = ["PairMismatch", "check_tokenizers", "check_same_vocab"]


class PairMismatch(ValueError):
    """The draft and the target cannot be used together (tokenizers or vocabularies differ)."""


def check_tokenizers(draft_tok, target_tok, draft_vocab: int, target_vocab: int) -> dict:
    """Refuse a pair without one shared tokenizer (:class:`PairMismatch`); returns what was compared.

    Both tokenizers known: their fingerprints (vocabulary, EOS, BOS) must match; the error
    names the first ids that differ. One missing: the logit counts must match. Each model must
    have a logit row per tokenizer entry (more are fine: padded logits, e.g. 151,936 vs 152,064).
    """
    from pipesd.fingerprint import tokenizer_fingerprint

    if draft_tok is None or target_tok is None:
        if draft_vocab != target_vocab:
            raise PairMismatch(f"vocabulary sizes differ: draft {draft_vocab} logits, target {target_vocab}")
        if draft_tok is None and target_tok is None:
            return {"fingerprint": "", "compared": "logit counts only (no tokenizer files)", "vocab": draft_vocab}
        return {"fingerprint": tokenizer_fingerprint(draft_tok or target_tok),
                "compared": f"logit counts only (the {'draft' if draft_tok is None else 'target'} has no tokenizer)",
                "vocab": draft_vocab}
    fd, ft = tokenizer_fingerprint(draft_tok), tokenizer_fingerprint(target_tok)
    if fd != ft:
        raise PairMismatch(f"draft and target tokenizers differ (fingerprints {fd} vs {ft}): "
                           f"{_first_differences(draft_tok, target_tok)}. Speculative decoding needs one shared "
                           "tokenizer: pick a draft from the target's model family")
    n = len(target_tok)
    if draft_vocab < n or target_vocab < n:
        raise PairMismatch(f"a model has fewer logits than the tokenizer has tokens: draft {draft_vocab}, "
                           f"target {target_vocab}, tokenizer {n}")
    return {"fingerprint": fd, "compared": "tokenizer fingerprint (vocabulary, EOS, BOS)", "vocab": n}


def check_same_vocab(draft, target) -> None:
    """Refuse a draft/target runner pair that does not share one tokenizer: :func:`check_tokenizers`
    on their ``tokenizer`` (if any) and ``vocab_size``; raises :class:`PairMismatch` (a ``ValueError``)."""
    check_tokenizers(getattr(draft, "tokenizer", None), getattr(target, "tokenizer", None),
                     int(draft.vocab_size), int(target.vocab_size))


def _first_differences(a, b, limit: int = 3) -> str:
    va = {i: t for t, i in a.get_vocab().items()}
    vb = {i: t for t, i in b.get_vocab().items()}
    parts = []
    if len(va) != len(vb):
        parts.append(f"{len(va)} tokens in the draft's tokenizer, {len(vb)} in the target's")
    diffs = [i for i in sorted(set(va) | set(vb)) if va.get(i) != vb.get(i)]
    if diffs:
        shown = ", ".join(f"id {i}: draft {va.get(i)!r} vs target {vb.get(i)!r}" for i in diffs[:limit])
        parts.append(f"first differing ids: {shown}" + (f" ({len(diffs)} ids differ)" if len(diffs) > limit else ""))
    for name in ("eos_token_id", "bos_token_id"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x != y:
            parts.append(f"{name}: draft {x} vs target {y}")
    return "; ".join(parts) or "same tokens, different special tokens"
