"""KV-cache helpers over transformers' ``DynamicCache``, across its 4.x and 5.x APIs (used by
:mod:`pipesd.models.runners`)."""
from __future__ import annotations

import torch


def _cache_kwarg(model) -> str:
    """transformers 5.x calls the KV cache argument ``cache``; 4.x ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_cache(kvs=None):
    from transformers import DynamicCache

    if kvs is None:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=kvs)


def _cache_len(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def _cache_kvs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56 / 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older 4.x


def _crop(cache, length: int):
    """Keep the first ``length`` cached positions (``None`` for an empty cache)."""
    n = _cache_len(cache)
    if length <= 0:
        return None
    if length < n:
        cache.crop(-(n - length))  # negative: remove that many (transformers 4.4x and 5.x alike)
    return cache
