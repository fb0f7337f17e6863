"""Helpers for the verification / sampling tests: random cases and distribution statistics.

Statistics: for counts ``c`` (n draws) against an exact distribution ``pi``:
* Pearson chi-square over the bins with expected count >= 5 (the rest pooled into one bin),
  p-value from the regularised upper incomplete gamma (``torch.special.gammaincc``);
* total variation ``TV = 0.5 * sum |c/n - pi|``, compared with ``sqrt(V / n)`` — about 2.5x
  the expected TV of an exact sampler (``E[TV] <= 0.4 * sqrt(V / n)``).
A correct sampler must pass both (p > P_MIN, TV < bound); the planted wrong rules must fail.
"""
from __future__ import annotations

import math

import torch

from pipesd.sampling import SamplingParams, draft_distribution

P_MIN = 1e-6  # a correct sampler fails with probability ~1e-6 per check (fixed seeds: deterministic)
P_PLANTED = 1e-9  # a planted bug must be rejected at least this strongly


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts = counts.double().flatten()
    probs = probs.double().flatten()
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = counts[big], exp[big]
    rest_o, rest_e = counts[~big].sum(), exp[~big].sum()
    if rest_e > 0 or rest_o > 0:
        if rest_e <= 0:  # draws where the distribution has (numerically) no mass: certain failure
            return 0.0
        obs_b = torch.cat([obs_b, rest_o[None]])
        exp_b = torch.cat([exp_b, rest_e[None]])
    dof = obs_b.numel() - 1
    if dof < 1:
        return 1.0
    stat = ((obs_b - exp_b) ** 2 / exp_b).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts = counts.double().flatten()
    return float(0.5 * (counts / counts.sum() - probs.double().flatten()).abs().sum())


def tv_bound(V: int, n: int) -> float:
    return math.sqrt(V / n)


def hist(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens.flatten().long(), minlength=V)[:V]


def check(counts, probs, label: str = "") -> tuple[float, float]:
    """Assert a correct-sampler histogram; returns (p-value, TV)."""
    n = int(counts.sum())
    V = probs.numel()
    p, t = chi2_pvalue(counts, probs), tv(counts, probs)
    assert p > P_MIN and t < tv_bound(V, n), f"{label}: chi2 p={p:.3g}, TV={t:.4f} (bound {tv_bound(V, n):.4f}, n={n})"
    return p, t


def fails(counts, probs) -> bool:
    """True when the statistic rejects the histogram (used on planted wrong rules)."""
    n = int(counts.sum())
    return chi2_pvalue(counts, probs) < P_PLANTED or tv(counts, probs) > tv_bound(probs.numel(), n)


# ----------------------------------------------------------------------------- random cases
def rand_params(B: int, V: int, g: torch.Generator, greedy_frac: float = 0.15):
    """Per-request target sampling parameters covering every filter and T = 0."""
    T = torch.tensor([0.5, 0.7, 1.0, 1.3])[torch.randint(0, 4, (B,), generator=g)]
    T = torch.where(torch.rand(B, generator=g) < greedy_frac, torch.zeros(B), T)
    k = torch.tensor([0, 1, 3, 10, V + 5])[torch.randint(0, 5, (B,), generator=g)]
    p = torch.tensor([1.0, 0.95, 0.8, 0.5])[torch.randint(0, 4, (B,), generator=g)]
    mp = torch.tensor([0.0, 0.0, 0.02, 0.1])[torch.randint(0, 4, (B,), generator=g)]
    return T, k, p, mp


def draft_q(target_logits: torch.Tensor, kq: int, g: torch.Generator, noise: float = 0.7, temperature: float = 1.0):
    """A draft's top-kq q close to the target (so drafts are often accepted)."""
    dl = target_logits + noise * torch.randn(target_logits.shape, generator=g)
    return draft_distribution(dl, SamplingParams(temperature=temperature), kq)


def draw_from_q(ids: torch.Tensor, probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flat = probs.reshape(-1, probs.shape[-1]).double()
    pick = torch.multinomial(flat, 1, generator=g).view(probs.shape[:-1])
    return ids.long().gather(-1, pick[..., None]).squeeze(-1)


def chain_case(B: int, K: int, V: int, kq: int, seed: int, dtype=torch.float32, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, K + 1, V, generator=g)
    ids, probs = draft_q(x[:, :K], kq, g)
    draft = draw_from_q(ids, probs, g)
    nd = torch.randint(0, K + 1, (B,), generator=g)
    bonus = torch.rand(B, generator=g) < 0.6
    T, k, p, mp = rand_params(B, V, g)
    return dict(target_logits=x.to(dtype), draft_tokens=draft, num_draft=nd, draft_topk_ids=ids,
                draft_topk_probs=probs, temperature=T, top_k=k, top_p=p, min_p=mp, bonus=bonus)


def random_parents(B: int, N: int, g: torch.Generator) -> torch.Tensor:
    par = torch.full((B, N), -1, dtype=torch.long)
    for i in range(1, N):
        # bias towards recent nodes: deeper trees
        lo = torch.clamp(torch.full((B,), i - 3), min=0)
        par[:, i] = lo + (torch.rand(B, generator=g) * (i - lo)).long()
    return par


def tree_case(B: int, N: int, V: int, kq: int, seed: int, dtype=torch.float32, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, N, V, generator=g)
    ids, probs = draft_q(x, kq, g)
    par = random_parents(B, N, g)
    nn = torch.randint(1, N + 1, (B,), generator=g)
    pq_ids = ids.gather(1, par.clamp(min=0)[..., None].expand(-1, -1, kq))
    pq_probs = probs.gather(1, par.clamp(min=0)[..., None].expand(-1, -1, kq))
    tok = draw_from_q(pq_ids, pq_probs, g)
    tok[:, 0] = 0
    bonus = torch.rand(B, generator=g) < 0.6
    T, k, p, mp = rand_params(B, V, g)
    return dict(target_logits=x.to(dtype), tokens=tok, parents=par, num_nodes=nn, draft_topk_ids=ids,
                draft_topk_probs=probs, temperature=T, top_k=k, top_p=p, min_p=mp, bonus=bonus)


def single_thread():
    """Fixture body: run a test with one intra-op thread and restore the setting afterwards.

    The statistical tests are many small tensor ops; with OpenMP spinning on a 2-core machine
    shared with other processes they run 10-20x slower with 2 threads than with 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
