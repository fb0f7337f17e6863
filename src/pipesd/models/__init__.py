"""Draft and target runners over local Hugging Face causal LMs (see docs/models.md)."""
from pipesd.models.runners import (DraftModel, DraftStep, DraftTree, TargetModel, TargetSession, check_same_vocab,
                                   load_local)
from pipesd.models.llamacpp import LlamaCppDraft  # llama_cpp itself is imported only when one is built

__all__ = ["DraftModel", "DraftStep", "DraftTree", "TargetModel", "TargetSession", "check_same_vocab", "load_local",
           "LlamaCppDraft"]
