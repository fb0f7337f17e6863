"""Edge settings, and the methods (PipeSD and its baselines) as presets of them."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

from pipesd.edge.offline import OFFLINE_POLICIES
from pipesd.edge.trigger import TRIGGER_RULES, TriggerConfig

__all__ = ["ALIASES", "EdgeConfig", "METHODS", "canonical_method"]

#: Every method the runtime runs. The pipelined and serial ones are the same edge machinery
#: with other settings, so comparisons measure the mechanism, not the code; ``cloud-stream``,
#: ``target-per-token`` and ``edge-only`` are the references (docs/runtime.md, "Methods").
METHODS = (
    "pipesd",            # pipeline + DP batches + dual-threshold trigger
    "pipesd-adaptive",   # per generation, the schedule the TPT model ranks fastest within the cloud budget
    "vanilla-sd",        # draft K, send, verify, wait (serial, fixed K)
    "tree-sd",           # vanilla-sd's K-token spine plus sibling leaves where the draft is unsure: one tree per round
    "hsl",               # HSL as its paper ran it: token threshold (tau_tok 0.99), stop, send all, wait
    "edgellm",           # EdgeLLM as its paper ran it: adaptive sequence threshold, pipelined, sent at the trigger
    "fixed-batch",       # pipeline + dual trigger, fixed-size batches instead of the DP plan
    "dual-no-pipeline",  # ablation: pipesd without the pipeline (drafting pauses for each verdict)
    "pipe-fixed-k",      # ablation: pipeline + DP batches, fixed draft length K instead of the dual trigger
    "pipe-token-only",   # ablation: pipeline + DP, token-confidence threshold only
    "pipe-seq-only",     # ablation: pipeline + DP, sequence-confidence threshold only
    "cloud-stream",      # the cloud decodes alone and streams: one request, a verdict per token
    "target-per-token",  # the cloud decodes, one round trip per token
    "edge-only",         # the draft model alone (not the target's output: a speed reference)
)

#: Deprecated method names, accepted wherever a method is (for_method, the CLI, edge-server).
ALIASES = {
    "target-only": "target-per-token",
    "single-threshold": "pipe-token-only",
    "seq-threshold": "pipe-seq-only",
    "fixed-k-pipeline": "pipe-fixed-k",
}


def canonical_method(name: str) -> str:
    """The method ``name`` denotes (an alias maps to its canonical name); ValueError otherwise."""
    if name in METHODS:
        return name
    if name in ALIASES:
        warnings.warn(f"method {name!r} is deprecated; use {ALIASES[name]!r}", DeprecationWarning, stacklevel=2)
        return ALIASES[name]
    raise ValueError(f"method must be one of {', '.join(METHODS)} (deprecated aliases: "
                     f"{', '.join(ALIASES)}); got {name!r}")


HSL_TAU_TOK = 0.99
"""HSL's per-token confidence threshold for code (its math runs used 0.7)."""


