"""Counter-based randomness shared by the PyTorch reference and the Triton kernels.

Every random number PipeSD's verifier uses is ``philox_uniform(seed_b, c0, c1)``: the first
32-bit word of Philox4x32-10 with key ``(seed_b & 0xffffffff, seed_b >> 32)`` and counter
``(c0, c1, 0, 0)``, mapped to ``((x >> 8) + 0.5) * 2**-24`` (a float32 in (0, 1), exactly
representable). The kernels (``pipesd.kernels.rowops.philox_uniform``) compute the same bits,
so both backends make the same draws for the same seeds, on any device.

Counters: ``c0`` = tree node index (chain: draft ``j`` is node ``j + 1``, row ``j`` is node
``j``), ``c1`` = the named stream below, defined here once and imported by the kernels
(``pipesd.kernels.rowops`` wraps them as ``tl.constexpr``):

* ``STREAM_ACCEPT`` (0): the acceptance test of node ``c0`` (a child, against its parent's row);
* ``STREAM_DRAW`` (1): the one draw (correction, residual or bonus token) made at node ``c0``;
  ``sample()`` row ``b`` uses ``(0, STREAM_DRAW)``.

``_STREAM_DERIVE`` is used only to derive per-request seeds from an int seed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["philox4x32", "philox_uniform", "request_seeds", "STREAM_ACCEPT", "STREAM_DRAW"]

STREAM_ACCEPT = 0  # acceptance test of a node
STREAM_DRAW = 1  # the draw made at a node (and sample()'s draw)
_STREAM_DERIVE = 0xFFFFFFFF  # counter word used only to derive per-request seeds from an int seed

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF
_SEED_MAX = 2**63 - 1


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * m`` for uint32 values held in int64 (no overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = a_hi * m  # < 2**48
    p_lo = a_lo * m  # < 2**48
    mid = p_hi + (p_lo >> 16)  # < 2**49
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi & _MASK, lo & _MASK


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (broadcasting)."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) & _MASK for v in (c0, c1, c2, c3, k0, k1))
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform(seeds: torch.Tensor, c0, c1) -> torch.Tensor:
    """float32 uniforms in (0, 1): first Philox word for key ``seeds`` and counter ``(c0, c1, 0, 0)``."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    dev = seeds.device
    c0 = torch.as_tensor(c0, dtype=torch.int64, device=dev)
    c1 = torch.as_tensor(c1, dtype=torch.int64, device=dev)
    x0, _, _, _ = philox4x32(c0, c1, 0, 0, seeds & _MASK, (seeds >> 32) & _MASK)
    return ((x0 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def request_seeds(
    batch: int,
    seed: Union[int, torch.Tensor, None],
    generator: Optional[torch.Generator],
    device: torch.device,
    arg: str = "seed",
) -> torch.Tensor:
    """Per-request 63-bit seeds ``[B]`` (int64) on ``device``.

    * ``seed`` a ``[B]`` integer tensor: used as is (request ``b``'s draws depend only on
      ``seed[b]``, so batched == one-at-a-time with the same per-request seeds);
    * ``seed`` an int: request ``b`` gets ``philox((b, 0xffffffff), key=seed)`` (63 bits);
    * ``generator``: ``B`` seeds drawn from it (advances it);
    * neither: ``B`` seeds drawn from torch's global generator (``torch.manual_seed`` applies).
    """
    if seed is not None and generator is not None:
        raise ValueError(f"{arg}: pass either seed or generator, not both")
    if isinstance(seed, torch.Tensor):
        if seed.dim() == 0:
            seed = int(seed.item())
        else:
            if seed.shape != (batch,) or seed.dtype.is_floating_point or seed.dtype == torch.bool:
                raise ValueError(f"{arg}: a seed tensor must be an integer tensor of shape [{batch}], "
                                 f"got {tuple(seed.shape)} {seed.dtype}")
            s = seed.to(device=device, dtype=torch.int64)
            if bool((s < 0).any()):
                raise ValueError(f"{arg}: seeds must be >= 0")
            return s
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed <= _SEED_MAX):
            raise ValueError(f"{arg}: must be an int in [0, 2**63), a [B] tensor, or None; got {seed!r}")
        b = torch.arange(batch, dtype=torch.int64)
        key = torch.tensor(seed, dtype=torch.int64)
        x0, x1, _, _ = philox4x32(b, _STREAM_DERIVE, 0, 0, key & _MASK, (key >> 32) & _MASK)
        return (((x1 & 0x7FFFFFFF) << 32) | x0).to(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: must be a torch.Generator, got {type(generator).__name__}")
        return torch.randint(0, _SEED_MAX, (batch,), generator=generator,
                             device=generator.device, dtype=torch.int64).to(device)
    return torch.randint(0, _SEED_MAX, (batch,), dtype=torch.int64).to(device)
