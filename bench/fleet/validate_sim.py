"""The fleet simulator against the measured multi-edge curve.

    python bench/fleet/validate_sim.py                        # bench/results/fleet-curve.json
    python bench/fleet/validate_sim.py --curve X.json --tag=-smoke

Reads the curve written by ``bench/fleet/run.py`` and, per (replicas, mode), runs
:func:`pipesd.sim.simulate_fleet` with the bench's settings (edges, tokens per generation,
seconds per point, batching cap, least-loaded routing). What is taken from the measurement
(calibration) and what is predicted:

- the replica's cost curve: :meth:`pipesd.sim.CostCurve.fit` on the server's counters of every
  point with that replica count (launches, verifications, scored tokens, busy seconds), the
  padding floor from ``--verify-ms``;
- the edge: :meth:`pipesd.sim.EdgeModel.from_measured` on the N = 1 point of the same mode
  (its TPT, tokens and drafts per verification);
- predicted: goodput and TPT p50/p99 at every N >= 2 (N = 1 is listed, fitted by construction).

Writes ``bench/results/fleet-sim-validation{tag}.{md,json}``: per-N relative errors and whether
goodput and TPT p50 are within ``--tolerance`` (15%) for N <= 32.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from pipesd.sim import CostCurve, EdgeModel, FleetConfig, simulate_fleet

ROOT = Path(__file__).resolve().parents[2]
SERIAL = ("vanilla-sd", "dual-no-pipeline", "hsl")


def rel(sim: float, meas: float) -> float:
    return (sim - meas) / meas if meas and math.isfinite(meas) and math.isfinite(sim) else float("nan")


def validate(doc: dict, tolerance: float = 0.15, max_n: int = 32, seed: int = 0) -> dict:
    st = doc["header"]["settings"]
    floor = st.get("verify_ms", 0.0) / 1e3
    rows_out, fits = [], {}
    for r in sorted({p["replicas"] for p in doc["points"]}):
        pts_r = [p for p in doc["points"] if p["replicas"] == r]
        for mode in sorted({p["mode"] for p in pts_r}):
            pts = sorted((p for p in pts_r if p["mode"] == mode), key=lambda p: p["n_edges"])
            one = next((p for p in pts if p["n_edges"] == 1), None)
            if one is None or not one["generations"] or not one["server"]["launches"]:
                continue
            rows = [(p["server"]["launches"], p["server"]["verifications"], p["server"]["target_forwards"],
                     p["server"]["busy_s"]) for p in pts]
            cost = CostCurve.fit(rows, floor_s=floor, label=f"fit to the measured server, {r} replica(s), {mode}")
            if mode == "stream":  # the stream's per-token time outside the launch: the replica's gap
                busy1 = one["server"]["busy_s"] / one["server"]["launches"]
                cost = dataclasses.replace(cost, gap_s=max(0.0, one["tpt_mean_s"] - busy1))
                em = EdgeModel.from_measured(one["tpt_mean_s"], 1.0, 0.0, cost.time(1, 1), label="stream")
            else:
                dpv = one["drafts_per_verification"]
                em = EdgeModel.from_measured(one["tpt_mean_s"], one["tokens_per_verification"], dpv,
                                             cost.time(1, dpv + 1), pipelined=one["method"] not in SERIAL)
            fits[f"{r}/{mode}"] = cost
            for p in pts:
                cfg = FleetConfig(p["n_edges"], em, cost, replicas=r, routing="least-loaded",
                                  mode="stream" if mode == "stream" else "sd",
                                  max_batch_sessions=1 if mode == "nobatch" else 32, max_new=st["max_new_tokens"],
                                  duration_s=st["duration"], seed=seed)
                s = simulate_fleet(cfg)
                e = {"goodput": rel(s.goodput_tok_s, p["goodput_tok_s"]), "tpt_p50": rel(s.tpt_p50_s, p["tpt_p50_s"]),
                     "tpt_p99": rel(s.tpt_p99_s, p["tpt_p99_s"]),
                     "sessions_per_launch": rel(s.sessions_per_launch, p["sessions_per_launch"])}
                ok = (p["n_edges"] > max_n or p["n_edges"] == 1 or
                      (abs(e["goodput"]) <= tolerance and abs(e["tpt_p50"]) <= tolerance))
                rows_out.append({"replicas": r, "mode": mode, "n_edges": p["n_edges"], "measured": {
                    k: p[k] for k in ("goodput_tok_s", "tpt_p50_s", "tpt_p99_s", "sessions_per_launch")},
                    "simulated": {"goodput_tok_s": s.goodput_tok_s, "tpt_p50_s": s.tpt_p50_s, "tpt_p99_s": s.tpt_p99_s,
                                  "sessions_per_launch": s.sessions_per_launch}, "rel_error": e,
                    "calibration_point": p["n_edges"] == 1, "within_tolerance": ok})
    predicted = [x for x in rows_out if not x["calibration_point"] and x["n_edges"] <= max_n]
    return {"curve_header": doc["header"], "tolerance": tolerance, "max_n": max_n,
            "cost_fits": {k: dataclasses.asdict(c) for k, c in fits.items()}, "rows": rows_out,
            "all_within": bool(predicted) and all(x["within_tolerance"] for x in predicted),
            "max_abs_error": {k: max((abs(x["rel_error"][k]) for x in predicted
                                      if math.isfinite(x["rel_error"][k])), default=float("nan"))
                              for k in ("goodput", "tpt_p50", "tpt_p99")}}


def write(res: dict, out: Path, tag: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"fleet-sim-validation{tag}.json", out / f"fleet-sim-validation{tag}.md"
    j.write_text(json.dumps(res, indent=1))
    h = res["curve_header"]
    md = ["# The fleet simulator against the measured curve", "",
          f"curve: commit {h['commit']}, {h['date']}, {h['machine']['platform']}, {h['machine']['cpus']} CPUs, "
          f"pair {h['pair']}", f"settings: `{json.dumps(h['settings'])}`", "",
          "Calibrated from the measurement: each replica count's cost curve (fit to the server's counters) and "
          "each mode's N = 1 edge; predicted: every N >= 2.", ""]
    for r, c in res["cost_fits"].items():
        md.append(f"- cost fit, {r} (replicas/mode): base {c['base_s'] * 1e3:.3f} ms + {c['per_session_s'] * 1e3:.3f} ms/session"
                  f" + {c['per_token_s'] * 1e3:.4f} ms/token, floor {c['floor_s'] * 1e3:.1f} ms, gap {c['gap_s'] * 1e3:.2f} ms")
    md += ["", "| replicas | mode | N | goodput meas | sim | err | TPT p50 meas ms | sim | err | TPT p99 err | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in res["rows"]:
        me, si, e = x["measured"], x["simulated"], x["rel_error"]
        md.append(f"| {x['replicas']} | {x['mode']} | {x['n_edges']}{' (cal.)' if x['calibration_point'] else ''} | "
                  f"{me['goodput_tok_s']:.1f} | {si['goodput_tok_s']:.1f} | {e['goodput']:+.1%} | "
                  f"{me['tpt_p50_s'] * 1e3:.1f} | {si['tpt_p50_s'] * 1e3:.1f} | {e['tpt_p50']:+.1%} | "
                  f"{e['tpt_p99']:+.1%} | {'yes' if x['within_tolerance'] else 'NO'} |")
    mx = res["max_abs_error"]
    md += ["", f"verdict: {'PASS' if res['all_within'] else 'FAIL'}: goodput and TPT p50 within "
           f"{res['tolerance']:.0%} for 2 <= N <= {res['max_n']} (max |error|: goodput {mx['goodput']:.1%}, "
           f"TPT p50 {mx['tpt_p50']:.1%}, TPT p99 {mx['tpt_p99']:.1%})"]
    m.write_text("\n".join(md) + "\n")
    return [j, m]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curve", default=str(ROOT / "bench" / "results" / "fleet-curve.json"))
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--max-n", type=int, default=32)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    try:
        doc = json.loads(Path(args.curve).read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--curve: cannot read {args.curve}: {e}")
    res = validate(doc, args.tolerance, args.max_n)
    for p in write(res, Path(args.out), args.tag):
        print(f"validate: wrote {p}", file=sys.stderr)
    print(Path(args.out, f"fleet-sim-validation{args.tag}.md").read_text())
    return 0 if res["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
