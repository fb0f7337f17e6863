"""Sampling parameters and the one definition of "the distribution we sample from".

Lossless speculative sampling needs the draft's q and the target's p to be *exactly* the
distributions the tokens were drawn from, after temperature / top-k / top-p / min-p. Every
part of PipeSD (draft step, cloud verification, the Triton kernels' reference) computes
them with :func:`filtered_probs`, so there is one definition to test.

Filtering order (as in HF transformers / vLLM): temperature, then top-k, then top-p (keep the
smallest set of most probable tokens whose mass reaches ``top_p``, always at least one),
then min-p (drop tokens below ``min_p * max_prob``), then renormalise. Ties at the top-k
boundary keep every tied token (deterministic, order independent).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["SamplingParams", "filtered_probs", "draft_distribution"]


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (0.0 <= float(self.min_p) < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def filtered_probs(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Probabilities (fp32, rows sum to 1) after temperature/top-k/top-p/min-p.

    ``logits`` is ``[..., V]``; parameters are scalars or tensors broadcastable to the
    leading dims. ``temperature == 0`` rows give a one-hot on the argmax (lowest index on ties).
    """
    x = logits.float()
    lead = x.shape[:-1]
    V = x.shape[-1]

    def _param(v, dtype):
        t = torch.as_tensor(v, dtype=dtype, device=x.device)
        return t.expand(lead).unsqueeze(-1) if t.dim() <= len(lead) else t

    temp = _param(temperature, torch.float32)
    greedy = temp <= 0
    x = x / torch.where(greedy, torch.ones_like(temp), temp)
    probs = torch.softmax(x, dim=-1)

    k = _param(top_k, torch.int64)
    p = _param(top_p, torch.float32)
    mp = _param(min_p, torch.float32)
    need_sort = bool(((k > 0) & (k < V)).any()) or bool((p < 1).any())
    if need_sort:
        sorted_p, _ = torch.sort(probs, dim=-1, descending=True)
        keep = torch.ones_like(probs, dtype=torch.bool)
        kk = torch.where((k > 0) & (k < V), k, torch.full_like(k, V))
        kth = torch.gather(sorted_p, -1, kk - 1)  # k-th largest probability
        keep &= probs >= kth
        # top-p over the top-k-filtered, renormalised distribution
        sorted_kept = torch.where(sorted_p >= kth, sorted_p, torch.zeros_like(sorted_p))
        sorted_kept = sorted_kept / sorted_kept.sum(-1, keepdim=True)
        cum_before = torch.cumsum(sorted_kept, -1) - sorted_kept  # mass strictly before each rank
        in_nucleus = cum_before < p  # always true for rank 0
        # threshold = smallest probability inside the nucleus (ties at the edge are kept).
        # Compared on the raw (un-renormalised) values: sort moves values bit-exactly, whereas
        # renormalising both sides with sums taken in different orders could drop the
        # threshold token itself (and leave an all-zero, NaN row).
        thr = torch.where(in_nucleus, sorted_p, torch.full_like(sorted_p, float("inf"))).amin(-1, keepdim=True)
        keep &= probs >= thr
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    if bool((mp > 0).any()):
        mx = probs.amax(-1, keepdim=True)
        probs = torch.where(probs >= mp * mx, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs)
        onehot.scatter_(-1, torch.argmax(logits.float(), dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy, onehot, probs)
    return probs


def draft_distribution(
    logits: torch.Tensor, params: SamplingParams, wire_topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``wire_topk`` truncated, renormalised q the draft samples from.

    Returns ``(ids[..., k], probs[..., k])`` sorted by probability (descending). The draft
    must draw its token from exactly this (ids, probs) pair, and send exactly it on the wire:
    then the cloud knows q exactly and rejection sampling stays lossless.
    """
    if wire_topk < 1:
        raise ValueError(f"wire_topk must be >= 1, got {wire_topk}")
    probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    k = min(wire_topk, probs.shape[-1])
    top_probs, top_ids = torch.topk(probs, k, dim=-1, sorted=True)
    top_probs = top_probs / top_probs.sum(-1, keepdim=True)
    return top_ids.to(torch.int32), top_probs.to(torch.float32)
