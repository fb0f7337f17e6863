"""Inputs, baselines and timing shared by ``run_gpu.py`` and ``test_bench_kernels.py``."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from pipesd.sampling import SamplingParams, draft_distribution

NOMINAL_HBM_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def chain_inputs(B: int, K: int, V: int, *, mode: str, device, dtype=torch.bfloat16, accept: float = 0.85,
                 kq: int = 8, seed: int = 0, filters: bool = False) -> dict:
    """A realistic-ish batch: drafts agree with the target most of the time (``accept``)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = (2.0 * torch.randn(B, K + 1, V, generator=g, device=device)).to(dtype)
    nd = torch.full((B,), K, dtype=torch.long, device=device)
    out = dict(target_logits=x, num_draft=nd, mode=mode)
    if mode == "greedy":
        am = x[:, :K].float().argmax(-1)
        flip = torch.rand(B, K, generator=g, device=device) > accept
        out["draft_tokens"] = torch.where(flip, (am + 1) % V, am)
        return out
    dl = x[:, :K].float() + 0.3 * torch.randn(B, K, V, generator=g, device=device)
    ids, probs = draft_distribution(dl, SamplingParams(temperature=1.0), kq)
    del dl
    pick = torch.multinomial(probs.reshape(-1, kq), 1, generator=g).view(B, K)
    out.update(draft_tokens=ids.long().gather(-1, pick[..., None]).squeeze(-1), draft_topk_ids=ids,
               draft_topk_probs=probs, temperature=1.0, seed=seed)
    if filters:
        out.update(top_k=50, top_p=0.9)
    return out


def tree_inputs(B: int, N: int, V: int, *, mode: str, device, dtype=torch.bfloat16, kq: int = 8, seed: int = 0) -> dict:
    """Binary-ish trees of ``N`` nodes (node i's parent (i-1)//2), tokens drawn from the parent's q."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = (2.0 * torch.randn(B, N, V, generator=g, device=device)).to(dtype)
    par = torch.tensor([-1] + [(i - 1) // 2 for i in range(1, N)], device=device).expand(B, N).contiguous()
    dl = x.float() + 0.3 * torch.randn(B, N, V, generator=g, device=device)
    ids, probs = draft_distribution(dl, SamplingParams(temperature=1.0), kq)
    del dl
    pc = par.clamp(min=0)
    qi = ids.gather(1, pc[..., None].expand(-1, -1, kq))
    qp = probs.gather(1, pc[..., None].expand(-1, -1, kq))
    pick = torch.multinomial(qp.reshape(-1, kq), 1, generator=g).view(B, N)
    tok = qi.long().gather(-1, pick[..., None]).squeeze(-1)
    if mode == "greedy":
        am = x.float().argmax(-1)
        tok = am.gather(1, pc)
    tok[:, 0] = 0
    out = dict(target_logits=x, tokens=tok, parents=par, num_nodes=None, mode=mode)
    if mode == "sample":
        out.update(draft_topk_ids=ids, draft_topk_probs=probs, temperature=1.0, seed=seed)
    return out


def torch_sampling_chain(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The usual eager pipeline (HF-style): /T, top-k, sort + cumsum top-p, softmax, multinomial."""
    x = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, si = torch.sort(x, dim=-1, descending=True)
        sp = torch.softmax(sx, -1)
        drop = (sp.cumsum(-1) - sp) >= top_p
        x = x.scatter(-1, si, sx.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(x, -1), 1, generator=generator).squeeze(-1)


def read_floor_ms(x: torch.Tensor, device) -> float:
    """Time to read ``x`` once with a plain reduction: the practical floor for any verifier."""
    return time_ms(lambda: torch.amax(x), device, iters=20, warmup=3)
