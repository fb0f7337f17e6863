"""Tiny model pairs and a server fixture for the runtime tests.

The pair is built in-process from random weights: the target is a small Llama, the draft is
the same network with noise added to its weights, so acceptance is high but imperfect and
every run has both accepted runs and rollbacks.
"""
from __future__ import annotations

import contextlib
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipesd.cloud import CloudConfig, CloudServer
from pipesd.models import DraftModel, TargetModel


def tiny_llama(vocab: int = 48, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the default init: more structure
        m.lm_head.weight.mul_(6.0)
    return m


def noisy_copy(model: LlamaForCausalLM, scale: float, seed: int = 1) -> LlamaForCausalLM:
    draft = LlamaForCausalLM(model.config).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return draft


def tiny_pair(vocab: int = 48, noise: float = 0.35, seed: int = 0, wire_topk: int = 8):
    target_m = tiny_llama(vocab, seed)
    draft_m = noisy_copy(target_m, noise, seed + 1)
    return DraftModel(draft_m, wire_topk=wire_topk), TargetModel(target_m), target_m


@torch.inference_mode()
def reference_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy decoding by full recomputation (no KV cache: independent of ours)."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        t = int(torch.argmax(logits))
        out.append(t)
        ids.append(t)
    return out


@contextlib.contextmanager
def running_server(target, **cfg):
    server = CloudServer(target, CloudConfig(port=0, **cfg))
    host, port = server.start_in_thread()
    try:
        yield server, f"{host}:{port}"
    finally:
        server.stop()


def wait_until(cond, timeout_s: float = 10.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout_s`` passes (False): a deadline, not a measurement."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
