"""Train the bundled draft/target pair from scratch, offline, on the Python standard library.

    python -m pipesd.zoo.train [--out DIR] [--minutes N] [--seed S] [--threads T] [--resume]

Recipe (every step seeded; same Python stdlib, torch version and thread count => same weights):

1. Corpus: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (tests, IDLE, lib2to3,
   tkinter, turtledemo, ensurepip, site-packages, the codec tables in ``encodings/`` and
   ``pydoc_data/`` excluded), sorted by path; a file is held out when
   ``sha1(relative path) % 20 == 0``. Files are joined with the EOS token.
2. Tokenizer: byte-level BPE (``tokenizers``) trained on the training files, 1024 tokens, EOS
   ``<|endoftext|>``; saved so ``AutoTokenizer.from_pretrained(dir)`` loads it.
3. Phase 1, joint training: the target (Llama, 4 layers x 192, untied embeddings) learns by
   cross-entropy while the draft (Llama, 3 layers x 96, tied) learns *from the target's current
   logits* in the same step (forward KL to the target's distribution + 0.1 x cross-entropy):
   online distillation, so the target's forward pass is paid once. AdamW, linear warmup then
   cosine decay to 10%; bf16 autocast for the forward passes (``--no-amp``: fp32).
4. Phase 2, draft-only distillation against the final (frozen) target: the draft catches up
   with where the target ended. Its own warmup + cosine schedule; the loss adds 0.5 x
   cross-entropy to the target's argmax (greedy agreement +2 points, sampled acceptance -1.7).
5. Held-out metrics (perplexities, greedy agreement, expected sampled acceptance, CPU timings of
   the runners) are measured on the *saved* fp16 weights and go to ``metrics.json`` and
   ``MODEL_CARD.md``; ``heldout_sample.txt`` (held-out text) ships for the agreement test.

Batches are a pure function of (seed, step), and a checkpoint is written every
``--ckpt-every`` steps to ``<out>/_ckpt.pt`` (removed on success): ``--resume`` continues an
interrupted run and gives the same result. ``--minutes N`` scales both phases' step counts by
``N / DEFAULT_MINUTES`` (a deterministic function of N, not of the machine's speed).
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
EXCLUDE = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip",
           "encodings", "pydoc_data"}  # encodings: codec tables; pydoc_data: one 0.75 MB string of prose

# The target's input and output embeddings are separate (as in Llama-3-8B), the draft's tied (as in
# Llama-3.2-1B): the draft spends its parameters on layers.
TARGET_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=3, tie_word_embeddings=False)
DRAFT_SHAPE = dict(hidden_size=96, intermediate_size=224, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)
DEFAULT_MINUTES = 30.0  # what the default schedule was sized for (2 CPU cores, shared)
JOINT_STEPS = 3200
DRAFT_STEPS = 2400


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

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(2048, 4 * seq_len), bos_token_id=None,
                      eos_token_id=eos, pad_token_id=eos, rope_theta=10000.0, **{"tie_word_embeddings": True, **shape})
    return LlamaForCausalLM(cfg)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_at(data: torch.Tensor, step: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """The training windows of one step: a pure function of (seed, step) (resumable)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    return data[starts[:, None] + torch.arange(seq_len + 1)[None, :]]


