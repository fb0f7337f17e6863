"""Random-weight, architecture-sized Llama pairs: realistic compute cost, meaningless tokens.

Sizes (draft / target):

- ``tiny``:  2 x 64 / 6 x 256 (0.34 M / 5.4 M parameters with the bundled 4096-token vocabulary; CPU tests);
- ``small``: 4 x 256 / 12 x 1024 (4.0 M / 146 M; CPU timing);
- ``1b-8b``: Llama-3.2-1B-like 16 x 2048 / Llama-3.1-8B-like 32 x 4096 (GPU; built directly on the
  device in bf16 unless ``dtype`` says otherwise). With ``vocab_size=128256`` (Llama 3's) they have
  exactly 1.24 B / 8.03 B parameters; with the default 4096-token vocabulary the embeddings shrink.

The bundled tokenizer is attached (so text prompts work) whenever ``vocab_size`` covers it (extra
logit rows are padding that no prompt uses). Use these to time compute, never to judge acceptance.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["TIMING_SHAPES", "timing_pair", "timing_configs"]

TIMING_SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
             dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)),
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=8)),
    "1b-8b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8),
              dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8)),
}


def timing_configs(size: str, vocab_size: int):
    """(draft LlamaConfig, target LlamaConfig) of a timing size."""
    from transformers import LlamaConfig

    if size not in TIMING_SHAPES:
        raise ValueError(f"size must be one of {', '.join(TIMING_SHAPES)}, got {size!r}")
    # Like the models they imitate: Llama-3.2-1B ties its embeddings, Llama-3.1-8B does not.
    return tuple(LlamaConfig(vocab_size=vocab_size, max_position_embeddings=8192,
                             tie_word_embeddings=not (size == "1b-8b" and i == 1),
                             bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)
                 for i, shape in enumerate(TIMING_SHAPES[size]))


def timing_pair(size: str = "tiny", vocab_size: Optional[int] = None, seed: int = 0, *, wire_topk: int = 8,
                device: str = "cpu", dtype: Optional[torch.dtype] = None, threads: Optional[int] = None):
    """A :class:`pipesd.zoo.Pair` of random-weight Llama-shaped runners (``tiny``, ``small``, ``1b-8b``)."""
    from transformers import LlamaForCausalLM

    from pipesd import zoo
    from pipesd.models import DraftModel, TargetModel

    tok = zoo.load_tokenizer() if zoo.available() else None
    vocab = int(vocab_size or (len(tok) if tok is not None else 32000))
    if tok is not None and vocab < len(tok):
        tok = None  # ids the tokenizer produces would not fit
    if dtype is None and size == "1b-8b":
        dtype = torch.bfloat16
    models = []
    for i, cfg in enumerate(timing_configs(size, vocab)):
        torch.manual_seed(seed + i)
        old = torch.get_default_dtype()
        try:
            if dtype is not None and dtype.is_floating_point:
                torch.set_default_dtype(dtype)
            with torch.device(device):
                models.append(LlamaForCausalLM(cfg).eval())
        finally:
            torch.set_default_dtype(old)
    draft = DraftModel(models[0], tok, wire_topk=wire_topk, device=device, dtype=dtype, threads=threads)
    target = TargetModel(models[1], tok, device=device, dtype=dtype, threads=threads)
    return zoo.Pair(f"timing-{size}", None, draft, target, tok)
