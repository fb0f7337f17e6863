"""Draft forward cost against tokens per forward: is a forward of n tokens about one draft step?

    python bench/trees/forward_cost.py            # every backend found here -> bench/results/draft-forward-cost.{md,json}
    python bench/trees/forward_cost.py --quick    # smoke: bundled torch draft, n = 1, 2, 4, 3 repeats (-quick files)

Why: trees over the wire (issue 13, item 4) can carry short continuations under sibling
candidates only if the edge can draft them cheaply, i.e. if one draft forward over several new
tokens costs about one draft step. The tree cost model takes these figures as its draft cost of
a forward of n tokens.

**Backends** (each skipped with a printed reason when absent; nothing is downloaded):
``bundled-torch`` (the stdlib-code draft, :mod:`pipesd.zoo`), ``bundled-gguf`` (its shipped
f16 GGUF under llama.cpp), ``qwen0.5b-torch`` (Qwen2.5-Coder 0.5B of the fetched pair
``qwen2.5-coder-0.5b-1.5b``, float32 transformers weights) and ``qwen0.5b-gguf`` (that pair's
Q4_K_M ``draft.gguf`` under llama.cpp). All load through :func:`pipesd.launch.load_draft`.

**What one timed call is**: the runner's own forward path, ``draft._lm.rows(state, prefix +
new, want_from)`` (the LCP cache path ``step``/``expand_tree`` use), on a cache that holds the
prefix (``--prefix`` tokens of the bundled pair's held-out standard-library code, in each
backend's tokenizer) and, before the call, a previous continuation: the call crops that off
itself (the LCP rule) and feeds the n new tokens, as the edge does after a rollback. Each call
is checked to have fed exactly n tokens. Modes:

- ``chain-last``: n new tokens, the logits of the last one only (a draft step is n = 1; the
  catch-up after a correction is n > 1);
- ``chain-all``: n new tokens, logits at every new position (what drafting under n fed nodes
  needs); torch only: the llama.cpp draft returns the last position's logits only;
- ``tree``: a width-2 tree of n nodes (node i's parent is i // 2 - 1: two children of the root,
  two under each node, breadth first) in one forward with the tree mask, via
  :meth:`pipesd.models.TargetSession.score_tree` on the draft's own weights. The draft runner
  has no tree-masked forward (``expand_tree`` runs one forward per expanded node), so this is
  the cost it would pay by reusing the target's code; llama.cpp has no tree mask (n/a).

**Statistics**: ``--warmups`` untimed passes, then ``--repeats`` passes; each pass runs every
(mode, n) cell once in a shuffled order (seeded). Per cell: the median wall time and its
bootstrap 95% interval; t(n)/t(1), where t(1) is the draft step (``chain-last``, n = 1) of the
same backend, as a ratio of medians with a paired bootstrap interval (pairs: the same pass);
and the tokens per step-equivalent, n / (t(n)/t(1)).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]


def _e2e():
    """bench/e2e/run.py, under its own module name (bench/soak has a ``run`` module too)."""
    import importlib.util

    name = "bench_e2e_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "e2e" / "run.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


_E2E = _e2e()
bootstrap_ci, git_commit, machine, ratio_ci = _E2E.bootstrap_ci, _E2E.git_commit, _E2E.machine, _E2E.ratio_ci

BACKENDS = ("bundled-torch", "bundled-gguf", "qwen0.5b-torch", "qwen0.5b-gguf")
MODES = ("chain-last", "chain-all", "tree")
FULL_NS = (1, 2, 3, 4, 6, 8, 12, 16)
QUICK_NS = (1, 2, 4)
REAL_PAIR = "qwen2.5-coder-0.5b-1.5b"
TEXT = ROOT / "src" / "pipesd" / "zoo" / "pairs" / "stdlib-code" / "heldout_sample.txt"
#: A forward "costs about one step" up to this multiple of t(1) (the markdown's summary column).
ABOUT_ONE_STEP = 1.25


@dataclass
class Backend:
    name: str
    kind: str  # "torch" or "llama.cpp"
    what: str
    draft: object
    modes: tuple[str, ...]


def tree_parents(n: int) -> list[int]:
    """Parents of a width-2 tree of ``n`` nodes in breadth-first order (-1: a child of the root)."""
    return [i // 2 - 1 for i in range(n)]


def load_backend(name: str, threads: int) -> tuple[Optional[Backend], str]:
    """(backend, "") or (None, why it is skipped)."""
    from pipesd import pairs
    from pipesd.launch import load_draft

    gguf = name.endswith("-gguf")
    if gguf:
        try:
            from pipesd.models.llamacpp import require_llama_cpp

            require_llama_cpp()
        except ImportError as e:
            return None, str(e)
    if name.startswith("bundled"):
        if gguf:
            from pipesd.zoo.gguf_export import bundled_gguf

            try:
                path = bundled_gguf("stdlib-code")
            except FileNotFoundError as e:
                return None, str(e)
            return Backend(name, "llama.cpp", f"stdlib-code draft, {path.name} (f16)",
                           load_draft(None, threads=threads, gguf=str(path)), ("chain-last",)), ""
        return Backend(name, "torch", "stdlib-code draft (bundled, float32)",
                       load_draft("stdlib-code", threads=threads), MODES), ""
    if not pairs.is_fetched(REAL_PAIR):
        return None, (f"pair {REAL_PAIR} is not fetched in {pairs.pair_dir(REAL_PAIR)} "
                      f"(`pipesd pair fetch {REAL_PAIR}`; this benchmark never downloads)")
    p = pairs.resolve(REAL_PAIR)
    if gguf:
        if not p.draft_gguf.is_file():
            return None, f"{p.draft_gguf} is missing"
        return Backend(name, "llama.cpp", f"Qwen2.5-Coder 0.5B, {p.draft_gguf} (Q4_K_M)",
                       load_draft(None, threads=threads, gguf=str(p.draft_gguf)), ("chain-last",)), ""
    if not (p.draft / "config.json").is_file():
        return None, f"{p.draft}/config.json is missing"
    return Backend(name, "torch", f"Qwen2.5-Coder 0.5B, {p.draft} (float32)",
                   load_draft(str(p.draft), threads=threads), MODES), ""


def code_tokens(tokenizer, need: int) -> list[int]:
    """The first ``need`` tokens of the held-out code sample (repeated if it is too short)."""
    text = TEXT.read_text(encoding="utf-8")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"{TEXT} encodes to no tokens")
    while len(ids) < need:
        ids = ids + ids
    return [int(t) for t in ids[:need]]


def _cells(backend: Backend, prefix: list[int], cont: list[int], ns) -> dict[tuple[str, int], Callable[[], float]]:
    """One timed callable per (mode, n): runs the forward, checks it fed n tokens, returns seconds."""
    draft, L = backend.draft, len(prefix)
    lm, st = draft._lm, draft._st
    # two continuations that differ at their first token: alternating them makes the LCP
    # exactly the prefix, so every call crops the previous tail and feeds all n tokens
    alt = [list(cont), [(cont[0] + 1) % draft.vocab_size] + list(cont[1:])]
    chain_turn = [0]
    lm.rows(st, prefix, L - 1)  # prefill

    def chain(n: int, keep_all: bool) -> Callable[[], float]:
        def call() -> float:
            chain_turn[0] ^= 1
            seq = prefix + alt[chain_turn[0]][:n]
            want = L if keep_all else L + n - 1
            f0 = lm.forwards
            t0 = time.perf_counter()
            out = lm.rows(st, seq, want)
            dt = time.perf_counter() - t0
            if lm.forwards - f0 != n or len(out) != len(seq) - want:
                raise RuntimeError(f"{backend.name}: a forward of n = {n} fed {lm.forwards - f0} tokens "
                                   f"and gave {len(out)} rows: the cache was not at the prefix")
            return dt
        return call

    cells: dict[tuple[str, int], Callable[[], float]] = {}
    for n in ns:
        cells[("chain-last", n)] = chain(n, False)
        if "chain-all" in backend.modes:
            cells[("chain-all", n)] = chain(n, True)
    if "tree" in backend.modes:
        from pipesd.models import TargetModel

        tm = TargetModel(draft.model)  # the draft's weights (shared module), threads left as they are
        sess = tm.new_session(prefix)
        sess.score([])  # prefill; score_tree's row 0 is then cached and it crops back to the prefix itself

        def tree(n: int) -> Callable[[], float]:
            toks, par = cont[:n], tree_parents(n)

            def call() -> float:
                f0 = tm.forwards
                t0 = time.perf_counter()
                out = sess.score_tree(toks, par)
                dt = time.perf_counter() - t0
                if tm.forwards - f0 != n or out.shape[0] != n + 1:
                    raise RuntimeError(f"{backend.name}: a tree of {n} nodes fed {tm.forwards - f0} tokens")
                return dt
            return call

        for n in ns:
            cells[("tree", n)] = tree(n)
    return cells


def measure(backend: Backend, ns, repeats: int, warmups: int, prefix_len: int, seed: int) -> list[dict]:
    """The rows of one backend (see the module docstring)."""
    tok = backend.draft.tokenizer
    if tok is None:
        raise ValueError(f"{backend.name}: the draft has no tokenizer to encode the code prompt")
    ids = code_tokens(tok, prefix_len + max(ns))
    cells = _cells(backend, ids[:prefix_len], ids[prefix_len:], ns)
    keys = list(cells)
    rng = random.Random(seed)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    gc.collect()
    for r in range(warmups + repeats):
        rng.shuffle(keys)
        for k in keys:
            dt = cells[k]()
            if r >= warmups:
                times[k].append(dt * 1e3)
    step = times[("chain-last", 1)]
    rows = []
    for (mode, n) in sorted(times, key=lambda k: (MODES.index(k[0]), k[1])):
        ts = times[(mode, n)]
        lo, hi = bootstrap_ci(ts)
        ratio, rlo, rhi = ratio_ci(ts, step)
        rows.append({"backend": backend.name, "mode": mode, "n": n, "times_ms": [round(t, 4) for t in ts],
                     "median_ms": statistics.median(ts), "ci_ms": [lo, hi],
                     "ratio_to_step": ratio, "ratio_ci": [rlo, rhi],
                     "tokens_per_step": n / ratio, "tokens_per_step_ci": [n / rhi, n / rlo]})
    return rows


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke: bundled torch draft, n = 1, 2, 4, 3 repeats, 1 warm-up; writes *-quick files")
    ap.add_argument("--backends", default=None,
                    help=f"comma list of {', '.join(BACKENDS)} (default: all; --quick: bundled-torch)")
    ap.add_argument("--ns", default=None, help=f"tokens per forward, comma list (default {','.join(map(str, FULL_NS))})")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes (default 15; --quick 3)")
    ap.add_argument("--warmups", type=int, default=None, help="untimed passes first (default 3; --quick 1)")
    ap.add_argument("--prefix", type=int, default=128, help="cached prefix, tokens (default 128)")
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (default 1: the edge's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cell order")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output directory")
    args = ap.parse_args(argv)
    names = args.backends.split(",") if args.backends else (["bundled-torch"] if args.quick else list(BACKENDS))
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        ap.error(f"--backends: unknown backend(s) {', '.join(bad) or '(none)'}; choose from {', '.join(BACKENDS)}")
    args.backend_names = names
    if args.ns is None:
        args.ns_list = list(QUICK_NS if args.quick else FULL_NS)
    else:
        try:
            args.ns_list = sorted({int(x) for x in args.ns.split(",")})
        except ValueError:
            ap.error(f"--ns: {args.ns!r} is not a comma list of whole numbers")
        if not args.ns_list or args.ns_list[0] < 1 or args.ns_list[-1] > 64:
            ap.error(f"--ns: each n must be in 1..64, got {args.ns!r}")
    if 1 not in args.ns_list:
        args.ns_list = [1] + args.ns_list  # t(1), the draft step, is every ratio's denominator
    args.repeats = (3 if args.quick else 15) if args.repeats is None else args.repeats
    args.warmups = (1 if args.quick else 3) if args.warmups is None else args.warmups
    for name, v, lo in (("--repeats", args.repeats, 2), ("--warmups", args.warmups, 0), ("--prefix", args.prefix, 1),
                        ("--threads", args.threads, 1)):
        if v < lo:
            ap.error(f"{name} must be >= {lo}, got {v}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    threads_before = torch.get_num_threads()
    t_start = time.perf_counter()
    rows, backends, skipped = [], [], []
    if args.quick:
        skipped += [{"backend": b, "reason": "--quick: not selected"} for b in BACKENDS if b not in args.backend_names]
    try:
        torch.set_num_threads(args.threads)
        for name in args.backend_names:
            backend, why = load_backend(name, args.threads)
            if backend is None:
                print(f"skip {name}: {why}", flush=True)
                skipped.append({"backend": name, "reason": why})
                continue
            print(f"{name}: {backend.what}; modes {', '.join(backend.modes)} ...", flush=True)
            t0 = time.perf_counter()
            rows += measure(backend, args.ns_list, args.repeats, args.warmups, args.prefix, args.seed)
            backends.append({"backend": name, "kind": backend.kind, "model": backend.what,
                             "vocab_size": backend.draft.vocab_size, "modes": list(backend.modes),
                             "wall_s": time.perf_counter() - t0})
            if hasattr(backend.draft, "close"):
                backend.draft.close()
            del backend
            gc.collect()
        header = {"bench": "draft-forward-cost", "machine": machine(), "commit": git_commit(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": time.perf_counter() - t_start,
                  "settings": {"quick": args.quick, "ns": args.ns_list, "repeats": args.repeats,
                               "warmups": args.warmups, "prefix_tokens": args.prefix,
                               "torch_threads": torch.get_num_threads(), "llama_threads": args.threads,
                               "torch": torch.__version__, "seed": args.seed,
                               "prompt": str(TEXT.relative_to(ROOT)), "step": "chain-last, n = 1",
                               "tree_parents": "i // 2 - 1 (width 2, breadth first)"},
                  "backends": backends, "skipped": skipped}
    finally:
        torch.set_num_threads(threads_before)  # process-wide: leave an in-process caller's setting as it was
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "draft-forward-cost" + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(header, rows))
    print(f"wrote {out}/{stem}.{{md,json}} in {header['wall_s']:.0f} s")
    return 0


def _ci(lo: float, hi: float, fmt: str) -> str:
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def markdown(header: dict, rows: list[dict]) -> str:
    s, m = header["settings"], header["machine"]
    lines = [f"# Draft forward cost vs tokens per forward ({'quick' if s['quick'] else 'full'})", "",
             f"machine: {m['processor']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {s['torch']}; "
             f"commit {header['commit']}; {header['date']}; {header['wall_s']:.0f} s", "",
             f"settings: one forward of n new tokens on a cached prefix of {s['prefix_tokens']} tokens "
             f"({s['prompt']}); n = {', '.join(map(str, s['ns']))}; {s['repeats']} repeats after {s['warmups']} "
             f"warm-up(s), cells shuffled per pass (seed {s['seed']}); torch threads {s['torch_threads']}, "
             f"llama.cpp threads {s['llama_threads']}. t(1) = one draft step ({s['step']}); "
             "ms: median [bootstrap 95%]; t(n)/t(1): ratio of medians [paired bootstrap 95%]; "
             "tokens/step = n / (t(n)/t(1)). Modes: `chain-last` n tokens, last logits; `chain-all` n tokens, "
             f"logits at each; `tree` width-2 tree of n nodes, tree mask ({s['tree_parents']}), via "
             "TargetSession.score_tree on the draft's weights (the draft runner has no tree-masked forward; "
             "llama.cpp has no tree mask).", ""]
    for sk in header["skipped"]:
        lines.append(f"- skipped **{sk['backend']}**: {sk['reason']}")
    if header["skipped"]:
        lines.append("")
    for b in header["backends"]:
        mine = [r for r in rows if r["backend"] == b["backend"]]
        lines += [f"## {b['backend']} ({b['kind']}): {b['model']}", "",
                  "| mode | n | ms | t(n)/t(1) | tokens/step |", "|---|---:|---:|---:|---:|"]
        for r in mine:
            lines.append(f"| {r['mode']} | {r['n']} | {r['median_ms']:.3f} {_ci(*r['ci_ms'], '.3f')} | "
                         f"{r['ratio_to_step']:.2f} {_ci(*r['ratio_ci'], '.2f')} | "
                         f"{r['tokens_per_step']:.2f} {_ci(*r['tokens_per_step_ci'], '.2f')} |")
        lines.append("")
        for mode in b["modes"]:
            within = [r["n"] for r in mine if r["mode"] == mode and r["ratio_to_step"] <= ABOUT_ONE_STEP]
            lines.append(f"- {mode}: largest n with t(n) <= {ABOUT_ONE_STEP} t(1): "
                         f"{max(within) if within else 'none'}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
