"""Draft and target runners over local Hugging Face causal LMs (see docs/models.md)."""
from pipesd.models.runners import (DraftModel, DraftStep, DraftTree, TargetModel, TargetSession, check_same_vocab,
                                   load_local)

__all__ = ["DraftModel", "DraftStep", "DraftTree", "TargetModel", "TargetSession", "check_same_vocab", "load_local"]
