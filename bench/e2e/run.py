"""End-to-end benchmark: PipeSD against its baselines on emulated edges and links.

    python bench/e2e/run.py --quick          # < 10 min on a 2-core CPU box
    python bench/e2e/run.py                  # the full grid

The cloud (`pipesd serve`, its own process, one thread) verifies with the bundled target,
each verification padded to ``--verify-ms`` (a 7B-class target on a GPU); the edge (this
process, one thread) drafts with the bundled draft, each step padded to the scenario's
per-token time; the link is emulated in the edge's connection. Every method runs on the
same prompts in the same run; speedups are ratios within the run. Vanilla SD is reported at
its best K per scenario (K swept). Output: a Markdown table, JSON (``rows`` + a header with
machine, commit, settings) and PNG plots under ``bench/results/``.

The ideal-pipeline bound of a run is the TPT it would have if drafting, the wire and
verification never idled: ``max(edge, wire, cloud)`` seconds per generated token, with
edge = draft time x drafts per token, wire = (s x messages + c x tokens sent) / tokens from
the fitted link costs, cloud = verification busy time / tokens. Energy is modelled (busy time
x ``--cloud-power-w``), labelled as such; cloud token-forwards are counted exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipesd.launch import PROMPTS, load_draft, make_link, start_server_subprocess, stop_process

ROOT = Path(__file__).resolve().parents[2]

@dataclass
class Scenario:
    name: str
    draft_ms: float
    link: str  # preset name, or "UPmbps/DELAYms"
    note: str = ""


QUICK = [
    Scenario("S1-laptop", 20, "paper", "default edge, 20/200 Mbit/s"),
    Scenario("S2-phone", 40, "paper", "edge slowed to a phone"),
    Scenario("S3-iot", 80, "paper", "edge slowed to an IoT device"),
    Scenario("S4-dynamic", 20, "paper-s4", "uplink 10-80 Mbit/s, downlink 150-280, every 20 s"),
]
FULL = QUICK + [
    Scenario(f"edge{ms}-{mb}M-{d}ms", ms, f"{mb}/{d}", "grid")
    for ms in (10, 30, 60) for mb, d in ((2, 40), (10, 25), (50, 10))
]

METHODS = ["target-only", "edge-only", "vanilla-sd", "fixed-batch", "single-threshold", "seq-threshold",
           "fixed-k-pipeline", "pipesd", "pipesd-tuned"]
QUICK_METHODS = ["target-only", "vanilla-sd", "fixed-batch", "single-threshold", "seq-threshold", "pipesd",
                 "pipesd-tuned"]


# The paper's wire: each draft token carries its full-vocabulary q, ~0.29 MB (docs/runtime.md,
# "Hints"), about 116 ms per token at 20 Mbit/s (docs/tuning.md, "When pipelining helps"). Our full-q frame for the bundled 1024-token vocabulary is
# 4 bytes per vocabulary entry (dense float32 q, plus 8 for token and prob); --paper-wire scales the uplink
# bandwidth by the ratio, so every byte we send costs what the paper's bytes cost.
PAPER_Q_BYTES_PER_TOKEN = 290_000


def uplink_scale(args, vocab_size: int) -> float:
    """Factor applied to uplink bandwidth (1.0 unless --paper-wire)."""
    if not getattr(args, "paper_wire", False):
        return 1.0
    return (4 * vocab_size + 8) / PAPER_Q_BYTES_PER_TOKEN


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def run_method(client, method, prompts, n_new, sc, args, **cfg_kw):
    from pipesd.edge import EdgeConfig

    cfg = EdgeConfig.for_method(method, draft_step_s=sc.draft_ms / 1e3, wire_q=args.wire_q, offline_policy="fail",
                                **cfg_kw)
    gens = []
    for p in prompts:
        g = client.generate(p, n_new, config=cfg)
        gens.append(g)
    return gens


def tuned_run(port, draft, sc, prompts, n_new, args):
    """pipesd-tuned: an edge with the online Bayesian tuner; tuned on warm-up generations
    (``--tuner-evals`` windows of ``--tuner-window`` tokens), then measured on the prompts."""
    from pipesd.edge import EdgeClient, EdgeConfig

    cfg = EdgeConfig.for_method("pipesd", draft_step_s=sc.draft_ms / 1e3, wire_q=args.wire_q, offline_policy="fail")
    with EdgeClient(f"127.0.0.1:{port}", draft, cfg, auth_token="bench",
                    link=make_link(sc.link, up_scale=uplink_scale(args, draft.vocab_size)), tuner="bayes",
                    tuner_window_tokens=args.tuner_window) as client:
        budget = args.tuner_evals * args.tuner_window * 1.5
        done, i = 0, 0
        while done < budget and not client.tuner.stats().get("converged", False):
            g = client.generate(PROMPTS[i % len(PROMPTS)], 48)
            done += g.stats.new_tokens
            i += 1
        gens = [client.generate(p, n_new) for p in prompts]
        st = client.tuner.stats()
    hist = st.get("history", [])
    return gens, {"tau_seq": gens[-1].stats.tau_seq, "tau_tok": gens[-1].stats.tau_tok,
                  "tuner_evaluations": st.get("evaluations"), "tuner_history": hist, "tuning_tokens": done}


def summarise(scenario, method, gens, args, extra=None) -> dict:
    tpts = [g.stats.tpt_s for g in gens]
    tokens = sum(g.stats.new_tokens for g in gens)
    st = [g.stats for g in gens]
    drafted = sum(s.drafted for s in st)
    busy = sum(s.cloud_busy_s for s in st)
    msgs = sum(s.messages_sent for s in st)
    # Tokens that carried a q (a hint is compared with a bonus, sent without q).
    sent_tokens = sum(sum(s.batch_sizes) - getattr(s, "hints_sent", 0) for s in st)
    g_s = statistics.median([s.cost_g_s for s in st]) if method not in ("target-only",) else 0.0
    s_s = statistics.median([s.cost_s_s for s in st])
    c_s = statistics.median([s.cost_c_s for s in st])
    edge = g_s * drafted / max(1, tokens) if method != "target-only" else 0.0
    wire = (s_s * msgs + c_s * sent_tokens) / max(1, tokens)
    cloud = busy / max(1, tokens)
    bound = max(edge, wire, cloud) if method not in ("edge-only",) else g_s
    row = {
        "scenario": scenario.name, "method": method,
        "tpt_s": statistics.median(tpts), "tpt_min_s": min(tpts), "tpt_max_s": max(tpts),
        "accepted_mean": statistics.mean([s.mean_accepted for s in st]),
        "acceptance_rate": statistics.mean([s.acceptance_rate for s in st]),
        "verifications_per_100": 100 * sum(s.verifications for s in st) / max(1, tokens),
        "rollbacks": sum(s.rollbacks for s in st),
        "cloud_forwards_per_token": sum(s.cloud_forwards for s in st) / max(1, tokens),
        "wasted_forwards_per_token": sum(s.wasted_forwards for s in st) / max(1, tokens),
        "energy_j_per_token": (busy * args.cloud_power_w / max(1, tokens)) if method != "edge-only" else None,
        "energy_source": "model: cloud busy time x %.0f W" % args.cloud_power_w,
        "bytes_per_token": sum(s.bytes_sent for s in st) / max(1, tokens),
        "bound_tpt_s": bound,
        "edge_overhead_us_per_draft": 1e6 * sum(s.edge_overhead_s for s in st) / max(1, drafted),
        "tokens": tokens,
    }
    if extra:
        row.update(extra)
    return row


def start_server(args):
    return start_server_subprocess(None, threads=1, verify_pad_ms=args.verify_ms, auth_token="bench")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 scenarios, fewer methods and tokens (< 10 min)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--verify-ms", type=float, default=25.0, help="pad each verification (emulated GPU target)")
    ap.add_argument("--wire-q", default="auto", choices=["auto", "topk", "full"],
                    help="full = the paper's full-vocabulary q on the wire")
    ap.add_argument("--paper-wire", action="store_true",
                    help="with --wire-q full: scale the uplink so each draft token costs what the paper's "
                         "full-vocabulary q (0.29 MB) cost on the same link")
    ap.add_argument("--k-sweep", default="2,4,6,8", help="vanilla SD draft lengths; the best is reported")
    ap.add_argument("--tuner-evals", type=int, default=16)
    ap.add_argument("--tuner-window", type=int, default=32, help="tokens per tuner evaluation")
    ap.add_argument("--cloud-power-w", type=float, default=400.0)
    ap.add_argument("--pair", default="bundled", help="the draft: bundled | self-noisy:SCALE (the bundled target with weight noise; "
                         "see pipesd.launch.load_draft); the cloud runs the bundled target")
    ap.add_argument("--scenarios", default=None, help="comma-separated scenario names to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.paper_wire and args.wire_q != "full":
        ap.error("--paper-wire needs --wire-q full (it emulates the cost of the paper's full-q bytes)")
    import torch

    torch.set_num_threads(1)
    from pipesd.edge import EdgeClient

    scenarios = QUICK if args.quick else FULL
    if args.scenarios:
        keep = set(args.scenarios.split(","))
        scenarios = [s for s in scenarios if s.name in keep]
    methods = QUICK_METHODS if args.quick else METHODS
    n_prompts = args.prompts or (2 if args.quick else 4)
    n_new = args.max_new_tokens or (40 if args.quick else 64)
    ks = [int(k) for k in args.k_sweep.split(",")] if not args.quick else [2, 4, 6]
    prompts = PROMPTS[:n_prompts]
    draft = load_draft(args.pair)
    t_start = time.time()
    proc, port = start_server(args)
    rows, timelines = [], {}
    try:
        for sc in scenarios:
            print(f"== {sc.name}: draft {sc.draft_ms:.0f} ms/token, link {sc.link} ({sc.note})", flush=True)
            link = make_link(sc.link, up_scale=uplink_scale(args, draft.vocab_size))
            with EdgeClient(f"127.0.0.1:{port}", draft, auth_token="bench", link=link) as client:
                client.generate(prompts[0], 8)  # warm-up
                sc_rows = {}
                for method in methods:
                    t0 = time.time()
                    if method == "vanilla-sd":
                        best = None
                        for k in ks:
                            r = summarise(sc, method, run_method(client, method, prompts, n_new, sc, args, k=k), args,
                                          {"k": k})
                            if best is None or r["tpt_s"] < best["tpt_s"]:
                                best = r
                        row = best
                    elif method == "pipesd-tuned":
                        gens, extra = tuned_run(port, draft, sc, prompts, n_new, args)
                        row = summarise(sc, method, gens, args, extra)
                    else:
                        kw = {"record_timeline": True} if method == "pipesd" else {}
                        gens = run_method(client, method, prompts, n_new, sc, args, **kw)
                        row = summarise(sc, method, gens, args)
                        if method == "pipesd":
                            timelines[sc.name] = gens[0].stats.timeline
                    sc_rows[method] = row
                    print(f"   {method:18s} TPT {row['tpt_s'] * 1e3:7.1f} ms  (bound {row['bound_tpt_s'] * 1e3:6.1f}, "
                          f"acc {row['accepted_mean']:.2f}, {time.time() - t0:.0f} s)", flush=True)
                van = sc_rows.get("vanilla-sd", {}).get("tpt_s")
                tgt = sc_rows.get("target-only", {}).get("tpt_s")
                for r in sc_rows.values():
                    r["speedup_vs_vanilla"] = van / r["tpt_s"] if van else None
                    r["speedup_vs_target"] = tgt / r["tpt_s"] if tgt else None
                    r["efficiency_vs_bound"] = r["bound_tpt_s"] / r["tpt_s"] if r["tpt_s"] else None
                    rows.append(r)
    finally:
        stop_process(proc)
    header = {"machine": machine(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {"quick": args.quick, "prompts": n_prompts, "max_new_tokens": n_new,
                           "verify_pad_ms": args.verify_ms, "wire_q": args.wire_q, "k_sweep": ks,
                           "paper_wire": args.paper_wire, "uplink_scale": uplink_scale(args, draft.vocab_size),
                           "pair": "stdlib-code (bundled)" if args.pair == "bundled" else
                           f"stdlib-code target; draft = {args.pair}", "edge_threads": 1, "cloud_threads": 1,
                           "cloud_power_w_model": args.cloud_power_w},
              "wall_s": time.time() - t_start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("quick" if args.quick else "full") + ("-fullq" if args.wire_q == "full" else "") + \
        ("-paperwire" if args.paper_wire else "") + \
        ("" if args.pair == "bundled" else "-" + args.pair.replace(":", ""))
    (out / f"e2e-{tag}.json").write_text(json.dumps({"header": header, "rows": rows, "timelines": timelines},
                                                    indent=1, default=float))
    md = markdown(header, rows)
    (out / f"e2e-{tag}.md").write_text(md)
    print(md)
    try:
        plots(rows, timelines, out, tag)
    except Exception as e:  # matplotlib missing: say so, the table stands
        print(f"(plots skipped: {e})")
    return 0


def markdown(header, rows) -> str:
    s = header["settings"]
    lines = [f"# PipeSD end-to-end benchmark ({'quick' if s['quick'] else 'full'})", "",
             f"machine: {header['machine']['processor']}, {header['machine']['cpus']} CPUs, "
             f"{header['machine']['platform']}; commit {header['commit']}; {header['date']}",
             f"settings: {json.dumps(s)}", "",
             "| scenario | method | TPT ms (min-max) | vs vanilla | vs target | bound ms | eff. | acc. len | verif/100 | "
             "fwd/tok | J/tok (model) | B/tok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    for r in rows:
        name = r["method"] + (f" (K={r['k']})" if "k" in r else "")
        lines.append(f"| {r['scenario']} | {name} | {r['tpt_s'] * 1e3:.1f} ({r['tpt_min_s'] * 1e3:.0f}-"
                     f"{r['tpt_max_s'] * 1e3:.0f}) | {f(r['speedup_vs_vanilla'], '{:.2f}x')} | "
                     f"{f(r['speedup_vs_target'], '{:.2f}x')} | {r['bound_tpt_s'] * 1e3:.1f} | "
                     f"{f(r['efficiency_vs_bound'], '{:.2f}')} | {r['accepted_mean']:.2f} | "
                     f"{r['verifications_per_100']:.1f} | {r['cloud_forwards_per_token']:.2f} | "
                     f"{f(r['energy_j_per_token'], '{:.2f}')} | {r['bytes_per_token']:.0f} |")
    return "\n".join(lines) + "\n"


def plots(rows, timelines, out: Path, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    meths = [m for m in METHODS if any(r["method"] == m for r in rows) and m not in ("vanilla-sd",)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scen)), 4))
    w = 0.8 / max(1, len(meths))
    for i, m in enumerate(meths):
        ys = [next((r["speedup_vs_vanilla"] or 0 for r in rows if r["scenario"] == s and r["method"] == m), 0)
              for s in scen]
        ax.bar([j + i * w for j in range(len(scen))], ys, w, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(scen))])
    ax.set_xticklabels(scen, rotation=20)
    ax.set_ylabel("speedup over vanilla SD (TPT ratio)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"e2e-{tag}-speedup.png", dpi=120)
    if timelines:
        from pipesd.timeline import plot_timeline  # the same plot as `pipesd timeline RUN.json`

        name, tl = next(iter(timelines.items()))
        plot_timeline(tl, out / f"e2e-{tag}-timeline.png", f"PipeSD timeline, {name}, first prompt")


def replot(json_path: str) -> None:
    """Redraw the plots of a results JSON (``python bench/e2e/run.py --replot FILE``)."""
    p = Path(json_path)
    d = json.loads(p.read_text())
    plots(d["rows"], d.get("timelines", {}), p.parent, p.stem[len("e2e-"):])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