def _kl(d_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(target || draft) per position, averaged."""
    V = d_logits.shape[-1]
    return F.kl_div(F.log_softmax(d_logits.float(), -1).reshape(-1, V), F.log_softmax(t_logits.float(), -1).reshape(-1, V),
                    log_target=True, reduction="batchmean")


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def _autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(getattr(args, "amp", False)))


class _Stopped(Exception):
    pass


class _Progress:
    def __init__(self, name: str, total: int, start: int, tokens_per_step: int) -> None:
        self.name, self.total, self.start, self.tps = name, total, start, tokens_per_step
        self.t0 = time.perf_counter()

    def __call__(self, step: int, **losses: float) -> None:
        done = step + 1 - self.start
        el = time.perf_counter() - self.t0
        eta = el / max(1, done) * (self.total - step - 1)
        ls = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
        print(f"[{self.name}] step {step + 1}/{self.total} {ls} {done * self.tps / max(el, 1e-9):,.0f} tok/s "
              f"elapsed {el / 60:.1f} min eta {eta / 60:.1f} min", flush=True)


def _save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(target, draft, data: torch.Tensor, args, ckpt: Path, state: dict | None) -> None:
    """Phase 1 (joint: target CE + online distillation of the draft), then phase 2 (draft only)."""
    opt_t = torch.optim.AdamW(target.parameters(), lr=args.target_lr, betas=(0.9, 0.95), weight_decay=0.1)
    opt_d = torch.optim.AdamW(draft.parameters(), lr=args.draft_lr, betas=(0.9, 0.95), weight_decay=0.05)
    phase, start = 1, 0
    if state is not None:
        target.load_state_dict(state["target"])
        draft.load_state_dict(state["draft"])
        opt_t.load_state_dict(state["opt_t"])
        opt_d.load_state_dict(state["opt_d"])
        phase, start = state["phase"], state["step"]
        print(f"resumed at phase {phase} step {start}", flush=True)

    def checkpoint(ph: int, step: int) -> None:
        _save_ckpt(ckpt, target=target.state_dict(), draft=draft.state_dict(), opt_t=opt_t.state_dict(),
                   opt_d=opt_d.state_dict(), phase=ph, step=step)

    tps = args.batch * args.seq_len
    done = [0]

    def tick(ph: int, next_step: int) -> None:  # the --stop-after test hook (simulates an interrupted run)
        done[0] += 1
        if args.stop_after and done[0] >= args.stop_after:
            checkpoint(ph, next_step)
            raise _Stopped(done[0])
    if phase == 1:
        n = args.joint_steps
        prog = _Progress("joint", n, start, tps)
        target.train()
        draft.train()
        for step in range(start, n):
            for g in opt_t.param_groups:
                g["lr"] = lr_at(step, n, args.target_lr, max(1, n // 20))
            for g in opt_d.param_groups:
                g["lr"] = lr_at(step, n, args.draft_lr, max(1, n // 20))
            x = batch_at(data, step, args.batch, args.seq_len, args.seed)
            inp, lab = x[:, :-1], x[:, 1:]
            with _autocast(args):
                t_logits = target(inp).logits
                d_logits = draft(inp).logits
            loss_t = _ce(t_logits, lab)
            kl, ce_d = _kl(d_logits, t_logits.detach()), _ce(d_logits, lab)
            loss_d = kl + args.ce_weight * ce_d
            opt_t.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            (loss_t + loss_d).backward()  # disjoint parameters: the same as two backward passes
            torch.nn.utils.clip_grad_norm_(target.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            opt_t.step()
            opt_d.step()
            if step % args.log_every == 0 or step == n - 1:
                prog(step, target_ce=loss_t.item(), draft_ce=ce_d.item(), kl=kl.item())
            if (step + 1) % args.ckpt_every == 0 and step + 1 < n:
                checkpoint(1, step + 1)
            if step + 1 < n:
                tick(1, step + 1)
        phase, start = 2, 0
        # Fresh optimiser state for the draft-only phase (its own schedule).
        opt_d = torch.optim.AdamW(draft.parameters(), lr=args.draft2_lr, betas=(0.9, 0.95), weight_decay=0.05)
        checkpoint(2, 0)
    n = args.draft_steps
    target.eval()
    draft.train()
    prog = _Progress("draft", n, start, tps)
    for step in range(start, n):
        for g in opt_d.param_groups:
            g["lr"] = lr_at(step, n, args.draft2_lr, max(1, n // 20))
        x = batch_at(data, 10_000_000 + step, args.batch, args.seq_len, args.seed)
        inp, lab = x[:, :-1], x[:, 1:]
        with torch.no_grad(), _autocast(args):
            t_logits = target(inp).logits
        with _autocast(args):
            d_logits = draft(inp).logits
        kl, ce_d = _kl(d_logits, t_logits), _ce(d_logits, lab)
        loss = kl + args.ce_weight * ce_d
        if args.hard_weight:  # cross-entropy to the target's argmax: aims at greedy agreement directly
            loss = loss + args.hard_weight * _ce(d_logits, t_logits.argmax(-1))
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt_d.step()
        if step % args.log_every == 0 or step == n - 1:
            prog(step, draft_ce=ce_d.item(), kl=kl.item())
        if (step + 1) % args.ckpt_every == 0 and step + 1 < n:
            checkpoint(2, step + 1)
        if step + 1 < n:
            tick(2, step + 1)
    target.eval()
    draft.eval()


@torch.inference_mode()
def evaluate(draft, target, data: np.ndarray, seq_len: int = 256, n_windows: int = 32, seed: int = 123) -> dict:
    """Held-out perplexities and greedy agreement (draft argmax == target argmax, per position)."""
    x = batch_at(torch.from_numpy(data.astype(np.int64)), 0, n_windows, seq_len, seed)
    inp, lab = x[:, :-1], x[:, 1:]
    tl = target(inp).logits.float()
    dl = draft(inp).logits.float()
    t_ppl = math.exp(_ce(tl, lab).item())
    d_ppl = math.exp(_ce(dl, lab).item())
    agree = (tl.argmax(-1) == dl.argmax(-1)).float().mean().item()
    # Expected acceptance of a sampled draft at T=1: sum_x min(p, q).
    acc_t1 = torch.minimum(tl.softmax(-1), dl.softmax(-1)).sum(-1).mean().item()
    t_top1 = (tl.argmax(-1) == lab).float().mean().item()
    d_top1 = (dl.argmax(-1) == lab).float().mean().item()
    return {"target_ppl": t_ppl, "draft_ppl": d_ppl, "greedy_agreement": agree, "sampled_acceptance_t1": acc_t1,
            "target_top1_accuracy": t_top1, "draft_top1_accuracy": d_top1, "eval_positions": int(lab.numel())}


def time_runners(pair_dir: Path, prompt: list[int], reps: int = 30) -> dict:
    """Per-call CPU times in ms with one torch thread: a draft step, and target scoring of 1 and 8
    tokens after the cached ``prompt`` (:func:`pipesd.checkpair.measure_costs`)."""
    from pipesd.checkpair import measure_costs
    from pipesd.models import DraftModel, TargetModel

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = DraftModel.from_pretrained(pair_dir / "draft")
        t = TargetModel.from_pretrained(pair_dir / "target")
        c = measure_costs(d, t, prompt, reps)
    finally:
        torch.set_num_threads(old)
    return {"draft_step_ms": c["draft_step_s"] * 1e3, "target_score_1_ms": c["target_score_1_s"] * 1e3,
            "target_score_8_ms": c["target_score_8_s"] * 1e3, "timing_context_tokens": c["context_tokens"]}


def model_card(m: dict) -> str:
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    prec = "bf16 autocast forward passes (fp32 weights, optimiser and losses)" if m.get("amp") else "fp32 training"
    return f"""# stdlib-code: the bundled PipeSD draft/target pair

Trained from scratch by `python -m pipesd.zoo.train --seed {m['seed']} --threads {m['threads']}` on the
Python {m['python']} standard library ({m['train_minutes']:.1f} min on this machine's CPU). License of the
weights: Apache-2.0; training data: the Python standard library source (PSF license). Toy code-completion
models: they exist to exercise and measure speculative decoding offline, not for real use.

| | target | draft |
|---|---|---|
| shape (Llama) | {m['target_shape']} | {m['draft_shape']} |
| parameters | {m['target_params']:,} | {m['draft_params']:,} |
| file size (fp16 safetensors) | {m['target_mb']:.2f} MB | {m['draft_mb']:.2f} MB |
| held-out perplexity (per token) | {m['target_ppl']:.2f} | {m['draft_ppl']:.2f} |
| held-out top-1 next-token accuracy | {m['target_top1_accuracy']:.3f} | {m['draft_top1_accuracy']:.3f} |

Tokenizer: byte-level BPE, {m['vocab']} tokens, EOS `{EOS}` (no BOS). Training tokens: {m['train_tokens']:,};
held-out tokens: {m['held_out_tokens']:,} (files whose path's sha1 is 0 mod 20; {m['held_out_files']} files).

Training: phase 1, {m['joint_steps']} joint steps (target cross-entropy; draft distilled online from the
target's logits: KL(target || draft) + {m['ce_weight']} x CE), then phase 2, {m['draft_steps']} draft-only
distillation steps against the final target (the same loss + {m.get('hard_weight', 0)} x cross-entropy to the target's
argmax). Batch {m['batch']} x {m['seq_len']} tokens, AdamW
(betas 0.9/0.95), 5% linear warmup then cosine decay to 10%, peak learning rates target {m['target_lr']},
draft {m['draft_lr']} / {m['draft2_lr']}, gradient clipping 1.0, {prec}. Corpus: the stdlib's `*.py` files without tests, IDLE, tkinter, lib2to3,
turtledemo, ensurepip, the codec tables (`encodings/`) and `pydoc_data/` (one large string of prose).

Held-out measurements on the saved weights ({m['eval_positions']:,} positions, {m['eval_positions'] // 256} windows of 256 tokens):
- greedy agreement (draft argmax == target argmax, per position): **{m['greedy_agreement']:.3f}**
- expected acceptance of a sampled draft at T=1 (mean over positions of sum_x min(p, q)): {m['sampled_acceptance_t1']:.3f}

CPU cost, one torch thread, {m['timing_context_tokens']}-token context, fp32 (`pipesd.models` runners):
draft step {m['draft_step_ms']:.2f} ms; target scoring 1 token {m['target_score_1_ms']:.2f} ms, 8 tokens
{m['target_score_8_ms']:.2f} ms.

Quality bars: target >= 5x draft parameters: {ok(m['param_ratio'] >= 5)} ({m['param_ratio']:.2f}x);
greedy agreement >= 0.5: {ok(m['greedy_agreement'] >= 0.5)}; target perplexity below the draft's:
{ok(m['target_ppl'] < m['draft_ppl'])}. Weights are stored as fp16 safetensors and load as fp32.
Reproduce: `python -m pipesd.zoo.train --out DIR --seed {m['seed']} --threads {m['threads']}` (identical weights need
the same Python stdlib, torch version and thread count).
"""


def heldout_sample(held_texts: list[str], per_file: int = 1000, chars: int = 20000) -> str:
    """Held-out text shipped with the pair for the agreement test: from every held-out file, about
    ``per_file`` characters of whole lines starting a third of the way in (code, not only headers)."""
    parts = []
    for t in held_texts:
        start = t.find("\n", len(t) // 3) + 1
        end = t.find("\n", start + per_file)
        parts.append(t[start:end if end > 0 else len(t)])
    return "\n".join(p for p in parts if p.strip())[:chars]


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def save_model(model, path: Path, dtype=torch.float16) -> None:
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "pairs" / "stdlib-code"))
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"scale the schedule: steps x N/{DEFAULT_MINUTES:g} (default schedule: ~{DEFAULT_MINUTES:g} min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/_ckpt.pt")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--no-amp", dest="amp", action="store_false",
                    help="train in fp32 (default: bf16 autocast for the forward passes, fp32 weights and losses)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--joint-steps", type=int, default=JOINT_STEPS)
    ap.add_argument("--draft-steps", type=int, default=DRAFT_STEPS)
    ap.add_argument("--target-lr", type=float, default=3e-3)
    ap.add_argument("--draft-lr", type=float, default=3e-3)
    ap.add_argument("--draft2-lr", type=float, default=2e-3)
    ap.add_argument("--ce-weight", type=float, default=0.1)
    ap.add_argument("--hard-weight", type=float, default=0.5,
                    help="phase 2: weight of a cross-entropy to the target's argmax")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--max-train-mb", type=float, default=0.0,
                    help="use only the first N MB of training files (sorted order; 0 = all), for quick runs")
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out windows of 256 tokens to evaluate")
    ap.add_argument("--timing-reps", type=int, default=30)
    ap.add_argument("--measure-only", action="store_true",
                    help="do not train: re-measure the pair in --out and rewrite metrics.json / MODEL_CARD.md")
    ap.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: interrupt after N steps
    args = ap.parse_args(argv)
    if args.minutes is not None:
        f = args.minutes / DEFAULT_MINUTES
        args.joint_steps = max(1, round(args.joint_steps * f))
        args.draft_steps = max(1, round(args.draft_steps * f))

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.measure_only:  # re-measure a saved pair (e.g. timings on another machine); keeps the training facts
        old = json.loads((out / "metrics.json").read_text())
        keys = ("train_tokens", "python", "torch", "seed", "threads", "joint_steps", "draft_steps", "batch", "seq_len",
                "ce_weight", "target_lr", "draft_lr", "draft2_lr", "amp", "hard_weight", "train_minutes",
                "train_minutes_note")
        measure(out, read_texts(corpus_files()[1]), {"amp": args.amp, **{k: old[k] for k in keys if k in old}}, args)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "_ckpt.pt"
    state = None
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
    t_all = time.perf_counter()
    train_files, held_files, root = corpus_files()
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    if args.max_train_mb > 0:  # deterministic cap: files in sorted order until the budget is reached
        budget, kept = int(args.max_train_mb * 1e6), []
        for t in train_texts:
            if budget <= 0:
                break
            kept.append(t)
            budget -= len(t)
        train_texts = kept
    print(f"corpus: {len(train_texts)} training files ({sum(map(len, train_texts)) / 1e6:.1f} MB), {len(held_texts)} "
          f"held-out files, from {root} (Python {sys.version.split()[0]})", flush=True)
    tok = build_tokenizer(train_texts, args.vocab, out / "tokenizer")
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    print(f"tokenizer: {len(tok)} tokens; {len(train_ids):,} training / {len(held_ids):,} held-out tokens; "
          f"schedule {args.joint_steps} joint + {args.draft_steps} draft steps of {args.batch}x{args.seq_len} tokens, "
          f"{args.threads} thread(s)", flush=True)

    torch.manual_seed(args.seed)
    target = make_model(TARGET_SHAPE, len(tok), tok.eos_token_id, args.seq_len)
    draft = make_model(DRAFT_SHAPE, len(tok), tok.eos_token_id, args.seq_len)
    print(f"target {n_params(target) / 1e6:.2f} M params, draft {n_params(draft) / 1e6:.2f} M params "
          f"({n_params(target) / n_params(draft):.1f}x)", flush=True)
    try:
        train(target, draft, torch.from_numpy(train_ids.astype(np.int64)), args, ckpt, state)
    except _Stopped as e:
        print(f"stopped after {e} steps; checkpoint in {ckpt} (continue with --resume)", flush=True)
        return 3

    save_model(target, out / "target")
    save_model(draft, out / "draft")
    for sub in ("target", "draft"):
        tok.save_pretrained(out / sub)
    info = dict(train_tokens=int(len(train_ids)), python=sys.version.split()[0], torch=torch.__version__,
                seed=args.seed, threads=args.threads, joint_steps=args.joint_steps, draft_steps=args.draft_steps,
                batch=args.batch, seq_len=args.seq_len, ce_weight=args.ce_weight, target_lr=args.target_lr,
                draft_lr=args.draft_lr, draft2_lr=args.draft2_lr, amp=args.amp, hard_weight=args.hard_weight,
                train_minutes=(time.perf_counter() - t_all) / 60)
    measure(out, held_texts, info, args)
    ckpt.unlink(missing_ok=True)
    return 0


def measure(out: Path, held_texts: list[str], info: dict, args) -> dict:
    """Measure what ships (the fp16 files, loaded as fp32 like load_pair does); write metrics.json and
    MODEL_CARD.md. ``info``: the training run's facts, merged in."""
    from pipesd.models.runners import load_local

    t_saved, tok = load_local(out / "target")
    d_saved, _ = load_local(out / "draft")
    held_ids = encode(tok, held_texts)
    (out / "heldout_sample.txt").write_text(heldout_sample(held_texts))
    metrics = evaluate(d_saved, t_saved, held_ids, n_windows=args.eval_windows)
    metrics.update(time_runners(out, [int(v) for v in held_ids[:256]], reps=args.timing_reps))
    metrics.update(target_params=n_params(t_saved), draft_params=n_params(d_saved),
                   param_ratio=n_params(t_saved) / n_params(d_saved), vocab=len(tok),
                   target_mb=(out / "target" / "model.safetensors").stat().st_size / 1e6,
                   draft_mb=(out / "draft" / "model.safetensors").stat().st_size / 1e6,
                   target_shape=TARGET_SHAPE, draft_shape=DRAFT_SHAPE,
                   held_out_tokens=int(len(held_ids)), held_out_files=len(held_texts))
    metrics = {**metrics, **info}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(metrics))
    print(json.dumps(metrics, indent=1), flush=True)
    return metrics


if __name__ == "__main__":
    raise SystemExit(main())
