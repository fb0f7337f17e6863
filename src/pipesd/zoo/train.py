"""Train the bundled draft/target pair from scratch, offline, on the Python standard library.

    python -m pipesd.zoo.train --out DIR [--target-steps N] [--draft-steps N] [--seed S]

1. Corpus: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (tests, IDLE, lib2to3,
   tkinter and site-packages excluded), sorted by path; a file goes to the held-out split when
   ``sha1(relative path) % 20 == 0``. Files are joined with the EOS token.
2. Tokenizer: byte-level BPE (``tokenizers``), 4096 tokens, EOS ``<|endoftext|>``.
3. Target: a Llama-shaped model trained with AdamW, warmup then cosine decay.
4. Draft: a much smaller Llama distilled from the target (KL to the target's distribution
   plus a little cross-entropy), which is what makes the draft agree with the target.
5. Held-out metrics (perplexities, greedy agreement) go to ``metrics.json`` and the model card.

Seeded and deterministic for a given Python version's stdlib (CPU, ``torch.use_deterministic_algorithms``
is not needed: the CPU kernels used here are deterministic for a fixed thread count).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
EXCLUDE = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip"}

TARGET_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=3)
DRAFT_SHAPE = dict(hidden_size=80, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


def corpus_files() -> tuple[list[Path], list[Path], Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & EXCLUDE))
    train, held = [], []
    for p in files:
        h = int(hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest(), 16)
        (held if h % 20 == 0 else train).append(p)
    return train, held, root


def read_texts(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def build_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=EOS)
    tok.save_pretrained(out)
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    flat = []
    for x in ids:
        flat.extend(x)
        flat.append(eos)
    return np.asarray(flat, dtype=np.int32)


def make_model(shape: dict, vocab: int, eos: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(1024, 4 * seq_len), tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=eos, pad_token_id=eos, rope_theta=10000.0, **shape)
    return LlamaForCausalLM(cfg)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def batches(data: np.ndarray, batch: int, seq_len: int, gen: torch.Generator):
    n = len(data) - seq_len - 1
    d = torch.from_numpy(data.astype(np.int64))
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        yield d[idx]


def _progress(name: str, step: int, total: int, loss: float, t0: float, tokens: int) -> None:
    el = time.perf_counter() - t0
    eta = el / max(1, step) * (total - step)
    print(f"[{name}] step {step}/{total} loss {loss:.3f} {tokens / max(el, 1e-9):,.0f} tok/s "
          f"elapsed {el / 60:.1f} min eta {eta / 60:.1f} min", flush=True)


def train_target(model, data, steps, batch, seq_len, lr, seed, log_every=25):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    it = batches(data, batch, seq_len, gen)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        x = next(it)
        logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            _progress("target", step + 1, steps, loss.item(), t0, (step + 1) * batch * seq_len)
    model.eval()
    return model


def distill_draft(draft, target, data, steps, batch, seq_len, lr, seed, ce_weight=0.2, log_every=25):
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    it = batches(data, batch, seq_len, gen)
    draft.train()
    target.eval()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        x = next(it)
        with torch.no_grad():
            t_logp = F.log_softmax(target(x[:, :-1]).logits.float(), -1)
        d_logits = draft(x[:, :-1]).logits
        d_logp = F.log_softmax(d_logits, -1)
        kl = F.kl_div(d_logp.reshape(-1, d_logp.shape[-1]), t_logp.reshape(-1, t_logp.shape[-1]),
                      log_target=True, reduction="batchmean")
        ce = F.cross_entropy(d_logits.reshape(-1, d_logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = kl + ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            _progress("draft", step + 1, steps, loss.item(), t0, (step + 1) * batch * seq_len)
    draft.eval()
    return draft


@torch.inference_mode()
def evaluate(draft, target, data: np.ndarray, seq_len: int = 256, n_windows: int = 24, seed: int = 123) -> dict:
    """Held-out perplexities and greedy agreement (draft argmax == target argmax, per position)."""
    gen = torch.Generator().manual_seed(seed)
    x = next(batches(data, n_windows, seq_len, gen))
    inp, lab = x[:, :-1], x[:, 1:]
    tl = target(inp).logits.float()
    dl = draft(inp).logits.float()
    t_ppl = math.exp(F.cross_entropy(tl.reshape(-1, tl.shape[-1]), lab.reshape(-1)).item())
    d_ppl = math.exp(F.cross_entropy(dl.reshape(-1, dl.shape[-1]), lab.reshape(-1)).item())
    agree = (tl.argmax(-1) == dl.argmax(-1)).float().mean().item()
    # Expected acceptance of a sampled draft at T=1: sum_x min(p, q).
    acc_t1 = torch.minimum(tl.softmax(-1), dl.softmax(-1)).sum(-1).mean().item()
    return {"target_ppl": t_ppl, "draft_ppl": d_ppl, "greedy_agreement": agree, "sampled_acceptance_t1": acc_t1,
            "eval_positions": int(lab.numel())}


def model_card(m: dict) -> str:
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    return f"""# stdlib-code: the bundled PipeSD draft/target pair

