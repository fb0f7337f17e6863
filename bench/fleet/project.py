"""Projection: edges served per GPU at a TPT SLO, and 100 to 10,000 edges over R replicas.

    python bench/fleet/project.py            # ~1-2 min CPU; bench/results/fleet-projection.{md,json,png}

**Pure simulation** (:mod:`pipesd.sim`), no measurement: the replica is the MODELLED H200 cost
curve of a 7B target (:meth:`pipesd.sim.CostCurve.h200_7b`; no GPU was lent to measure one), the
edge is the single-edge model of :mod:`pipesd.tuning.sim` (its default laptop-class edge: 30 ms
per draft step, a 15 ms top-k link; PipeSD at the default trigger, vanilla SD serial with k
drafts), admission caps a replica at ``--max-sessions`` open sessions (KV memory: ~0.5 GB per
1k-token session of a 7B model in ~125 GB left beside the weights). Edges generate back to back
(the worst case: every edge always active).

SLO: a mode's TPT p99 at most ``--slo`` (1.5) times its own single-edge TPT on an idle replica.
Edges per GPU: the largest N one replica serves within the SLO (bisection). Then for each fleet
size the replicas needed (N / edges per GPU, rounded up) and a simulated check of that fleet with
least-loaded routing (and consistent hashing for comparison).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from pipesd.sim import CostCurve, EdgeModel, FleetConfig, simulate_fleet

ROOT = Path(__file__).resolve().parents[2]
FLEETS = (100, 300, 1000, 3000, 10000)


def edge_models() -> dict:
    """The modelled edges, by method."""
    from pipesd.edge.config import EdgeConfig
    from pipesd.edge.trigger import TriggerConfig

    t = TriggerConfig()
    pipesd = EdgeModel.from_single_edge(t.tau_seq, t.tau_tok, label="PipeSD (pipelined, dual trigger)")
    return {"pipesd": pipesd,
            "vanilla-sd": EdgeModel.from_single_edge(0.0, 0.0, pipeline=False, batching="trigger",
                                                     max_draft=EdgeConfig.k, label=f"vanilla SD (serial, k={EdgeConfig.k})"),
            "cloud-stream": dataclasses.replace(pipesd, label="cloud streaming (the same link)")}


def run(method: str, em: EdgeModel, n: int, r: int, args, routing: str = "least-loaded"):
    stream = method == "cloud-stream"
    cfg = FleetConfig(n, em, CostCurve.h200_7b(), replicas=r, routing=routing, mode="stream" if stream else "sd",
                      max_batch_sessions=args.max_batch, max_sessions_per_replica=args.max_sessions,
                      max_new=args.max_new, duration_s=args.stream_duration if stream else args.duration, seed=args.seed)
    return simulate_fleet(cfg)


def per_gpu(method: str, em: EdgeModel, slo_s: float, args) -> tuple[int, list]:
    """Largest N one replica serves with TPT p99 <= slo_s (and nobody refused); the probes."""
    probes = []

    def ok(n: int) -> bool:
        res = run(method, em, n, 1, args)
        good = res.tpt_p99_s <= slo_s and res.refused == 0
        probes.append({"n": n, "tpt_p99_s": res.tpt_p99_s, "goodput_tok_s": res.goodput_tok_s, "ok": good})
        return good

    lo, hi = 1, 2
    while hi <= args.max_sessions and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, args.max_sessions + 1)
    while hi - lo > max(1, lo // 50):  # 2% resolution
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, probes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slo", type=float, default=1.5, help="TPT p99 bound as a multiple of the single-edge TPT")
    ap.add_argument("--max-sessions", type=int, default=240, help="admission: open sessions per replica (KV memory)")
    ap.add_argument("--max-batch", type=int, default=256, help="sessions per launch")
    ap.add_argument("--max-new", type=int, default=64, help="tokens per generation")
    ap.add_argument("--duration", type=float, default=8.0, help="simulated seconds (SD modes)")
    ap.add_argument("--stream-duration", type=float, default=1.0, help="simulated seconds (streaming)")
    ap.add_argument("--fleets", default=",".join(map(str, FLEETS)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.slo <= 1 or args.max_sessions < 1 or args.max_batch < 1 or args.max_new < 1:
        ap.error("--slo must be > 1; --max-sessions, --max-batch, --max-new >= 1")
    fleets = [int(x) for x in args.fleets.split(",")]
    t_start = time.process_time()
    cost = CostCurve.h200_7b()
    models = edge_models()
    out: dict = {"cost_model": cost.__dict__, "settings": vars(args), "methods": {}}
    for method, em in models.items():
        one = run(method, em, 1, 1, args)
        slo = args.slo * one.tpt_mean_s
        cap, probes = per_gpu(method, em, slo, args)
        at_cap = run(method, em, cap, 1, args)
        rows = []
        for n in fleets:
            r = math.ceil(n / cap)
            ll = run(method, em, n, r, args)
            hh = run(method, em, n, r, args, routing="hash")
            rows.append({"edges": n, "replicas": r, "tpt_p99_s": ll.tpt_p99_s, "goodput_tok_s": ll.goodput_tok_s,
                         "meets_slo": ll.tpt_p99_s <= slo and ll.refused == 0, "hash_tpt_p99_s": hh.tpt_p99_s,
                         "hash_refused": hh.refused, "hash_meets_slo": hh.tpt_p99_s <= slo and hh.refused == 0})
            print(f"project: {method:12s} {n:6d} edges on {r:4d} replicas: p99 {ll.tpt_p99_s * 1e3:6.1f} ms "
                  f"(SLO {slo * 1e3:.1f}), hash p99 {hh.tpt_p99_s * 1e3:6.1f} ms", file=sys.stderr, flush=True)
        out["methods"][method] = {"edge": em.label, "single_edge_tpt_s": one.tpt_mean_s, "slo_tpt_p99_s": slo,
                                  "edges_per_gpu": cap, "goodput_per_gpu_tok_s": at_cap.goodput_tok_s,
                                  "tpt_p99_at_capacity_s": at_cap.tpt_p99_s, "probes": probes, "fleets": rows}
    out["cpu_s"] = time.process_time() - t_start
    o = Path(args.out)
    o.mkdir(parents=True, exist_ok=True)
    (o / f"fleet-projection{args.tag}.json").write_text(json.dumps(out, indent=1))
    m = out["methods"]
    md = ["# Fleet projection (SIMULATED, not measured)", "",
          f"Replica: {cost.label}: {cost.base_s * 1e3:.2f} ms + {cost.per_session_s * 1e3:.2f} ms/session + "
          f"{cost.per_token_s * 1e3:.3f} ms/token per launch; at most {args.max_sessions} sessions per replica, "
          f"{args.max_batch} per launch. Edges: the single-edge model (pipesd.tuning.sim defaults), back to back, "
          f"{args.max_new} tokens per generation. SLO: TPT p99 <= {args.slo}x the mode's single-edge TPT.", "",
          "| method | single-edge TPT ms | SLO p99 ms | edges per GPU | bound by | goodput per GPU tok/s |",
          "|---|---|---|---|---|---|"]
    for k, v in m.items():
        bound = "admission (KV memory)" if v["edges_per_gpu"] >= 0.97 * args.max_sessions else "TPT SLO"
        md.append(f"| {k} | {v['single_edge_tpt_s'] * 1e3:.1f} | {v['slo_tpt_p99_s'] * 1e3:.1f} | {v['edges_per_gpu']} | "
                  f"{bound} | {v['goodput_per_gpu_tok_s']:.0f} |")
    md += ["", "| edges | " + " | ".join(f"{k}: replicas / p99 ms (hash p99)" for k in m) + " |",
           "|---|" + "---|" * len(m)]
    for i, n in enumerate(fleets):
        cells = []
        for k, v in m.items():
            row = v["fleets"][i]
            cells.append(f"{row['replicas']} / {row['tpt_p99_s'] * 1e3:.1f}{'' if row['meets_slo'] else ' (over SLO)'} "
                         f"({row['hash_tpt_p99_s'] * 1e3:.1f}{'' if row['hash_meets_slo'] else ', over'})")
        md.append(f"| {n} | " + " | ".join(cells) + " |")
    if "pipesd" in m and "cloud-stream" in m:
        md += ["", f"PipeSD serves {m['pipesd']['edges_per_gpu'] / m['cloud-stream']['edges_per_gpu']:.1f}x the edges "
               "per GPU that cloud streaming does at the same SLO (modelled)."]
    md += ["", f"simulation CPU time: {out['cpu_s']:.0f} s"]
    (o / f"fleet-projection{args.tag}.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for k, v in m.items():
            ax[0].plot([p["n"] for p in sorted(v["probes"], key=lambda p: p["n"])],
                       [p["tpt_p99_s"] * 1e3 for p in sorted(v["probes"], key=lambda p: p["n"])], "o-", label=k)
            ax[0].axhline(v["slo_tpt_p99_s"] * 1e3, ls=":", lw=0.8)
            ax[1].plot(fleets, [r["replicas"] for r in v["fleets"]], "o-", label=k)
        ax[0].set(xscale="log", xlabel="edges on one replica", ylabel="TPT p99 (ms)", title="one modelled H200")
        ax[1].set(xscale="log", yscale="log", xlabel="edges", ylabel="replicas (GPUs) to meet the SLO")
        for a in ax:
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle("SIMULATED: 7B target on a modelled H200 (not measured)")
        fig.tight_layout()
        fig.savefig(o / f"fleet-projection{args.tag}.png", dpi=110)
        plt.close(fig)
    except ImportError:
        print("project: matplotlib missing, no PNG", file=sys.stderr)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
