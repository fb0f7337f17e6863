"""Does the dual threshold ``(tau_seq, tau_tok)`` beat the best single threshold? A grid on the model.

    python bench/tuning/dual_vs_single.py          # both pairs, S1-S4, ~1-2 min on 2 cores

**Pure model, no measurement of time**: every TPT and cloud cost here is ``simulate_tpt``
(validated against the runtime within 3.5%, ``bench/results/tpt-model-validation*.md``) replaying
*measured* draft behaviour: per position of the target's greedy continuation, the draft's
confidence in its token and whether it is the target's token.

- **replayed real pair** (Qwen2.5-Coder 0.5B -> 1.5B): the recording's own trace
  (``bench/results/replay/*.jsonl.gz``, 6 HumanEval prompts x 64 tokens);
- **bundled pair** (``stdlib-code``): the trace measured here on the live models (check-pair's
  two passes, ``bench/tuning/validate.py:traces_for``) on the 6 prompts the benchmark runs.

Costs: the four scenarios of ``bench/e2e/run.py`` as ``e2e-quick*.json`` ran them (draft step
20 / 40 / 80 / 20 ms, verification padded to 25 ms, the ``paper`` link, S4 the ``paper-s4``
trace's mean), wire sizes from the codec (``validate.wire_costs``).

For each pair and scenario, over one grid of ``N`` values per threshold in nines (0, then
``1 - 10**-u`` for u evenly up to 0.995): the best **dual** point (both > 0), the best
**tau_seq-only** (tau_tok = 0, the ``pipe-seq-only`` ablation) and **tau_tok-only** (tau_seq =
0, ``pipe-token-only``), unconstrained and under cloud budgets (cloud busy ms per generated
token). Ratio = best single TPT / best dual TPT (>= 1.05 is what issue 13 asks of the dual).

Writes ``bench/results/dual-vs-single.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from validate import git_commit, replay_traces, traces_for, wire_costs  # noqa: E402

REPLAY = ROOT / "bench" / "results" / "replay" / "qwen2.5-coder-0.5b-1.5b.jsonl.gz"
#: (name, draft ms, link preset): bench/e2e/run.py's PAPER scenarios; verification pad 25 ms.
SCENARIOS = [("S1-laptop", 20.0, "paper"), ("S2-phone", 40.0, "paper"), ("S3-iot", 80.0, "paper"),
             ("S4-dynamic", 20.0, "paper-s4")]
VERIFY_MS = 25.0
#: Cloud budgets, as fractions of what the unconstrained best point spends (cloud busy ms per
#: generated token); None: unconstrained. The cheapest point (fixed K = 16) spends ~0.3-0.45 of it.
BUDGET_FRACTIONS = (0.5, 0.6, 0.75, 0.9, None)


#: Low thresholds added to the nines grid: a less confident draft (the bundled pair) wants them.
LOW = (0.05, 0.1, 0.15, 0.2)


def nines(n: int) -> list[float]:
    """0, :data:`LOW`, then n - 1 values evenly spaced in -log10(1 - tau) up to 0.995."""
    top = -math.log10(1 - 0.995)
    return sorted({0.0, *LOW, *(1 - 10 ** -(top * i / (n - 1)) for i in range(1, n))})


def sim_config(draft_ms: float, link: str):
    from pipesd.tuning import SimConfig

    return SimConfig(gen_s=draft_ms / 1e3, verify_base_s=VERIFY_MS / 1e3, verify_per_token_s=0.0, max_new=64,
                     lookahead=48, **wire_costs(link))


def landscape(traces: list, draft_ms: float, link: str, grid: list[float]) -> list[dict]:
    """Every grid point's modelled TPT (ms) and cloud cost (ms per token)."""
    from pipesd.tuning import simulate_tpt

    cfg = sim_config(draft_ms, link)
    out = []
    for a in grid:
        for b in grid:
            r = simulate_tpt(a, b, cfg, trace=traces)
            out.append({"tau_seq": a, "tau_tok": b, "tpt_ms": r.tpt_s * 1e3, "cloud_ms": r.cloud_busy_per_token_s * 1e3,
                        "drafts_per_verification": r.mean_draft_len})
    return out


