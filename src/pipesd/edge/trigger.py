"""When to ask the cloud to verify (NAV trigger).

PipeSD's dual threshold: keep the sequence confidence ``C = prod p_i`` of the drafts since the
last trigger; fire when ``C <= tau_seq`` (the run as a whole is probably broken somewhere) or
``p_i <= tau_tok`` (this token is probably rejected: verify now, don't build on it), or when the
run reaches ``max_draft`` tokens. After firing, ``C`` resets to 1.

The baselines are the same class with other settings: fixed K (``tau_seq = tau_tok = 0``,
``max_draft = K``), HSL-style token threshold (``tau_seq = 0``), EdgeLLM-style sequence
threshold (``tau_tok = 0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["TriggerConfig", "DualThresholdTrigger"]

REASON_TOKEN = "token"
REASON_SEQUENCE = "sequence"
REASON_CAP = "cap"


@dataclass
class TriggerConfig:
    """Thresholds of the NAV trigger. Zero disables a threshold."""

    tau_seq: float = 0.35
    tau_tok: float = 0.5
    max_draft: int = 16

    def __post_init__(self) -> None:
        for name in ("tau_seq", "tau_tok"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not isinstance(self.max_draft, int) or not (1 <= self.max_draft <= 1024):
            raise ValueError(f"max_draft must be an int in [1, 1024], got {self.max_draft!r}")


class DualThresholdTrigger:
    """Stateful trigger; one per edge stream, driven by the compute thread only."""

    def __init__(self, config: TriggerConfig) -> None:
        self.config = config
        self.confidence = 1.0
        self.length = 0

    def reset(self) -> None:
        self.confidence = 1.0
        self.length = 0

    def update(self, prob: float) -> Optional[str]:
        """Feed the draft probability of the token just drafted; return why to verify, or None."""
        cfg = self.config
        self.confidence *= prob
        self.length += 1
        reason = None
        if prob <= cfg.tau_tok:
            reason = REASON_TOKEN
        elif self.confidence <= cfg.tau_seq:
            reason = REASON_SEQUENCE
        elif self.length >= cfg.max_draft:
            reason = REASON_CAP
        if reason is not None:
            self.reset()
        return reason
