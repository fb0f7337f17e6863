"""Model pairs that work offline.

- Bundled, trained pairs live in ``pipesd/zoo/pairs/<name>/`` (``draft/``, ``target/``,
  ``tokenizer/``, ``metrics.json``, ``MODEL_CARD.md``, ``heldout_sample.txt``);
  ``python -m pipesd.zoo.train`` rebuilds them. :func:`load_pair` loads one as runners.
- :func:`timing_pair` (``pipesd.zoo.timing``) builds Llama-shaped pairs with random weights
  from a config: realistic compute cost where acceptance is not the point.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipesd.models import DraftModel, TargetModel, check_same_vocab

__all__ = ["Pair", "available", "load_pair", "load_tokenizer", "pair_path", "timing_pair", "DEFAULT_PAIR",
           "PAIRS_DIR"]

PAIRS_DIR = Path(__file__).resolve().parent / "pairs"
DEFAULT_PAIR = "stdlib-code"


@dataclass
class Pair:
    """A draft/target pair as runners (``.draft.model`` / ``.target.model`` are the transformers modules)."""

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
    """Directory of a bundled pair (default: :data:`DEFAULT_PAIR`)."""
    name = name or DEFAULT_PAIR
    p = PAIRS_DIR / name
    if "/" in name or "\\" in name or not (p / "draft").is_dir() or not (p / "target").is_dir():
        raise ValueError(f"no bundled pair {name!r}; available: {', '.join(available()) or 'none'}")
    return p


def load_tokenizer(name: Optional[str] = None):
    """The tokenizer of a bundled pair (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pair_path(name) / "target", local_files_only=True)


def load_pair(name: Optional[str] = None, *, wire_topk: int = 8, **runner_kwargs) -> Pair:
    """Load a bundled pair (default ``stdlib-code``) as runners, offline, from the package.

    ``runner_kwargs`` (``device``, ``dtype``, ``threads``) go to both runners; ``wire_topk``
    to the draft.
    """
    p = pair_path(name)
    draft = DraftModel.from_pretrained(p / "draft", wire_topk=wire_topk, **runner_kwargs)
    target = TargetModel.from_pretrained(p / "target", **runner_kwargs)
    check_same_vocab(draft, target)
    return Pair(p.name, p, draft, target, target.tokenizer)


def timing_pair(*args, **kwargs) -> Pair:
    """Random-weight Llama-shaped pair for timing; see :func:`pipesd.zoo.timing.timing_pair`."""
    from pipesd.zoo.timing import timing_pair as _tp

    return _tp(*args, **kwargs)