def best(points: list[dict], kind: str, budget) -> dict | None:
    # dual: the whole grid (the single-threshold lines are part of it, so dual <= single by
    # construction: the question is by how much); a single threshold: the other one at 0.
    sel = {"dual": lambda p: True,
           "seq-only": lambda p: p["tau_tok"] == 0,
           "tok-only": lambda p: p["tau_seq"] == 0}[kind]
    ok = [p for p in points if sel(p) and (budget is None or p["cloud_ms"] <= budget)]
    return min(ok, key=lambda p: p["tpt_ms"]) if ok else None


def compare(points: list[dict]) -> list[dict]:
    rows = []
    top = min(points, key=lambda p: p["tpt_ms"])["cloud_ms"]
    for frac in BUDGET_FRACTIONS:
        budget = None if frac is None else frac * top
        d, s, t = (best(points, k, budget) for k in ("dual", "seq-only", "tok-only"))
        single = min((x for x in (s, t) if x is not None), key=lambda p: p["tpt_ms"], default=None)
        rows.append({"budget_ms": budget, "budget_fraction": frac, "dual": d, "seq_only": s, "tok_only": t,
                     "ratio_best_single_over_dual": None if d is None or single is None
                     else single["tpt_ms"] / d["tpt_ms"],
                     "ratio_seq_over_dual": None if d is None or s is None else s["tpt_ms"] / d["tpt_ms"],
                     "ratio_tok_over_dual": None if d is None or t is None else t["tpt_ms"] / d["tpt_ms"]})
    return rows


def redundancy(traces: list, seq_pt: dict, tok_pt: dict) -> float:
    """Share of positions where the best tau_seq-only and tau_tok-only triggers fire at the same
    positions, replaying each trace's confidences with a reset after every fire (the trigger's own
    rule, ignoring verdict resets): 1.0 means the two thresholds cut the same runs."""
    from pipesd.edge.trigger import DualThresholdTrigger, TriggerConfig

    same = total = 0
    for tr in traces:
        fires = []
        for a, b in ((seq_pt["tau_seq"], 0.0), (0.0, tok_pt["tau_tok"])):
            trig = DualThresholdTrigger(TriggerConfig(a, b, 16))
            f = []
            for p in tr["confidence"]:
                r = trig.update(p)
                f.append(r is not None)
                if r is not None:
                    trig.reset()
            fires.append(f)
        same += sum(x == y for x, y in zip(*fires))
        total += len(fires[0])
    return same / max(1, total)


def tuner_check(traces: list, grid: list[float], seeds: int) -> list[dict]:
    """The budgeted GP tuner (16 evaluations from the defaults, each the whole replay) searching both
    thresholds, tau_seq only and tau_tok only: its held point's TPT over the grid optimum under the
    budget (S1 and S3; unconstrained and 0.6x the unconstrained optimum's cost)."""
    from pipesd.tuning import BayesTuner, simulate_tpt

    rows = []
    for sc, draft_ms, link in (SCENARIOS[0], SCENARIOS[2]):
        cfg = sim_config(draft_ms, link)
        pts = landscape(traces, draft_ms, link, grid)
        top = min(pts, key=lambda p: p["tpt_ms"])
        for frac in (None, 0.6):
            budget = None if frac is None else frac * top["cloud_ms"]
            ref = best(pts, "dual", budget)["tpt_ms"]
            for active in (("tau_seq", "tau_tok"), ("tau_seq",), ("tau_tok",)):
                runs = []
                for seed in range(seeds):
                    x0 = (0.35 if "tau_seq" in active else 0.0, 0.5 if "tau_tok" in active else 0.0)
                    t = BayesTuner(seed=seed, max_evals=16, x0=x0, active=active, cloud_budget=budget)
                    while not t.converged:
                        p = t.ask()
                        r = simulate_tpt(*p, cfg, trace=traces)
                        t.tell(p, r.tpt_s, cost=r.cloud_busy_per_token_s * 1e3)
                    r = simulate_tpt(*t.best[0], cfg, trace=traces)
                    runs.append({"seed": seed, "point": list(t.best[0]), "tpt_over_grid_best": r.tpt_s * 1e3 / ref,
                                 "cloud_ms": r.cloud_busy_per_token_s * 1e3,
                                 "within_budget": budget is None or r.cloud_busy_per_token_s * 1e3 <= budget})
                rows.append({"scenario": sc, "budget_ms": budget, "budget_fraction": frac, "active": list(active),
                             "runs": runs})
    return rows


