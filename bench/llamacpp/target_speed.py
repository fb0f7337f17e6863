"""Speed of the llama.cpp target: one verification that scores n draft tokens after a prompt.

    python bench/llamacpp/target_speed.py                       # bundled target, exported to GGUF here
    python bench/llamacpp/target_speed.py --gguf target.gguf --prompt-tokens 200 --ns 1,8

Each repetition scores a draft of n tokens on top of the same prompt, with a first token that
differs from the last repetition's, so llama.cpp feeds exactly n tokens (the prompt stays
cached) and returns n + 1 logits rows: what the cloud does per verification. With the bundled
pair the torch target is timed the same way (``--no-torch`` to skip). Median of ``--reps``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _time_scores(session, n: int, reps: int, vocab: int) -> float:
    times = []
    for r in range(reps + 1):
        draft = [(r * 7 + i + 1) % vocab for i in range(n)]
        t0 = time.perf_counter()
        rows = session.score(draft)
        dt = time.perf_counter() - t0
        assert rows.shape[0] == n + 1
        if r:  # the first one warms up
            times.append(dt)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="target GGUF file (default: the bundled target, exported to f16)")
    ap.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="export dtype of the bundled target")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--ns", default="1,4,8,16", help="draft lengths to score")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch target (bundled pair only)")
    args = ap.parse_args(argv)
    import torch

    from pipesd.models.llamacpp import LlamaCppTarget

    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",")]
    torch_target = None
    if args.gguf is None:
        from pipesd import zoo
        from pipesd.zoo.gguf_export import export_gguf

        path = export_gguf(zoo.pair_path() / "target", Path(tempfile.mkdtemp()) / f"target-{args.dtype}.gguf",
                           args.dtype)
        if not args.no_torch:
            torch_target = zoo.load_pair().target
    else:
        path = Path(args.gguf)
    t0 = time.perf_counter()
    target = LlamaCppTarget(path, threads=args.threads, slots=1, n_ctx=max(512, args.prompt_tokens + 64))
    load_s = time.perf_counter() - t0
    V = target.vocab_size
    prompt = [(i * 31 + 5) % V for i in range(args.prompt_tokens)]
    s = target.new_session(prompt)
    t0 = time.perf_counter()
    s.score([])
    prefill_s = time.perf_counter() - t0
    print(f"{path.name}: vocab {V}, {args.threads} thread(s), load {load_s:.2f} s, "
          f"prefill of {args.prompt_tokens} tokens {prefill_s * 1e3:.1f} ms")
    ts = torch_target.new_session(prompt) if torch_target is not None else None
    if ts is not None:
        ts.score([])
    print("| n scored | llama.cpp ms | ms / token |" + (" torch ms | torch / llama.cpp |" if ts else ""))
    print("|---|---|---|" + ("---|---|" if ts else ""))
    for n in ns:
        lc = _time_scores(s, n, args.reps, V)
        row = f"| {n} | {lc * 1e3:.2f} | {lc * 1e3 / n:.2f} |"
        if ts is not None:
            tt = _time_scores(ts, n, args.reps, V)
            row += f" {tt * 1e3:.2f} | {tt / lc:.1f}x |"
        print(row, flush=True)
    target.close()
    _batch_table(path, args, V)
    return 0


def _batch_table(path: Path, args, V: int) -> None:
    """B sessions x 8 drafts: one ``score_batch`` (one llama.cpp batch over the shared context)
    against B ``score`` calls; and the KV cache llama.cpp allocated for the slots."""
    from pipesd.models.llamacpp import LlamaCppTarget

    B_max, n = 4, 8
    target = LlamaCppTarget(path, threads=args.threads, slots=B_max, n_ctx=max(512, args.prompt_tokens + 64))
    ss = [target.new_session([(i * 31 + 5 + 13 * b) % V for i in range(args.prompt_tokens)]) for b in range(B_max)]
    target.score_batch(ss, [[] for _ in ss])
    print(f"\n{B_max} sessions x {n} drafts, {B_max} slots of {target.n_ctx} tokens")
    print("| sessions | one batch ms | separate calls ms |")
    print("|---|---|---|")
    for B in range(1, B_max + 1):
        one, sep = [], []
        for r in range(args.reps + 1):
            drafts = [[(r * 7 + i + b + 1) % V for i in range(n)] for b in range(B)]
            t0 = time.perf_counter()
            target.score_batch(ss[:B], drafts)
            t1 = time.perf_counter()
            drafts = [[(r * 7 + i + b + 3) % V for i in range(n)] for b in range(B)]
            t2 = time.perf_counter()
            for s, d in zip(ss[:B], drafts):
                s.score(d)
            t3 = time.perf_counter()
            if r:
                one.append(t1 - t0)
                sep.append(t3 - t2)
        print(f"| {B} | {statistics.median(one) * 1e3:.2f} | {statistics.median(sep) * 1e3:.2f} |", flush=True)
    target.close()


if __name__ == "__main__":
    raise SystemExit(main())