@dataclass
class EdgeConfig:
    """How the edge drafts, batches and triggers. Use :meth:`for_method` for the presets."""

    method: str = "pipesd"
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    trigger_rule: str = "dual"  # "dual" (fixed thresholds) | "edgellm" (EdgeLLM's adaptive sequence threshold)
    batching: str = "dp"  # "dp" | "fixed" | "trigger" (nothing goes up before the trigger)
    batch_size: int = 4  # for batching="fixed"
    pipeline: bool = True  # keep drafting while a verdict is awaited
    lookahead: int = 48  # max drafts ahead of the verified prefix
    k: int = 4  # draft length of the fixed-K methods
    draft_step_s: float = 0.0  # compute profile: pad each draft step to at least this long
    wire_q: str = "auto"  # "auto" (top-k q when sampling), "topk", "full" (paper's wire: V probs/token)
    # The verdict deadline: no verdict (or session opening) for this long while the edge waits
    # counts as losing the cloud. Generous because a CPU target under load (or a long prompt's
    # prefill) can take seconds; lower it (5-10 s) for interactive use over a flaky link.
    verdict_timeout_s: float = 60.0
    ring_capacity: int = 1024
    record_timeline: bool = False
    # Offline robustness (docs/reliability.md). "draft": keep generating with the draft alone,
    # flagged unverified, reconnect in the background and have the suffix verified when the cloud
    # returns (the method's offline availability); "wait": pause, reconnect, give up after
    # offline_wait_s; "fail": raise CloudUnavailableError at once.
    offline_policy: str = "draft"
    reconnect_initial_s: float = 0.2  # first retry soon: a restarting cloud is often back in < 1 s
    reconnect_max_s: float = 5.0  # cap: a returning cloud is noticed within ~5 s, without hammering it
    offline_wait_s: float = 60.0  # "wait": give up when the cloud is gone this long (as long as a verdict may take)
    # The adaptive schedule's cloud budget (pipesd.edge.schedule): the most cloud busy ms per
    # generated token it may choose; None: what vanilla SD at its best K would spend; math.inf:
    # no limit (cloud streaming allowed). Also bounds the budgeted tuner (pipesd.tuning).
    cloud_budget_ms_per_token: Optional[float] = None
    # Prompt-lookup proposals (pipesd.edge.lookup; docs/runtime.md, "Prompt-lookup proposals"):
    # "ngram" drafts the token after the most recent earlier occurrence of the last n tokens
    # (n from lookup_max_n down to lookup_min_n) without a draft forward; at most
    # lookup_max_tokens in a row, each with trigger confidence lookup_confidence; with
    # lookup_confirm, only once the draft model's own token matched the lookup's (a confirmed copy).
    # "shadow" measures what lookup would propose without using it; "auto" (pipesd-adaptive
    # only) lets the adaptive schedule turn it on where its model says it pays. None: "auto"
    # for pipesd-adaptive, "off" for every other method.
    lookup: Optional[str] = None
    # Draft trees (tree-sd; pipesd.edge.tree): at a spine position whose draft probability is
    # below tree_confidence, tree_width - 1 sibling leaves from the same q.
    tree_width: int = 2
    tree_confidence: float = 0.8
    lookup_max_n: int = 4
    lookup_min_n: int = 3  # shorter matches propose wrong tokens far more often (bench/results/lookup-hit-rate.md)
    lookup_max_tokens: int = 8
    lookup_confidence: float = 0.9
    lookup_confirm: bool = True

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        if self.trigger_rule not in TRIGGER_RULES:
            raise ValueError(f"trigger_rule must be one of {', '.join(TRIGGER_RULES)}; got {self.trigger_rule!r}")
        if self.batching not in ("dp", "fixed", "trigger"):
            raise ValueError(f"batching must be 'dp', 'fixed' or 'trigger', got {self.batching!r}")
        if self.wire_q not in ("auto", "topk", "full"):
            raise ValueError(f"wire_q must be 'auto', 'topk' or 'full', got {self.wire_q!r}")
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.draft_step_s < 0:
            raise ValueError(f"draft_step_s must be >= 0, got {self.draft_step_s}")
        if self.verdict_timeout_s <= 0:
            raise ValueError(f"verdict_timeout_s must be > 0, got {self.verdict_timeout_s}")
        if self.offline_policy not in OFFLINE_POLICIES:
            raise ValueError(f"offline_policy must be one of {', '.join(OFFLINE_POLICIES)}; got {self.offline_policy!r}")
        if not (0 < self.reconnect_initial_s <= self.reconnect_max_s):
            raise ValueError(f"need 0 < reconnect_initial_s <= reconnect_max_s, got {self.reconnect_initial_s}, "
                             f"{self.reconnect_max_s}")
        if not self.offline_wait_s > 0:
            raise ValueError(f"offline_wait_s must be > 0, got {self.offline_wait_s}")
        b = self.cloud_budget_ms_per_token
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b) or b < 0):
            raise ValueError(f"cloud_budget_ms_per_token must be None or a number >= 0 (inf: no limit), got {b!r}")
        if self.ring_capacity < 2 or self.ring_capacity & (self.ring_capacity - 1):
            raise ValueError(f"ring_capacity must be a power of two >= 2, got {self.ring_capacity}")
        self._check_lookup()
        if not (isinstance(self.tree_width, int) and 1 <= self.tree_width <= 8):
            raise ValueError(f"tree_width must be an int in [1, 8], got {self.tree_width!r}")
        if not (0.0 <= self.tree_confidence <= 1.0):
            raise ValueError(f"tree_confidence must be in [0, 1], got {self.tree_confidence!r}")
        if self.method == "tree-sd" and self.wire_q == "full":
            raise ValueError("tree-sd sends top-k q rows only: wire_q='full' is not supported with it")

    def _check_lookup(self) -> None:
        from pipesd.edge.lookup import LOOKUP_MODES

        if self.lookup is None:
            self.lookup = "auto" if self.method == "pipesd-adaptive" else "off"
        if self.lookup not in LOOKUP_MODES:
            raise ValueError(f"lookup must be one of {', '.join(LOOKUP_MODES)}; got {self.lookup!r}")
        if self.lookup == "auto" and self.method != "pipesd-adaptive":
            raise ValueError(f"lookup='auto' lets the adaptive schedule decide: it needs method 'pipesd-adaptive', "
                             f"not {self.method!r} (use 'ngram' or 'off')")
        for name in ("lookup_max_n", "lookup_min_n", "lookup_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"{name} must be an int in [1, 64], got {v!r}")
        if self.lookup_min_n > self.lookup_max_n:
            raise ValueError(f"lookup_min_n ({self.lookup_min_n}) must be <= lookup_max_n ({self.lookup_max_n})")
        c = self.lookup_confidence
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not 0.0 < c <= 1.0:
            raise ValueError(f"lookup_confidence must be in (0, 1], got {c!r}")
        if not isinstance(self.lookup_confirm, bool):
            raise ValueError(f"lookup_confirm must be a bool, got {self.lookup_confirm!r}")

    @classmethod
    def for_method(cls, method: str = "pipesd", *, tau_seq: Optional[float] = None, tau_tok: Optional[float] = None,
                   **overrides) -> "EdgeConfig":
        """The preset for ``method`` (a deprecated alias maps to its canonical name); keyword
        arguments override any field. ``tau_seq`` / ``tau_tok`` set the trigger's thresholds
        where the method has them (``hsl``: ``tau_tok``, default 0.99 as in HSL's code runs, 0.7
        for math; ``edgellm``: ``tau_seq`` is the initial threshold); ``trigger`` gives them all."""
        method = canonical_method(method)
        k = overrides.get("k", cls.k)
        trig = overrides.pop("trigger", None)
        default = TriggerConfig(tau_tok=HSL_TAU_TOK) if method == "hsl" else TriggerConfig()
        t = trig or default
        if tau_seq is not None or tau_tok is not None:
            t = TriggerConfig(t.tau_seq if tau_seq is None else tau_seq, t.tau_tok if tau_tok is None else tau_tok,
                              t.max_draft)
        base = dict(method=method)
        if method in ("pipesd", "pipesd-adaptive", "fixed-batch", "dual-no-pipeline"):
            base.update(batching="fixed" if method == "fixed-batch" else "dp", pipeline=method != "dual-no-pipeline",
                        trigger=t)
        elif method in ("vanilla-sd", "tree-sd"):
            base.update(batching="trigger", pipeline=False, trigger=TriggerConfig(0.0, 0.0, k))
        elif method == "pipe-fixed-k":
            base.update(batching="dp", pipeline=True, trigger=TriggerConfig(0.0, 0.0, k))
        elif method == "pipe-token-only":
            base.update(batching="dp", pipeline=True, trigger=TriggerConfig(0.0, t.tau_tok, t.max_draft))
        elif method == "pipe-seq-only":
            base.update(batching="dp", pipeline=True, trigger=TriggerConfig(t.tau_seq, 0.0, t.max_draft))
        elif method == "hsl":  # stop at the trigger, the whole draft in one message, wait
            base.update(batching="trigger", pipeline=False, trigger=TriggerConfig(0.0, t.tau_tok, t.max_draft))
        elif method == "edgellm":  # keep drafting during verification; tokens go up at the trigger only
            base.update(batching="trigger", pipeline=True, trigger=TriggerConfig(t.tau_seq, 0.0, t.max_draft),
                        trigger_rule="edgellm")
        else:
            base.update(trigger=t)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "EdgeConfig":
        return dataclasses.replace(self, **changes)