def fmt_pt(p) -> str:
    if p is None:
        return "-"
    return f"({p['tau_seq']:.3f}, {p['tau_tok']:.3f}) {p['tpt_ms']:.2f} ms, {p['cloud_ms']:.1f} cl"


def markdown(out: dict) -> str:
    L = ["# Does the dual threshold earn its place? (model output)", "",
         f"Pure model: `simulate_tpt` replaying measured draft traces (no timing measured). {out['machine']}, "
         f"commit {out['commit']}, {out['wall_s']:.0f} s. Written by `bench/tuning/dual_vs_single.py`. Grid: "
         f"{len(out['grid'])} values per threshold (0, 0.05-0.2, and {out['grid_n'] - 1} in nines up to 0.995); "
         "\"best dual\" is the best of the whole grid (the single-threshold lines included), so single / dual >= 1; verification 25 ms; costs of "
         "bench/e2e/run.py's S1-S4. Cells: best (tau_seq, tau_tok), its TPT and its cloud busy ms per token "
         "(\"cl\"). Ratio = best single-threshold TPT / best dual TPT.", ""]
    for pair in out["pairs"]:
        L += [f"## {pair['label']}", "", f"{pair['note']}; greedy agreement {pair['agreement']:.3f}.", "",
              "| scenario | cloud budget ms/token (x unconstrained best's) | best dual | best tau_seq-only | best tau_tok-only | "
              "single / dual | seq / dual | tok / dual |", "|---|---|---|---|---|---|---|---|"]
        for sc in pair["scenarios"]:
            for r in sc["rows"]:
                def f(x):
                    return "-" if x is None else f"{x:.3f}x"
                bud = "none" if r["budget_ms"] is None else f"{r['budget_ms']:.1f} ({r['budget_fraction']:.2f})"
                L.append(f"| {sc['name']} | {bud} | "
                         f"{fmt_pt(r['dual'])} | {fmt_pt(r['seq_only'])} | {fmt_pt(r['tok_only'])} | "
                         f"{f(r['ratio_best_single_over_dual'])} | {f(r['ratio_seq_over_dual'])} | "
                         f"{f(r['ratio_tok_over_dual'])} |")
        L += ["", "Trigger agreement of the best unconstrained single-threshold points (share of positions "
              "where tau_seq-only and tau_tok-only fire alike, replaying the confidences): " +
              ", ".join(f"{sc['name']} {sc['agreement_of_singles']:.3f}" for sc in pair["scenarios"]), ""]
    if out.get("tuner_check"):
        L += ["## The budgeted tuner on the replayed pair (16 evaluations, model)", "",
              "Held point's TPT / the grid optimum under the same budget, per seed; every run's held point "
              "within budget: " + str(all(r["within_budget"] for row in out["tuner_check"] for r in row["runs"])) + ".",
              "", "| scenario | budget ms/token | knobs searched | TPT / grid best (per seed) |", "|---|---|---|---|"]
        for row in out["tuner_check"]:
            bud = "none" if row["budget_ms"] is None else f"{row['budget_ms']:.1f} ({row['budget_fraction']:.1f})"
            L.append(f"| {row['scenario']} | {bud} | {', '.join(row['active'])} | "
                     + ", ".join(f"{r['tpt_over_grid_best']:.3f}" for r in row["runs"]) + " |")
        L.append("")
    L += ["## Verdict", "", out["verdict"], ""]
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, default=21, help="values per threshold (default 21)")
    ap.add_argument("--pairs", default="replay,bundled", help="comma-separated: replay, bundled")
    ap.add_argument("--tuner-seeds", type=int, default=3, help="seeds of the tuner check on the replay (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dual-vs-single"))
    args = ap.parse_args(argv)
    if args.grid < 3:
        ap.error("--grid must be >= 3")
    pairs = [p for p in args.pairs.split(",") if p]
    if not pairs or any(p not in ("replay", "bundled") for p in pairs):
        ap.error(f"--pairs must name replay and/or bundled, got {args.pairs!r}")
    t0 = time.time()
    grid = nines(args.grid)
    out = {"machine": f"{platform.platform()}, {platform.processor() or platform.machine()}", "commit": git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "grid_n": args.grid, "grid": grid, "verify_ms": VERIFY_MS,
           "kind": "model (simulate_tpt on measured traces)", "pairs": []}
    for name in pairs:
        if name == "replay":
            from pipesd.models.replay import load_recording

            rec = load_recording(str(REPLAY))
            traces = replay_traces(rec, 6, 64)
            label, note = f"{rec.pair_name} (replayed real pair)", "the recording's trace, 6 HumanEval prompts x 64 tokens"
        else:
            import torch

            torch.set_num_threads(1)
            from pipesd.launch import PROMPTS, load_draft, load_target

            draft, target = load_draft(None, threads=1), load_target(None, threads=1)
            prompts = [draft.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:6]]
            traces = traces_for(draft, target, prompts, 64)
            label, note = "stdlib-code (bundled pair)", "measured here on the live models, the benchmark's 6 prompts x 64 tokens"
        tr = [{"confidence": t["confidence"], "accepted": t["accepted"]} for t in traces]
        if name == "replay" and args.tuner_seeds > 0:
            out["tuner_check"] = tuner_check(tr, grid, args.tuner_seeds)
        agreement = statistics.mean(a for t in tr for a in t["accepted"])
        entry = {"label": label, "note": note, "agreement": agreement, "scenarios": []}
        for sc, draft_ms, link in SCENARIOS:
            pts = landscape(tr, draft_ms, link, grid)
            rows = compare(pts)
            un = rows[-1]
            entry["scenarios"].append({"name": sc, "draft_ms": draft_ms, "link": link, "rows": rows,
                                       "agreement_of_singles": redundancy(tr, un["seq_only"], un["tok_only"]),
                                       "points_columns": ["tau_seq", "tau_tok", "tpt_ms", "cloud_ms",
                                                          "drafts_per_verification"],
                                       "points": [[round(p[k], 4) for k in ("tau_seq", "tau_tok", "tpt_ms", "cloud_ms",
                                                                            "drafts_per_verification")]
                                                  for p in pts]})
            print(f"{label} {sc}: dual {fmt_pt(un['dual'])}; seq {fmt_pt(un['seq_only'])}; tok {fmt_pt(un['tok_only'])}; "
                  f"single/dual {un['ratio_best_single_over_dual']:.3f}", flush=True)
        out["pairs"].append(entry)
    ratios = [r["ratio_best_single_over_dual"] for p in out["pairs"] for s in p["scenarios"] for r in s["rows"]
              if r["ratio_best_single_over_dual"] is not None]
    seqr = [r["ratio_seq_over_dual"] for p in out["pairs"] for s in p["scenarios"] for r in s["rows"]
            if r["ratio_seq_over_dual"] is not None]
    tokr = [r["ratio_tok_over_dual"] for p in out["pairs"] for s in p["scenarios"] for r in s["rows"]
            if r["ratio_tok_over_dual"] is not None]
    out["summary"] = {"best_single_over_dual": [min(ratios), max(ratios)], "seq_over_dual": [min(seqr), max(seqr)],
                      "tok_over_dual": [min(tokr), max(tokr)], "cells": len(ratios)}
    earns = max(ratios) >= 1.05
    out["verdict"] = (
        f"Over {len(ratios)} (pair, scenario, budget) cells the best single threshold is "
        f"{min(ratios):.3f}-{max(ratios):.3f}x the best dual point's TPT (tau_seq-only {min(seqr):.3f}-"
        f"{max(seqr):.3f}x, tau_tok-only {min(tokr):.3f}-{max(tokr):.3f}x). "
        + ("The dual threshold reaches 1.05x in some cells." if earns else
           "The dual threshold never reaches 1.05x over the better single threshold: on these measured "
           "confidences a second threshold adds nothing the tuner needs. The tuner can search one threshold "
           "(`BayesTuner(active=...)`, `make_online_tuner(..., active=...)`) with the other held at 0."))
    out["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, separators=(",", ":")))
    Path(args.out + ".md").write_text(markdown(out))
    print(out["verdict"])
    print(f"wrote {args.out}.md/.json ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
