"""End-to-end benchmark: PipeSD against the baselines users and the paper compare with.

    python bench/e2e/run.py --quick                                    # bundled pair, 4 scenarios
    python bench/e2e/run.py --quick --pair qwen2.5-coder-0.5b-1.5b --replay   # a real pair, replayed
    python bench/e2e/run.py --quick --pair qwen2.5-coder-0.5b-1.5b --scenarios live-gguf  # real pair, real compute
    python bench/e2e/run.py                                            # the full grid

**Setup.** The cloud (`pipesd serve`, its own process, one thread) verifies with the pair's
target, each verification padded to ``--verify-ms`` (a 7B-class target on a GPU); the edge
(this process, one thread) drafts with the pair's draft, each step padded to the scenario's
per-token time; the link is emulated in the edge's connection. The ``live-gguf`` scenario pads
nothing: both models run under llama.cpp, one thread each, on this machine's cores.

**Pairs** (``--pair``): ``bundled`` (the 2 M-parameter stdlib-code pair), ``self-noisy:SCALE``
(the bundled target with weight noise as the draft), ``DRAFT_DIR:TARGET_DIR`` (any local HF
pair), a fetched pair name (``pipesd pair fetch NAME``), or ``replay:FILE`` / ``--replay``
(a real pair's recorded greedy behaviour served with the scenario's timing: see
docs/models.md, "Replay"). Replayed results are labelled replayed everywhere.

**Methods.** ``cloud-stream`` (the cloud decodes and streams: one round trip in all),
``vanilla-sd`` at its best K (K swept; the best of the sweep is reported, a choice that favours
the baseline), ``tree-sd`` (vanilla's spine plus sibling leaves, one draft tree per round, also
at its best K), ``hsl`` and ``edgellm`` as the paper ran them, the paper's ablations
(``dual-no-pipeline``, ``pipe-fixed-k``, ``pipe-token-only``, ``pipe-seq-only``) and
``pipesd``; the full grid adds ``target-per-token``, ``fixed-batch``, ``edge-only`` and
``pipesd-tuned``. docs/runtime.md, "Methods", says what each does.

**Statistics.** Every method runs on the same prompts in the same run; each generation is a
row of the JSON. Tables give the median TPT with a bootstrap 95% interval (resampling the
prompts), and speedups as ratios of medians with a paired bootstrap interval. Beside every
TPT: the cloud's cost per token (busy ms, token-forwards, modelled J: busy time x
``--cloud-power-w``), and a Pareto plot per scenario (x: cloud busy ms per token, y: TPT).

**Bound.** The ideal-pipeline TPT of a run, ``max(edge, wire, cloud)`` per generated token:
edge = draft time x drafts per token, wire = (s x messages + c x tokens sent) / tokens from the
fitted link costs, cloud = verification busy time / tokens.

**Exactness.** Each greedy output is compared with the target's own greedy tokens, computed in
this process by the same target backend; the benchmark exits 1 if any differs.

**S4** replays a periodic bandwidth trace; the trace origin is reset at the start of every
generation, so every method's i-th generation sees the same bandwidth over time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipesd.launch import PROMPTS, load_draft, load_target, make_link, start_server_subprocess, stop_process

ROOT = Path(__file__).resolve().parents[2]
REPLAY_DIR = ROOT / "bench" / "results" / "replay"


@dataclass
class Scenario:
    name: str
    draft_ms: float
    link: str  # preset name, or "UPmbps/DELAYms"
    note: str = ""
    live: bool = False  # real compute under llama.cpp, no padding


PAPER = [
    Scenario("S1-laptop", 20, "paper", "default edge, 20/200 Mbit/s"),
    Scenario("S2-phone", 40, "paper", "edge slowed to a phone"),
    Scenario("S3-iot", 80, "paper", "edge slowed to an IoT device"),
    Scenario("S4-dynamic", 20, "paper-s4", "uplink 10-80 Mbit/s, downlink 150-280, every 20 s"),
]
LIVE = Scenario("live-gguf", 0, "paper", "both models under llama.cpp, 1 thread each, no padding", live=True)
GRID = [Scenario(f"edge{ms}-{mb}M-{d}ms", ms, f"{mb}/{d}", "grid")
        for ms in (10, 30, 60) for mb, d in ((2, 40), (10, 25), (50, 10))]
ALL_SCENARIOS = {s.name: s for s in PAPER + [LIVE] + GRID}

QUICK_METHODS = ["cloud-stream", "vanilla-sd", "tree-sd", "hsl", "edgellm", "dual-no-pipeline", "pipe-fixed-k",
                 "pipe-token-only", "pipe-seq-only", "pipesd", "pipesd-lookup", "pipesd-adaptive", "pipesd-adaptive-nolimit"]
FULL_METHODS = ["cloud-stream", "target-per-token", "vanilla-sd", "tree-sd", "hsl", "edgellm", "dual-no-pipeline",
                "fixed-batch", "pipe-fixed-k", "pipe-token-only", "pipe-seq-only", "pipesd", "pipesd-lookup", "pipesd-adaptive",
                "pipesd-adaptive-nolimit", "pipesd-tuned",
                "edge-only"]
#: Methods whose output is not the target's (a speed reference only): not checked for exactness.
NOT_TARGET_OUTPUT = {"edge-only"}
LOOKUP_METHODS = {"pipesd-lookup": "pipesd"}  # a method with prompt-lookup proposals (lookup="ngram")
K_SWEPT = ("vanilla-sd", "tree-sd")  # run at every K of --k-sweep; the best is reported
BASELINES = ("cloud-stream", "target-per-token", "vanilla-sd", "hsl", "edgellm")

# The paper's wire: each draft token carries its full-vocabulary q, ~0.29 MB (docs/runtime.md,
# "Hints"), about 116 ms per token at 20 Mbit/s (docs/tuning.md, "When pipelining helps"). Our
# full-q frame is 4 bytes per vocabulary entry (dense float32 q, plus 8 for token and prob);
# --paper-wire scales the uplink bandwidth by the ratio, so every byte we send costs what the
# paper's bytes cost.
PAPER_Q_BYTES_PER_TOKEN = 290_000


# ----------------------------------------------------------------------------- the pair
@dataclass
class Pair:
    """What the edge and the cloud load, and how results name it."""

    label: str  # e.g. "stdlib-code (bundled)", "qwen2.5-coder-0.5b-1.5b (replayed)"
    tag: str  # file-name part
    draft: Optional[str]  # a load_draft spec
    target: Optional[str]  # a load_target / `pipesd serve --model` spec (None: bundled)
    draft_gguf: Optional[str] = None
    target_gguf: Optional[str] = None
    replayed: bool = False
    real: bool = False  # a pretrained pair (default prompts: HumanEval)
    extra: dict = field(default_factory=dict)


def parse_pair(spec: str, replay: bool) -> Pair:
    """A :class:`Pair` from ``--pair`` / ``--replay``; ValueError with the valid forms otherwise."""
    if replay and not spec.startswith("replay:"):
        if spec in ("bundled", "") or spec.startswith("self-noisy:") or ":" in spec:
            raise ValueError("--replay takes a pair name (its recording is bench/results/replay/NAME.jsonl.gz); "
                             "for another recording use --pair replay:FILE")
        spec = f"replay:{REPLAY_DIR / (spec + '.jsonl.gz')}"
    if spec in ("bundled", ""):
        return Pair("stdlib-code (bundled)", "bundled", "bundled", None)
    if spec.startswith("self-noisy:"):
        return Pair(f"stdlib-code target; draft = {spec}", spec.replace(":", ""), spec, None)
    if spec.startswith("replay:"):
        path = Path(spec[len("replay:"):])
        if not path.is_file():
            raise ValueError(f"no recording at {path}; record one with bench/e2e/record.py (docs/models.md, "
                             "'Replay')")
        name = path.name.removesuffix(".gz").removesuffix(".jsonl")
        return Pair(f"{name} (replayed)", "replay-" + name, spec, spec, replayed=True,
                    real=True)
    if ":" in spec:
        d, _, t = spec.partition(":")
        for role, p in (("draft", d), ("target", t)):
            if not (Path(p) / "config.json").is_file():
                raise ValueError(f"--pair DRAFT_DIR:TARGET_DIR: {role} {p!r} is not a model directory "
                                 "(no config.json)")
        return Pair(f"{Path(d).name} -> {Path(t).name} (local, live)", f"{Path(d).name}-{Path(t).name}", d, t,
                    real=True)
    from pipesd import pairs

    if spec in pairs.REGISTRY or pairs.is_fetched(spec):
        paths = pairs.resolve(spec)  # a clear error when not fetched yet
        return Pair(f"{spec} (live)", spec, str(paths.draft), str(paths.target), str(paths.draft_gguf),
                    str(paths.target_gguf), real=True)
    raise ValueError(f"unknown pair {spec!r}: use bundled, self-noisy:SCALE, DRAFT_DIR:TARGET_DIR, a fetched "
                     "pair name (pipesd pair list) or replay:FILE")


def uplink_scale(args, vocab_size: int) -> float:
    """Factor applied to uplink bandwidth (1.0 unless --paper-wire)."""
    if not getattr(args, "paper_wire", False):
        return 1.0
    return (4 * vocab_size + 8) / PAPER_Q_BYTES_PER_TOKEN


def git_commit() -> str:
    try:
        c = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
        # The code that ran: results written by an earlier run of this bench do not make it dirty.
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src", "bench",
                                ":!bench/results"]).returncode
        return c + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


# ------------------------------------------------------------------------- statistics
def bootstrap_ci(xs, stat=statistics.median, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``stat`` over ``xs`` (resampling the items)."""
    if len(xs) < 2:
        return (float(xs[0]), float(xs[0])) if xs else (float("nan"), float("nan"))
    rng = random.Random(seed)
    vals = sorted(stat([xs[rng.randrange(len(xs))] for _ in xs]) for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


def ratio_ci(base, other, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(base) / median(other) and its paired-bootstrap 95% interval (prompts resampled together)."""
    point = statistics.median(base) / statistics.median(other)
    if len(base) < 2:
        return point, point, point
    rng = random.Random(seed)
    idx = range(len(base))
    vals = []
    for _ in range(n):
        pick = [rng.choice(idx) for _ in idx]
        vals.append(statistics.median([base[i] for i in pick]) / statistics.median([other[i] for i in pick]))
    vals.sort()
    return point, vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


# ------------------------------------------------------------------------------ runs
#: A divergence from the reference is a near-tie when the reference's top two logits there are
#: closer than this and the output took the runner-up: a backend whose kernels depend on the
#: batch shape (llama.cpp: one token vs several, docs/llamacpp.md "Accuracy") may order them
#: either way, so "the target's greedy" is defined only up to such ties. Per backend: torch's
#: float32 logits move by < 1e-3 with the batch shape; a Q4_K_M GGUF's by up to ~0.7 (measured
#: on the 1.5B target: 13.94 vs 14.60 for the same token at the same position, one token vs a
#: batch of 4), since llama.cpp quantizes activations differently for the two paths and the
#: KV cache inherits the difference.
TIE_TOL = {"torch": 0.05, "gguf": 1.0}


class Reference:
    """The target's own greedy tokens per prompt, by the same backend the cloud runs, decoded
    one token at a time; :meth:`exact` accepts a divergence only at a near-tie (``TIE_TOL``)
    and checks the rest of the output against the target's greedy from there. ``ties[id(g)]``:
    the near-ties of generation ``g`` (position, margin)."""

    def __init__(self, target, tie_tol: float = TIE_TOL["torch"]) -> None:
        self.target, self.tie_tol = target, tie_tol
        self.cache: dict[tuple, tuple] = {}
        self.ties: dict[int, list[dict]] = {}

    def greedy(self, prefix_ids, n: int) -> tuple[list[int], list[int], list[float]]:
        """Up to ``n`` greedy tokens after ``prefix_ids`` (stopping at EOS), with the runner-up
        token and the top-2 logit margin at each position."""
        key = (tuple(prefix_ids), n)
        if key not in self.cache:
            import torch

            eos = getattr(self.target, "eos_token_id", None)
            out: list[int] = []
            second: list[int] = []
            margin: list[float] = []
            if n > 0:
                s = self.target.new_session(list(prefix_ids))
                try:
                    while len(out) < n:
                        v, i = torch.topk(s.score([])[-1].float(), 2)
                        t = int(i[0])
                        out.append(t)
                        second.append(int(i[1]))
                        margin.append(float(v[0] - v[1]))
                        if t == eos:
                            break
                        s.commit([t])
                finally:
                    s.close()
            self.cache[key] = (out, second, margin)
        return self.cache[key]

    def tokens(self, prompt_ids, n: int) -> list[int]:
        return self.greedy(prompt_ids, n)[0]

    def exact(self, g, n: int) -> bool:
        """Whether ``g``'s tokens are the target's greedy ones, up to near-ties."""
        ids, prefix, pos, ties = list(g.token_ids), list(g.prompt_ids), 0, []
        self.ties[id(g)] = ties
        if not g.verified:
            return False
        while True:
            ref, second, margin = self.greedy(prefix, n - pos)
            rest = ids[pos:]
            i = next((j for j, (a, b) in enumerate(zip(rest, ref)) if a != b), None)
            if i is None:
                return len(rest) <= len(ref) and (len(rest) == len(ref) or g.finish_reason == "eos")
            if rest[i] != second[i] or margin[i] > self.tie_tol:
                return False
            ties.append({"pos": pos + i, "margin": margin[i]})
            prefix += rest[: i + 1]
            pos += i + 1
            if pos == len(ids):
                return len(ids) == n or g.finish_reason == "eos"


def fresh_trace(link) -> None:
    """Restart the link's bandwidth trace at this moment (S4: every generation sees the same trace)."""
    if link is not None:
        link.restart_trace()


def run_method(client, link, method, prompts, n_new, sc, args, **cfg_kw):
    from pipesd.edge import EdgeConfig

    if method in LOOKUP_METHODS:
        method, cfg_kw = LOOKUP_METHODS[method], {**cfg_kw, "lookup": "ngram"}
    cfg = EdgeConfig.for_method(method, draft_step_s=sc.draft_ms / 1e3, wire_q=args.wire_q, offline_policy="fail",
                                **cfg_kw)
    gens = []
    for p in prompts:
        fresh_trace(link)
        gens.append(client.generate(p, n_new, config=cfg))
    return gens


ADAPTIVE_BUDGETS = {"pipesd-adaptive": None, "pipesd-adaptive-nolimit": math.inf}  # None: vanilla SD's spend


def adaptive_run(client, link, method, prompts, n_new, sc, args):
    """pipesd-adaptive (budget: what vanilla SD at its best K spends) and -nolimit (no cloud
    budget): one unmeasured 32-token warm-up generation on the connection measures the costs the
    model is fed (the first generation of a connection runs the pipelined default), then the
    prompts are measured; the schedule each ran and why go into the rows."""
    from pipesd.edge import EdgeConfig

    cfg = EdgeConfig.for_method("pipesd-adaptive", draft_step_s=sc.draft_ms / 1e3, wire_q=args.wire_q,
                                offline_policy="fail", cloud_budget_ms_per_token=ADAPTIVE_BUDGETS[method])
    fresh_trace(link)
    client.generate(prompts[0], 32, config=cfg)
    if client.schedule is not None:
        client.schedule.wait()
    gens = []
    for p in prompts:
        fresh_trace(link)
        gens.append(client.generate(p, n_new, config=cfg))
        client.schedule.wait()  # the model re-runs off the measured path; waiting keeps runs comparable
    choice = client.schedule.choice
    return gens, {"schedules": [g.stats.schedule for g in gens],
                  "schedule_reason": gens[-1].stats.schedule_reason,
                  "schedule_model": choice.to_dict() if choice is not None else None}


def tuned_run(port, draft, link, sc, prompts, n_new, args):
    """pipesd-tuned: an edge with the online Bayesian tuner; tuned on warm-up generations
    (``--tuner-evals`` windows of ``--tuner-window`` tokens), then measured on the prompts."""
    from pipesd.edge import EdgeClient, EdgeConfig

    cfg = EdgeConfig.for_method("pipesd", draft_step_s=sc.draft_ms / 1e3, wire_q=args.wire_q, offline_policy="fail")
    with EdgeClient(f"127.0.0.1:{port}", draft, cfg, auth_token="bench", link=link, tuner="bayes",
                    tuner_window_tokens=args.tuner_window) as client:
        budget = args.tuner_evals * args.tuner_window * 1.5
        done, i = 0, 0
        while done < budget and not client.tuner.stats().get("converged", False):
            fresh_trace(link)
            g = client.generate(prompts[i % len(prompts)], 48)
            done += g.stats.new_tokens
            i += 1
        gens = []
        for p in prompts:
            fresh_trace(link)
            gens.append(client.generate(p, n_new))
        st = client.tuner.stats()
    return gens, {"tau_seq": gens[-1].stats.tau_seq, "tau_tok": gens[-1].stats.tau_tok,
                  "tuner_evaluations": st.get("evaluations"), "tuning_tokens": done}


def gen_row(sc, method, i, g, exact, extra=None, ref=None) -> dict:
    s = g.stats
    row = {"scenario": sc.name, "method": method, "prompt": i, "tpt_s": s.tpt_s, "tokens": s.new_tokens,
           "wall_s": s.wall_s, "cloud_busy_s": s.cloud_busy_s, "cloud_forwards": s.cloud_forwards,
           "verifications": s.verifications, "drafted": s.drafted, "rollbacks": s.rollbacks,
           "accepted_mean": s.mean_accepted, "messages": s.messages_sent, "bytes_sent": s.bytes_sent,
           "finish_reason": g.finish_reason, "exact": exact, "token_ids": list(g.token_ids)}
    if ref is not None:
        row["ties"] = ref.ties.get(id(g), [])
    if extra:
        row.update(extra)
    return row


def summarise(scenario, method, gens, args, exact, extra=None) -> dict:
    tpts = [g.stats.tpt_s for g in gens]
    tokens = sum(g.stats.new_tokens for g in gens)
    st = [g.stats for g in gens]
    drafted = sum(s.drafted for s in st)
    busy = sum(s.cloud_busy_s for s in st)
    msgs = sum(s.messages_sent for s in st)
    # Tokens that carried a q (a hint is compared with a bonus, sent without q).
    sent_tokens = sum(sum(s.batch_sizes) - getattr(s, "hints_sent", 0) for s in st)
    drafts = drafted > 0
    g_s = statistics.median([s.cost_g_s for s in st]) if drafts else 0.0
    s_s = statistics.median([s.cost_s_s for s in st])
    c_s = statistics.median([s.cost_c_s for s in st])
    steps = drafted - sum(s.lookup_proposals for s in st)  # a lookup proposal costs no draft step
    edge = g_s * steps / max(1, tokens)
    wire = (s_s * msgs + c_s * sent_tokens) / max(1, tokens)
    cloud = busy / max(1, tokens)
    bound = g_s if method == "edge-only" else max(edge, wire, cloud)
    lo, hi = bootstrap_ci(tpts)
    row = {
        "scenario": scenario.name, "method": method,
        "tpt_s": statistics.median(tpts), "tpt_ci95_s": [lo, hi], "tpt_min_s": min(tpts), "tpt_max_s": max(tpts),
        "generations": len(gens),
        "accepted_mean": statistics.mean([s.mean_accepted for s in st]),
        "acceptance_rate": statistics.mean([s.acceptance_rate for s in st]),
        "verifications_per_100": 100 * sum(s.verifications for s in st) / max(1, tokens),
        "rollbacks": sum(s.rollbacks for s in st),
        "cloud_busy_ms_per_token": (1e3 * cloud) if method != "edge-only" else 0.0,
        "cloud_forwards_per_token": sum(s.cloud_forwards for s in st) / max(1, tokens),
        "wasted_forwards_per_token": sum(s.wasted_forwards for s in st) / max(1, tokens),
        "energy_j_per_token": (busy * args.cloud_power_w / max(1, tokens)) if method != "edge-only" else None,
        "bytes_per_token": sum(s.bytes_sent for s in st) / max(1, tokens),
        "messages_per_token": msgs / max(1, tokens),
        "bound_tpt_s": bound,
        "edge_overhead_us_per_draft": 1e6 * sum(s.edge_overhead_s for s in st) / max(1, drafted),
        "tokens": tokens,
        "lookup_share": sum(s.lookup_proposals for s in st) / max(1, drafted),
        "lookup_precision": _ratio(sum(s.lookup_accepted for s in st),
                                   sum(s.lookup_accepted + s.lookup_rejected for s in st)),
        "exact": all(exact) if method not in NOT_TARGET_OUTPUT else None,
    }
    if extra:
        row.update(extra)
    return row


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def dominated_by(row, rows) -> list[str]:
    """Methods of the same scenario that are faster at equal or lower cloud cost (medians)."""
    return [r["method"] for r in rows if r is not row and r["method"] not in NOT_TARGET_OUTPUT
            and r["tpt_s"] < row["tpt_s"] and r["cloud_busy_ms_per_token"] <= row["cloud_busy_ms_per_token"]]


# ------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the paper's 4 scenarios, the headline methods, 6 prompts x 64 tokens")
    ap.add_argument("--pair", default="bundled", help="bundled | self-noisy:SCALE | DRAFT_DIR:TARGET_DIR | a "
                    "fetched pair name | replay:FILE (default: bundled)")
    ap.add_argument("--replay", action="store_true",
                    help="with a pair name: replay its recording bench/results/replay/NAME.jsonl.gz")
    ap.add_argument("--prompts", default=None, help="prompt set: bundled:N | humaneval:N[:OFFSET] | file:PATH "
                    "(default: bundled:6 for the bundled pair, humaneval:6 for a real one, the recorded prompts "
                    "when replaying)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: by --quick)")
    ap.add_argument("--scenarios", default=None,
                    help=f"comma-separated scenarios, of: {', '.join(ALL_SCENARIOS)} (default: S1-S4; the full "
                         "grid without --quick)")
    ap.add_argument("--verify-ms", type=float, default=25.0, help="pad each verification (emulated GPU target)")
    ap.add_argument("--wire-q", default="auto", choices=["auto", "topk", "full"],
                    help="full = the paper's full-vocabulary q on the wire")
    ap.add_argument("--paper-wire", action="store_true",
                    help="with --wire-q full: scale the uplink so each draft token costs what the paper's "
                         "full-vocabulary q (0.29 MB) cost on the same link")
    ap.add_argument("--k-sweep", default="1,2,3,4,6", help="vanilla SD draft lengths; the best is reported")
    ap.add_argument("--tuner-evals", type=int, default=16)
    ap.add_argument("--tuner-window", type=int, default=32, help="tokens per tuner evaluation")
    ap.add_argument("--cloud-power-w", type=float, default=400.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.paper_wire and args.wire_q != "full":
        ap.error("--paper-wire needs --wire-q full (it emulates the cost of the paper's full-q bytes)")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    try:
        args.pair_obj = parse_pair(args.pair, args.replay)
    except ValueError as e:
        ap.error(str(e))
    try:
        args.ks = sorted({int(k) for k in args.k_sweep.split(",")})
        if not args.ks or min(args.ks) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--k-sweep: comma-separated draft lengths >= 1, got {args.k_sweep!r}")
    if args.scenarios:
        names = [s for s in args.scenarios.split(",") if s]
        bad = [s for s in names if s not in ALL_SCENARIOS]
        if bad:
            ap.error(f"unknown scenario(s) {', '.join(bad)}; choose from {', '.join(ALL_SCENARIOS)}")
        args.scenario_list = [ALL_SCENARIOS[s] for s in names]
    else:
        args.scenario_list = PAPER if args.quick else PAPER + GRID
    if any(s.live for s in args.scenario_list):
        p = args.pair_obj
        if p.replayed or not (p.draft_gguf and p.target_gguf):
            ap.error("live-gguf needs a live pair with GGUF files (a fetched pair name, not replayed)")
    from pipesd.edge.config import METHODS

    known = set(METHODS) | {"pipesd-tuned"} | set(ADAPTIVE_BUDGETS) | set(LOOKUP_METHODS)
    args.method_list = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else FULL_METHODS)
    bad = [m for m in args.method_list if m not in known]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")
    if args.pair_obj.replayed:
        bad = [m for m in args.method_list if m in ("pipesd-tuned",)]
        if bad:
            ap.error("pipesd-tuned warms up on other generations than the recorded ones: not with a replay")
        lookup = [m for m in args.method_list if m in LOOKUP_METHODS]
        if lookup and args.methods:
            ap.error(f"{', '.join(lookup)}: a replayed draft serves its recorded sequences only, and a wrong lookup "
                     "token leaves them (run the live pair)")
        if lookup:  # the default list: left out, and the adaptive edge offers no lookup candidate either
            print(f"note: {', '.join(lookup)} left out: a replay cannot run prompt-lookup proposals", flush=True)
            args.method_list = [m for m in args.method_list if m not in LOOKUP_METHODS]
    return ap, args


def default_prompts(args, draft) -> list[str]:
    from pipesd.prompts import load_prompt_set

    if args.prompts:
        return load_prompt_set(args.prompts)
    if args.pair_obj.replayed:
        return list(draft.recorded_prompts)
    return load_prompt_set("humaneval:6" if args.pair_obj.real else "bundled:6")


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from pipesd.edge import EdgeClient

    pair = args.pair_obj
    n_new = args.max_new_tokens
    try:
        draft = load_draft(pair.draft, threads=1)
        prompts = default_prompts(args, draft)
    except ValueError as e:
        ap.error(str(e))
    if pair.replayed and getattr(draft, "pair_name", None):
        pair.label = draft.pair_name
    prompt_label = args.prompts or ("recorded prompts" if pair.replayed else
                                    ("humaneval:6" if pair.real else "bundled:6"))
    print(f"pair: {pair.label}; prompts: {prompt_label} ({len(prompts)}) x {n_new} tokens; "
          f"methods: {', '.join(args.method_list)}", flush=True)
    refs: dict[str, Reference] = {}  # the target in this process, loaded when first needed
    t_start = time.time()
    servers: dict[tuple, tuple] = {}
    rows, gen_rows, timelines = [], [], {}
    try:
        for sc in args.scenario_list:
            key = ("gguf", 0.0) if sc.live else ("torch", args.verify_ms)
            if key not in servers:
                servers[key] = start_server_subprocess(pair.target, threads=1, verify_pad_ms=key[1],
                                                       auth_token="bench", timeout_s=600,
                                                       target_gguf=pair.target_gguf if sc.live else None)
            proc, port = servers[key]
            edge_draft = draft
            if sc.live:
                edge_draft = load_draft(None, threads=1, gguf=pair.draft_gguf)
                if "gguf" not in refs:
                    refs["gguf"] = Reference(load_target(pair.target, threads=1, gguf=pair.target_gguf),
                                             TIE_TOL["gguf"])
            elif "torch" not in refs:
                refs["torch"] = Reference(load_target(pair.target, threads=1), TIE_TOL["torch"])
            ref = refs[key[0]]
            print(f"== {sc.name}: draft {'live' if sc.live else f'{sc.draft_ms:.0f} ms/token'}, link {sc.link} "
                  f"({sc.note})", flush=True)
            link = make_link(sc.link, up_scale=uplink_scale(args, draft.vocab_size))
            with EdgeClient(f"127.0.0.1:{port}", edge_draft, auth_token="bench", link=link) as client:
                client.generate(prompts[0], 8)  # warm-up
                sc_rows, per_gen = {}, {}
                for method in args.method_list:
                    t0 = time.time()
                    if method in K_SWEPT:
                        best = None
                        for k in args.ks:
                            gens = run_method(client, link, method, prompts, n_new, sc, args, k=k)
                            ex = [ref.exact(g, n_new) for g in gens]
                            r = summarise(sc, method, gens, args, ex, {"k": k})
                            gen_rows += [gen_row(sc, method, i, g, e, {"k": k}, ref) for i, (g, e) in
                                         enumerate(zip(gens, ex))]
                            if best is None or r["tpt_s"] < best[0]["tpt_s"]:
                                best = (r, gens)
                        row, gens = best
                    elif method in ADAPTIVE_BUDGETS:
                        gens, extra = adaptive_run(client, link, method, prompts, n_new, sc, args)
                        ex = [ref.exact(g, n_new) for g in gens]
                        row = summarise(sc, method, gens, args, ex, extra)
                        gen_rows += [gen_row(sc, method, i, g, e, {"schedule": g.stats.schedule}, ref)
                                     for i, (g, e) in enumerate(zip(gens, ex))]
                    elif method == "pipesd-tuned":
                        gens, extra = tuned_run(port, edge_draft, link, sc, prompts, n_new, args)
                        ex = [ref.exact(g, n_new) for g in gens]
                        row = summarise(sc, method, gens, args, ex, extra)
                        gen_rows += [gen_row(sc, method, i, g, e, ref=ref) for i, (g, e) in enumerate(zip(gens, ex))]
                    else:
                        kw = {"record_timeline": True} if method == "pipesd" else {}
                        gens = run_method(client, link, method, prompts, n_new, sc, args, **kw)
                        ex = [ref.exact(g, n_new) for g in gens] if method not in NOT_TARGET_OUTPUT else \
                            [None] * len(gens)
                        row = summarise(sc, method, gens, args, ex)
                        gen_rows += [gen_row(sc, method, i, g, e, ref=ref) for i, (g, e) in enumerate(zip(gens, ex))]
                        if method == "pipesd":
                            timelines[sc.name] = gens[0].stats.timeline
                    sc_rows[method], per_gen[method] = row, [g.stats.tpt_s for g in gens]
                    row["near_ties"] = sum(len(ref.ties.get(id(g), [])) for g in gens)
                    flag = ("" if row["exact"] in (True, None) else "  NOT EXACT") + \
                        (f"  ({row['near_ties']} near-tie divergence(s))" if row["near_ties"] else "")
                    print(f"   {method:18s} TPT {row['tpt_s'] * 1e3:7.1f} ms  (bound {row['bound_tpt_s'] * 1e3:6.1f}, "
                          f"cloud {row['cloud_busy_ms_per_token']:5.1f} ms/tok, acc {row['accepted_mean']:.2f}, "
                          f"{time.time() - t0:.0f} s){flag}", flush=True)
                for m, r in sc_rows.items():
                    for base in ("vanilla-sd", "cloud-stream"):
                        if base in per_gen:
                            pt, lo, hi = ratio_ci(per_gen[base], per_gen[m])
                            r[f"speedup_vs_{base}"] = [pt, lo, hi]
                    r["efficiency_vs_bound"] = r["bound_tpt_s"] / r["tpt_s"] if r["tpt_s"] else None
                scen_rows = list(sc_rows.values())
                for r in scen_rows:
                    r["dominated_by"] = dominated_by(r, scen_rows)
                rows += scen_rows
    finally:
        for proc, _ in servers.values():
            stop_process(proc)
    header = {"machine": machine(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "pair": pair.label, "mode": "replayed" if pair.replayed else "live",
              "settings": {"quick": args.quick, "prompts": prompt_label, "n_prompts": len(prompts),
                           "max_new_tokens": n_new, "verify_pad_ms": args.verify_ms, "wire_q": args.wire_q,
                           "k_sweep": args.ks, "paper_wire": args.paper_wire,
                           "uplink_scale": uplink_scale(args, draft.vocab_size), "edge_threads": 1,
                           "cloud_threads": 1, "cloud_power_w_model": args.cloud_power_w,
                           "s4": "trace origin reset at the start of every generation"},
              "all_exact": all(r["exact"] in (True, None) for r in rows),
              "near_ties": [{"scenario": g["scenario"], "method": g["method"], "prompt": g["prompt"], **t}
                            for g in gen_rows for t in g.get("ties", [])],
              "tie_tol": {k: r.tie_tol for k, r in refs.items()},
              "wall_s": time.time() - t_start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("quick" if args.quick else "full") + ("" if pair.tag == "bundled" else "-" + pair.tag) + \
        ("-fullq" if args.wire_q == "full" else "") + ("-paperwire" if args.paper_wire else "") + \
        ("-" + "-".join(s.name for s in args.scenario_list) if args.scenarios else "")
    (out / f"e2e-{tag}.json").write_text(json.dumps({"header": header, "rows": rows, "generations": gen_rows,
                                                     "timelines": timelines}, indent=1, default=float))
    md = markdown(header, rows)
    (out / f"e2e-{tag}.md").write_text(md)
    print(md)
    try:
        plots(rows, timelines, out, tag, header)
    except ImportError as e:  # matplotlib missing: say so, the table stands
        print(f"(plots skipped: {e})")
    print(f"wrote {out}/e2e-{tag}.{{md,json,png}} in {header['wall_s'] / 60:.1f} min")
    if not header["all_exact"]:
        bad = sorted({(r["scenario"], r["method"]) for r in rows if r["exact"] is False})
        print(f"ERROR: greedy output differs from the target's for {bad}", file=sys.stderr)
        return 1
    return 0


def _ties_note(header) -> str:
    ties = header.get("near_ties") or []
    if not ties:
        return ""
    return (f" (up to {len(ties)} near-tie divergence(s) of the reference, top-2 logit margin at most "
            f"{max(t['margin'] for t in ties):.3g}, within the backend's tolerance {header['tie_tol']}, each followed by the target's greedy "
            "from there; the JSON lists them, docs/benchmark.md 'Exactness' says why)")


def markdown(header, rows) -> str:
    s = header["settings"]
    lines = [f"# PipeSD end-to-end benchmark ({'quick' if s['quick'] else 'full'}): {header['pair']}", "",
             f"pair: **{header['pair'].removesuffix(' (' + header['mode'] + ')')}** ({header['mode']}); prompts: {s['prompts']} ({s['n_prompts']}) x "
             f"{s['max_new_tokens']} tokens",
             f"machine: {header['machine']['processor']}, {header['machine']['cpus']} CPUs, "
             f"{header['machine']['platform']}; commit {header['commit']}; {header['date']}; "
             f"{header['wall_s'] / 60:.1f} min",
             f"settings: {json.dumps(s)}",
             f"every greedy output equal to the target's: {'yes' if header['all_exact'] else 'NO'}"
             + _ties_note(header), "",
             "TPT: median over generations [bootstrap 95% interval]. Speedups: ratio of medians [paired bootstrap "
             "95%]. Cloud cost per token: verification busy ms, token-forwards, J (model: busy x power). "
             "'faster & cheaper' lists the methods that beat a row on both TPT and cloud busy time.", "",
             "| scenario | method | TPT ms [95%] | vs vanilla best K | vs cloud-stream | cloud ms/tok | fwd/tok | "
             "J/tok (model) | bound ms | eff. | acc. len | verif/100 | B/tok | faster & cheaper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    def ratio(r, key):
        v = r.get(key)
        return "-" if not v else f"{v[0]:.2f}x [{v[1]:.2f}-{v[2]:.2f}]"

    for r in rows:
        name = r["method"] + (f" (K={r['k']})" if "k" in r else "") + ("" if r["exact"] in (True, None) else " **NOT EXACT**") \
            + (f" ({r['near_ties']} near-tie)" if r.get("near_ties") else "")
        lo, hi = r["tpt_ci95_s"]
        lines.append(f"| {r['scenario']} | {name} | {r['tpt_s'] * 1e3:.1f} [{lo * 1e3:.1f}-{hi * 1e3:.1f}] | "
                     f"{ratio(r, 'speedup_vs_vanilla-sd')} | {ratio(r, 'speedup_vs_cloud-stream')} | "
                     f"{r['cloud_busy_ms_per_token']:.1f} | {r['cloud_forwards_per_token']:.2f} | "
                     f"{f(r['energy_j_per_token'], '{:.2f}')} | {r['bound_tpt_s'] * 1e3:.1f} | "
                     f"{f(r['efficiency_vs_bound'], '{:.2f}')} | {r['accepted_mean']:.2f} | "
                     f"{r['verifications_per_100']:.1f} | {r['bytes_per_token']:.0f} | "
                     f"{', '.join(r.get('dominated_by', [])) or '-'} |")
    picks = [r for r in rows if r.get("schedules") or r.get("lookup_share")]
    if picks:
        lines += ["", "Schedules the adaptive edge ran (one per measured generation) and prompt-lookup proposals "
                  "(share of drafts, and of those verified the share equal to the target's token):", "",
                  "| scenario | method | schedules | lookup share | lookup precision |", "|---|---|---|---|---|"]
        for r in picks:
            sched = ", ".join(f"{n} x{c}" for n, c in Counter(r.get("schedules") or []).items()) or "-"
            lines.append(f"| {r['scenario']} | {r['method']} | {sched} | {r.get('lookup_share', 0):.2f} | "
                         f"{f(r.get('lookup_precision'), '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def plots(rows, timelines, out: Path, tag: str, header: Optional[dict] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{header['pair']}" if header else ""
    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    meths = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "vanilla-sd"))
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(scen)), 4.2))
    w = 0.8 / max(1, len(meths))
    for i, m in enumerate(meths):
        rs = [next((r for r in rows if r["scenario"] == s and r["method"] == m), None) for s in scen]
        ys = [r["speedup_vs_vanilla-sd"][0] if r and r.get("speedup_vs_vanilla-sd") else 0 for r in rs]
        err = [[max(0, y - r["speedup_vs_vanilla-sd"][1]) if r and r.get("speedup_vs_vanilla-sd") else 0
                for y, r in zip(ys, rs)],
               [max(0, r["speedup_vs_vanilla-sd"][2] - y) if r and r.get("speedup_vs_vanilla-sd") else 0
                for y, r in zip(ys, rs)]]
        ax.bar([j + i * w for j in range(len(scen))], ys, w, yerr=err, capsize=2, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(scen))])
    ax.set_xticklabels(scen, rotation=15)
    ax.set_ylabel("speedup over vanilla SD at best K\n(TPT ratio, 95% interval)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"e2e-{tag}-speedup.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(scen), figsize=(4.2 * len(scen), 4), squeeze=False)
    for ax, s in zip(axes[0], scen):
        rs = [r for r in rows if r["scenario"] == s and r["method"] not in NOT_TARGET_OUTPUT]
        front = sorted((r for r in rs if not r.get("dominated_by")), key=lambda r: r["cloud_busy_ms_per_token"])
        for r in rs:
            lo, hi = r["tpt_ci95_s"]
            y = r["tpt_s"] * 1e3
            ax.errorbar(r["cloud_busy_ms_per_token"], y, yerr=[[y - lo * 1e3], [hi * 1e3 - y]], fmt="o", ms=4,
                        capsize=2, color="C3" if r["method"] == "pipesd" else "C0")
            ax.annotate(r["method"], (r["cloud_busy_ms_per_token"], y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        if front:
            ax.step([r["cloud_busy_ms_per_token"] for r in front], [r["tpt_s"] * 1e3 for r in front], where="post",
                    color="k", lw=0.7, alpha=0.6)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("cloud busy ms per token")
        ax.set_ylabel("TPT ms (median, 95%)")
    fig.suptitle(f"Pareto: TPT vs cloud cost ({title}); line: the non-dominated methods", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"e2e-{tag}-pareto.png", dpi=120)
    plt.close(fig)
    if timelines:
        from pipesd.timeline import plot_timeline  # the same plot as `pipesd timeline RUN.json`

        name, tl = next(iter(timelines.items()))
        plot_timeline(tl, out / f"e2e-{tag}-timeline.png", f"PipeSD timeline, {name}, first prompt ({title})")


def replot(json_path: str) -> None:
    """Redraw the plots of a results JSON (``python bench/e2e/run.py --replot FILE``)."""
    p = Path(json_path)
    d = json.loads(p.read_text())
    plots(d["rows"], d.get("timelines", {}), p.parent, p.stem[len("e2e-"):], d.get("header"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
