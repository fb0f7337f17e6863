"""Model pairs that work offline.

- Bundled, trained pairs live in ``pipesd/zoo/pairs/<name>/`` (``draft/``, ``target/``,
  ``metrics.json``, ``MODEL_CARD.md``); ``python -m pipesd.zoo.train`` rebuilds them.
- :func:`timing_pair` builds Llama-shaped pairs with random weights from a config: realistic
  compute cost where acceptance is not the point.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipesd.models import DraftModel, TargetModel, check_same_vocab

__all__ = ["Pair", "available", "load_pair", "pair_path", "timing_pair", "DEFAULT_PAIR"]

PAIRS_DIR = Path(__file__).resolve().parent / "pairs"
DEFAULT_PAIR = "stdlib-code"


@dataclass
class Pair:
    name: str
    path: Optional[Path]
    draft: DraftModel
    target: TargetModel
    tokenizer: object


def available() -> list[str]:
    """Names of the bundled pairs."""
    if not PAIRS_DIR.is_dir():
        return []
    return sorted(p.name for p in PAIRS_DIR.iterdir() if (p / "draft").is_dir() and (p / "target").is_dir())


def pair_path(name: Optional[str] = None) -> Path:
    name = name or DEFAULT_PAIR
    p = PAIRS_DIR / name
    if not (p / "draft").is_dir():
        raise ValueError(f"no bundled pair {name!r}; available: {', '.join(available()) or 'none'}")
    return p


def load_pair(name: Optional[str] = None, *, wire_topk: int = 8, **runner_kwargs) -> Pair:
    """Load a bundled pair (default: ``stdlib-code``) as runners; offline, from the package."""
    p = pair_path(name)
    draft = DraftModel.from_pretrained(p / "draft", wire_topk=wire_topk, **runner_kwargs)
    target = TargetModel.from_pretrained(p / "target", **runner_kwargs)
    check_same_vocab(draft, target)
    return Pair(p.name, p, draft, target, target.tokenizer)


_TIMING_SHAPES = {
    # name: (draft shape, target shape)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
             dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)),
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8)),
    "1b-8b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
              dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)),
}


def timing_pair(size: str = "tiny", vocab_size: Optional[int] = None, seed: int = 0, *, wire_topk: int = 8,
                **runner_kwargs) -> Pair:
    """Random-weight Llama-shaped pair (``tiny``, ``small`` on CPU; ``1b-8b`` on a GPU).

    Uses the bundled tokenizer when one is present (so text prompts work); its outputs are
    noise: use it to time compute, never to judge acceptance.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in _TIMING_SHAPES:
        raise ValueError(f"size must be one of {', '.join(_TIMING_SHAPES)}, got {size!r}")
    tok = None
    if available():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(pair_path() / "target", local_files_only=True)
    vocab = vocab_size or (len(tok) if tok is not None else 32000)
    models = []
    for i, shape in enumerate(_TIMING_SHAPES[size]):
        torch.manual_seed(seed + i)
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True, **shape)
        models.append(LlamaForCausalLM(cfg).eval())
    draft = DraftModel(models[0], tok, wire_topk=wire_topk, **runner_kwargs)
    target = TargetModel(models[1], tok, **runner_kwargs)
    return Pair(f"timing-{size}", None, draft, target, tok)
