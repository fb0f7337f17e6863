"""What a generation returns: the output and its measurements (one accumulator, fed by the
pipeline's rooms at their own fields)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["Generation", "GenerationStats"]


@dataclass
class GenerationStats:
    """Per-run measurements. Acceptance: ``accepted_lengths`` holds, per verification, the
    number of drafts accepted; ``acceptance_rate`` = accepted drafts / verified drafts."""

    method: str = ""
    seed: Optional[int] = None  # the sampling seed used (drawn when none was given): replays the run; greedy None
    new_tokens: int = 0
    wall_s: float = 0.0
    tpt_s: float = 0.0  # wall time per generated token, from session open to the last verdict
    drafted: int = 0
    verifications: int = 0
    rollbacks: int = 0
    accepted_lengths: list = field(default_factory=list)
    verified_drafts: int = 0
    accepted_drafts: int = 0
    batch_sizes: list = field(default_factory=list)
    messages_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    cloud_forwards: int = 0  # target token-forwards the cloud reported
    wasted_forwards: int = 0  # scored drafts that were rejected
    cloud_busy_s: float = 0.0
    trigger_reasons: dict = field(default_factory=dict)
    rejections: int = 0  # verifications that rejected a draft (the rest accepted all they verified)
    # The adaptive schedule (pipesd.edge.schedule): the schedule this generation ran and why.
    schedule: str = ""
    schedule_reason: str = ""
    bonus_tokens: int = 0  # target tokens that came free with a full acceptance (continuation rule)
    bonus_kept: int = 0  # of those, equal to the edge's draft there: its later drafts stood
    hints_sent: int = 0  # drafts sent as hints (no q on the wire: only compared with a bonus)
    tuner: Optional[dict] = None  # the tuner's state and history, when one runs
    tau_seq: float = 0.0
    tau_tok: float = 0.0
    cost_g_s: float = 0.0
    cost_s_s: float = 0.0
    cost_c_s: float = 0.0
    edge_overhead_s: float = 0.0  # compute + send threads' time outside the draft forward, padding, waits and the wire
    # Offline robustness (docs/reliability.md).
    offline_episodes: int = 0  # times the cloud was lost (a failed recovery continues the episode)
    reconnects: int = 0  # new connections made after a loss
    offline_tokens: int = 0  # tokens drafted while offline (unverified when shown)
    offline_s: float = 0.0  # time from each loss to the first verdict after it (or to the end)
    unverified_tokens: int = 0  # tokens of the output still unverified at the end
    # Draft cost and prompt-lookup proposals (pipesd.edge.lookup; the pipelined methods).
    draft_steps: int = 0  # draft-model steps (forwards) in the compute thread
    draft_s: float = 0.0  # their measured time, catch-up of looked-up tokens included, padding excluded
    lookup_hits: int = 0  # lookups that found an earlier occurrence
    lookup_proposals: int = 0  # drafts that were lookup proposals: each a draft forward saved
    lookup_accepted: int = 0  # lookup proposals the cloud accepted
    lookup_rejected: int = 0  # corrections at a lookup proposal
    # lookup "shadow" (the adaptive schedule's measurement, the draft model drafts every token):
    # drafts lookup would have proposed, those the cloud verified (accepted, or the correction or
    # bonus position), and those equal to the target's token there.
    lookup_shadow: int = 0
    lookup_shadow_checked: int = 0
    lookup_shadow_right: int = 0
    tree_sibling_hits: int = 0  # tree rounds (tree-sd) whose accepted path went through a sibling leaf
    # What a draft tree would have rescued (measured in every pipelined / serial run, the adaptive
    # schedule's tree candidates read it): drafts below the tree confidence (0.8), and corrections
    # that were the draft's 2nd (rescued_w2) or 2nd-3rd (rescued_w3) choice at such a position.
    unsure_drafts: int = 0
    rescued_w2: int = 0
    rescued_w3: int = 0

    timeline: list = field(default_factory=list)  # (lane, t0, t1, info) relative to the start

    @property
    def edge_overhead_per_draft_s(self) -> float:
        return self.edge_overhead_s / self.drafted if self.drafted else 0.0

    @property
    def draft_forwards_saved(self) -> int:
        """Draft forwards a lookup proposal replaced (one each)."""
        return self.lookup_proposals

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_drafts / self.verified_drafts if self.verified_drafts else 0.0

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0

    def observe_verdict(self, n_seg: int, accepted: int, forwards: int, busy_s: float) -> None:
        """One verdict for a segment of ``n_seg`` drafts."""
        self.verifications += 1
        self.verified_drafts += n_seg
        self.accepted_drafts += accepted
        self.accepted_lengths.append(accepted)
        self.cloud_forwards += forwards
        self.wasted_forwards += n_seg - accepted
        self.rejections += accepted < n_seg
        self.cloud_busy_s += busy_s

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "timeline"}
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_accepted"] = self.mean_accepted
        d["edge_overhead_per_draft_s"] = self.edge_overhead_per_draft_s
        d["draft_forwards_saved"] = self.draft_forwards_saved
        return d


@dataclass
class Generation:
    """The output. ``token_ids[:unverified_from]`` is exactly the target's; the rest (only when
    the run ended while the cloud was unreachable, offline policy "draft") is the draft's alone.
    ``unverified_from`` is None when everything was verified."""

    text: str
    token_ids: list
    stats: GenerationStats
    prompt_ids: list = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "eos" | "cancelled"
    unverified_from: Optional[int] = None

    @property
    def verified(self) -> bool:
        return self.unverified_from is None

    @property
    def verified_token_ids(self) -> list:
        return self.token_ids if self.unverified_from is None else self.token_ids[: self.unverified_from]
