"""A short, stable identity of a tokenizer, exchanged on session open: edge and cloud must
agree on token ids, or "lossless" means nothing."""
from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the sorted (token, id) vocabulary and special tokens; first 16 hex digits."""
    if tokenizer is None:
        return ""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\x00{tok}\x01".encode("utf-8", "surrogatepass"))
    h.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id)).encode())
    return h.hexdigest()[:16]
