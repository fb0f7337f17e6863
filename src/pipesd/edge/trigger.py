"""When to ask the cloud to verify (NAV trigger).

PipeSD's dual threshold: keep the sequence confidence ``C = prod p_i`` of the drafts since the
last trigger; fire when ``C <= tau_seq`` (the run as a whole is probably broken somewhere) or
``p_i <= tau_tok`` (this token is probably rejected: verify now, don't build on it), or when the
run reaches ``max_draft`` tokens. After firing, ``C`` resets to 1.

The baselines are the same class with other settings: fixed K (``tau_seq = tau_tok = 0``,
``max_draft = K``), HSL's token threshold (``tau_seq = 0``), the sequence-only ablation
(``tau_tok = 0``). :class:`EdgeLLMTrigger` is EdgeLLM's: a sequence threshold that each
verdict moves (its update hook, :meth:`EdgeLLMTrigger.on_verdict`, runs on the verdict path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["TriggerConfig", "DualThresholdTrigger", "EdgeLLMTrigger", "TRIGGER_RULES", "make_trigger"]

TRIGGER_RULES = ("dual", "edgellm")

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

    def on_verdict(self, n: int, accepted: int, confidence: float) -> None:
        """Fixed thresholds: a verdict changes nothing."""

    wants_feedback = False  # the compute thread need not keep the drafts' probabilities


class EdgeLLMTrigger(DualThresholdTrigger):
    """EdgeLLM's trigger: fire when the cumulative confidence ``C = prod p_i`` of the drafts
    since the last trigger drops below ``alpha`` (or at ``max_draft``); ``alpha`` starts at
    ``config.tau_seq`` and each verdict of a round of ``n`` drafts moves it: all accepted,
    ``alpha *= 0.5`` (draft longer); else ``alpha /= C_round ** ((n - accepted) / n)`` (verify
    sooner: the more of the round was rejected, the more), with ``C_round`` the round's
    cumulative confidence, clamped to ``[ALPHA_MIN, ALPHA_MAX]``. The rule is the public
    reproduction's (docs/runtime.md says where it comes from and what was not confirmed)."""

    ALPHA_MIN = 1e-4  # below any product of max_draft plausible probabilities: the cap decides
    ALPHA_MAX = 1.0  # at 1 every draft below certainty fires (C < 1)
    wants_feedback = True

    def __init__(self, config: TriggerConfig) -> None:
        super().__init__(config)
        self.alpha = min(self.ALPHA_MAX, max(self.ALPHA_MIN, config.tau_seq))

    def update(self, prob: float) -> Optional[str]:
        self.confidence *= prob
        self.length += 1
        reason = None
        if self.confidence < self.alpha:
            reason = REASON_SEQUENCE
        elif self.length >= self.config.max_draft:
            reason = REASON_CAP
        if reason is not None:
            self.reset()
        return reason

    def on_verdict(self, n: int, accepted: int, confidence: float) -> None:
        """The update hook: a verdict for ``n`` drafts, ``accepted`` of them, whose cumulative
        confidence was ``confidence``. A round of no drafts (a bonus alone) changes nothing."""
        if n <= 0:
            return
        if accepted >= n:
            alpha = self.alpha * 0.5
        elif confidence <= 0.0:
            alpha = self.ALPHA_MAX
        else:
            alpha = self.alpha / confidence ** ((n - accepted) / n)
        self.alpha = min(self.ALPHA_MAX, max(self.ALPHA_MIN, alpha))


def make_trigger(config: TriggerConfig, rule: str = "dual") -> DualThresholdTrigger:
    """The trigger of ``rule`` (one of :data:`TRIGGER_RULES`)."""
    if rule == "dual":
        return DualThresholdTrigger(config)
    if rule == "edgellm":
        return EdgeLLMTrigger(config)
    raise ValueError(f"trigger rule must be one of {', '.join(TRIGGER_RULES)}; got {rule!r}")