Trained from scratch by `python -m pipesd.zoo.train` (seed {m['seed']}, Python {m['python']} stdlib, one CPU
thread, {m['train_minutes']:.1f} min). License: Apache-2.0 (weights); training data: the Python standard
library source (PSF license). Code-completion toy models: useful to exercise and measure speculative
decoding offline, not for real use.

| | target | draft |
|---|---|---|
| shape | {TARGET_SHAPE} | {DRAFT_SHAPE} |
| parameters | {m['target_params']:,} | {m['draft_params']:,} |
| held-out perplexity | {m['target_ppl']:.2f} | {m['draft_ppl']:.2f} |

Tokenizer: byte-level BPE, {m['vocab']} tokens, EOS `{EOS}`. Training tokens: {m['train_tokens']:,};
held-out tokens: {m['held_out_tokens']:,} (files whose path hash is 0 mod 20).
Target steps {m['target_steps']}, draft steps {m['draft_steps']} (distilled: KL to the target + 0.2 CE),
batch {m['batch']} x {m['seq_len']} tokens, AdamW, warmup + cosine decay.

Held-out measurements ({m['eval_positions']:,} positions):
- greedy agreement (draft argmax == target argmax): **{m['greedy_agreement']:.3f}**
- expected acceptance of a sampled draft at T=1 (sum min(p, q)): {m['sampled_acceptance_t1']:.3f}

Quality bars: target >= 5x draft parameters: {ok(m['param_ratio'] >= 5)} ({m['param_ratio']:.2f}x); agreement >= 0.5:
{ok(m['greedy_agreement'] >= 0.5)}; target perplexity below the draft's: {ok(m['target_ppl'] < m['draft_ppl'])}.
Weights are stored as fp16 safetensors and load as fp32.
"""


def heldout_sample(held_texts: list[str], chars: int = 8000) -> str:
    """A fixed slice of held-out text shipped with the pair, for the agreement test."""
    return "\n".join(held_texts)[:chars]


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def save_model(model, path: Path, dtype=torch.float16) -> None:
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "pairs" / "stdlib-code"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target-steps", type=int, default=1600)
    ap.add_argument("--draft-steps", type=int, default=900)
    ap.add_argument("--target-lr", type=float, default=3e-3)
    ap.add_argument("--draft-lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-train-mb", type=float, default=6.0, help="cap on training text (MB), for time")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    train_files, held_files, root = corpus_files()
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    # Deterministic cap: keep files in sorted order until the budget is reached.
    budget, kept = int(args.max_train_mb * 1e6), []
    for t in train_texts:
        if budget <= 0:
            break
        kept.append(t)
        budget -= len(t)
    print(f"corpus: {len(kept)} training files ({sum(map(len, kept)) / 1e6:.1f} MB), {len(held_texts)} held-out "
          f"files, from {root} (Python {sys.version.split()[0]})", flush=True)
    tok = build_tokenizer(kept, args.vocab, out / "tokenizer")
    train_ids, held_ids = encode(tok, kept), encode(tok, held_texts)
    print(f"tokenizer: {len(tok)} tokens; {len(train_ids):,} training / {len(held_ids):,} held-out tokens", flush=True)

    target = make_model(TARGET_SHAPE, len(tok), tok.eos_token_id, args.seq_len)
    draft = make_model(DRAFT_SHAPE, len(tok), tok.eos_token_id, args.seq_len)
    print(f"target {n_params(target) / 1e6:.2f} M params, draft {n_params(draft) / 1e6:.2f} M params", flush=True)
    train_target(target, train_ids, args.target_steps, args.batch, args.seq_len, args.target_lr, args.seed)
    distill_draft(draft, target, train_ids, args.draft_steps, args.batch, args.seq_len, args.draft_lr, args.seed)
    metrics = evaluate(draft, target, held_ids)
    metrics.update(target_params=n_params(target), draft_params=n_params(draft),
                   param_ratio=n_params(target) / n_params(draft), vocab=len(tok),
                   train_tokens=int(len(train_ids)), held_out_tokens=int(len(held_ids)),
                   python=sys.version.split()[0], seed=args.seed, target_steps=args.target_steps,
                   draft_steps=args.draft_steps, batch=args.batch, seq_len=args.seq_len,
                   train_minutes=(time.perf_counter() - t_all) / 60)
    save_model(target, out / "target")
    save_model(draft, out / "draft")
    for sub in ("target", "draft"):
        tok.save_pretrained(out / sub)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "HELDOUT_SAMPLE.py").write_text(heldout_sample(held_texts))
    (out / "MODEL_CARD.md").write_text(model_card(metrics))
    print(json.dumps(metrics, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
