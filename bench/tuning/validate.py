"""Is ``pipesd.tuning.simulate_tpt`` right? Its predicted TPT against the real runtime's.

    python bench/tuning/validate.py            # bundled pair, 2 scenarios, ~3-5 min on 2 cores
    python bench/tuning/validate.py --pair replay:bench/results/replay/qwen2.5-coder-0.5b-1.5b.jsonl.gz

**Setup** (as ``bench/e2e/run.py`` sets up its runs): the cloud is ``pipesd serve`` in its own
process (one thread) with ``--verify-pad-ms``; the edge is an :class:`pipesd.edge.EdgeClient`
in this process (one thread) with ``draft_step_s`` padding and an emulated link
(:func:`pipesd.launch.make_link`). Each point generates ``--tokens`` greedy tokens from each
of the first ``--prompts`` prompts of :data:`pipesd.launch.PROMPTS`.

**Prediction.** For each prompt, the trace the model replays is measured in this process: the
target's greedy continuation (what the runtime must output, checked) and, at each position,
the draft's confidence and whether its argmax there is the target's token
(``pipesd.checkpair``'s two passes). Two predictions per point: *nominal* costs (the pads and
the link preset, with the wire's exact message sizes from the codec) and *measured* costs (the
edge's own median draft step, ``GenerationStats.cost_g_s``, and the cloud's mean verification
time as the verdicts report it). The ratio predicted / measured is the model's error; it is also
given against the TPT to the last verdict (the model's end point: the runtime's ``wall_s`` adds
the threads' teardown after it).

**Points** per scenario: the defaults (0.35, 0.5); ``(0.99, 0.0)``, what ``check-pair``
suggested when its model was protocol 1; ``check-pair``'s suggestion now (its measured trace
and costs on its own prompts, modelled at the scenario's pads and link); ``(0.0, 0.9)``; and
vanilla SD with K = 4 (the serial mode). The wall-clock check of the suggestion is the
measured TPT of the suggestion over the defaults'.

**A replayed real pair** (``--pair replay:FILE``, docs/models.md "Replay"): the edge and the
cloud serve the recording, the prompts are the recorded ones, and the trace is the recording's
own (the draft's probability of its greedy token along the target's path, and whether it is the
target's token). ``check-pair`` cannot run on a replay (it measures real compute), so its
suggestion is :func:`pipesd.checkpair.suggest` on that trace at the scenario's pads and link:
what check-pair computes from the pair's measured trace, here measured on the same prompts the
points run (in-sample).

Writes ``bench/results/tpt-model-validation.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCENARIOS = [
    {"name": "paper-link", "draft_ms": 30.0, "verify_ms": 25.0, "link": "paper",
     "note": "laptop-class edge, 7B-class cloud GPU, the paper's 20 Mbit/s link"},
    {"name": "slow-link", "draft_ms": 15.0, "verify_ms": 40.0, "link": "slow",
     "note": "fast edge, slower cloud, a 2 Mbit/s 40 ms link"},
]
K_SERIAL = 4


def wire_costs(link_name: str) -> dict:
    """The model's wire costs for a link preset, from the codec's real message sizes (greedy:
    no q on the wire, so a hint costs as much as any draft token)."""
    import numpy as np

    from pipesd.transport import codec
    from pipesd.transport import messages as M
    from pipesd.transport.link import link_preset

    def batch(n: int) -> int:
        return len(codec.encode(M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.zeros(n, np.int32),
                                             probs=np.zeros(n, np.float32), verify=True, hint=False, q_ids=None,
                                             q_probs=None, sent_at=0.0)))
    verdict = len(codec.encode(M.Verdict(session_id=1, epoch=0, start_pos=0, end_pos=4, accepted=2, token=5,
                                         rejected=True, verified_len=3, finished=False, settled=0,
                                         target_forwards=4, verify_s=0.01, echo_sent_at=0.0)))
    up, down = link_preset(link_name)
    per_token = batch(2) - batch(1)
    header = batch(1) - per_token
    c = per_token * 8 / up.bandwidth_bps
    return {"startup_s": up.per_message_s + header * 8 / up.bandwidth_bps, "per_token_s": c, "hint_s": c,
            "delay_s": up.delay_s, "down_s": down.per_message_s + (verdict + 4) * 8 / down.bandwidth_bps}


def traces_for(draft, target, prompts: list, tokens: int) -> list[dict]:
    """Per prompt: the target's greedy continuation and the draft's (confidence, accepted) along it."""
    from pipesd.checkpair import _context_limit, _draft_pass, _target_pass

    limit = _context_limit(tokens, draft.model, target.model)
    out = []
    for ids in prompts:
        passes = _target_pass(target, [ids], tokens, limit)
        tr = _draft_pass(draft, passes, 1, tokens)["trace"]
        out.append({"continuation": passes[0]["cont"], **tr})
    return out


def replay_traces(rec, n_prompts: int, tokens: int) -> list[dict]:
    """The recording's trace per prompt (what :func:`traces_for` measures on live models)."""
    out = []
    for r in rec.prompts[:n_prompts]:
        n = min(tokens, len(r.target))
        out.append({"continuation": list(r.target[:n]), "confidence": [float(e[1]) for e in r.draft[:n]],
                    "accepted": [e[0] == t for e, t in zip(r.draft[:n], r.target[:n])]})
    return out


def run_point(client, prompts, tokens, cfg) -> list:
    return [client.generate(list(ids), tokens, config=cfg) for ids in prompts]


def summarise_runs(gens, traces) -> dict:
    st = [g.stats for g in gens]
    tokens = sum(s.new_tokens for s in st)
    wall = sum(s.wall_s for s in st)
    last = sum(max((e[2] for e in s.timeline if e[0] == "verdict"), default=s.wall_s) for s in st)
    verifs = sum(s.verifications for s in st)
    return {
        "tpt_s": wall / tokens, "tokens": tokens, "wall_s": wall,
        "tpt_to_last_verdict_s": last / tokens,  # without the threads' teardown after it
        "per_prompt_tpt_s": [s.tpt_s for s in st],
        "verifications": verifs, "messages": sum(s.messages_sent for s in st),
        "rollbacks": sum(s.rollbacks for s in st), "bonus_tokens": sum(s.bonus_tokens for s in st),
        "hints": sum(s.hints_sent for s in st),
        "exact": all(list(g.token_ids) == tr["continuation"][:len(g.token_ids)] for g, tr in zip(gens, traces)),
        "gen_s": statistics.median(s.cost_g_s for s in st),
        "verify_s": sum(s.cloud_busy_s for s in st) / max(1, verifs),
        "edge_overhead_per_draft_s": sum(s.edge_overhead_s for s in st) / max(1, sum(s.drafted for s in st)),
    }


def predict(point: dict, traces: list, base: dict, tokens: int) -> dict:
    from pipesd.tuning import SimConfig, simulate_tpt

    cfg = SimConfig(verify_per_token_s=0.0, max_new=tokens, **base)
    tr = [{"confidence": t["confidence"], "accepted": t["accepted"]} for t in traces]
    if point["method"] == "vanilla-sd":
        r = simulate_tpt(0.0, 0.0, cfg, trace=tr, pipeline=False, max_draft=point["k"])
    else:
        r = simulate_tpt(point["tau_seq"], point["tau_tok"], cfg, trace=tr)
    return r.to_dict()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=6, help="prompts per point (default 6)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per generation (default 64)")
    ap.add_argument("--pair", default="bundled",
                    help="bundled (default) or replay:FILE, a real pair's recording (bench/e2e/record.py)")
    ap.add_argument("--out", default=None, help="output path without extension (default: "
                    "bench/results/tpt-model-validation[-replay-NAME])")
    args = ap.parse_args(argv)
    if not 1 <= args.prompts <= 6 or args.tokens < 8:
        ap.error("--prompts must be in 1..6 and --tokens >= 8")
    rec = None
    if args.pair != "bundled":
        if not args.pair.startswith("replay:"):
            ap.error(f"--pair must be bundled or replay:FILE, got {args.pair!r}")
        from pipesd.models.replay import load_recording

        try:
            rec = load_recording(args.pair[len("replay:"):])
        except ValueError as e:
            ap.error(f"--pair {args.pair}: {e}")
        if len(rec.prompts) < args.prompts or any(len(r.target) < args.tokens for r in rec.prompts[:args.prompts]):
            ap.error(f"--pair {args.pair}: the recording holds {len(rec.prompts)} prompts of "
                     f"{min(len(r.target) for r in rec.prompts)}+ tokens; ask for at most that")
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("tpt-model-validation" if rec is None else
                                                      f"tpt-model-validation-replay-{rec.pair_name}"))
    import torch

    torch.set_num_threads(1)
    from pipesd.checkpair import check_pair, suggest
    from pipesd.edge import EdgeClient, EdgeConfig, TriggerConfig
    from pipesd.launch import PROMPTS, load_draft, load_target, make_link, start_server_subprocess, stop_process

    t_start = time.time()
    if rec is None:
        pair_label, serve_model = "stdlib-code (bundled)", None
        draft, target = load_draft(None, threads=1), load_target(None, threads=1)
        prompts = [draft.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:args.prompts]]
        traces = traces_for(draft, target, prompts, args.tokens)
        report = check_pair("stdlib-code:draft", "stdlib-code:target", tokens=32, reps=9, progress=None)
        sug_trace, sug_costs = report.agreement["trace"], report.costs
    else:
        pair_label, serve_model = f"{rec.pair_name} (replayed)", args.pair
        draft = load_draft(args.pair, threads=1)
        prompts = [list(r.prompt_ids) for r in rec.prompts[:args.prompts]]
        traces = replay_traces(rec, args.prompts, args.tokens)
        sug_trace = {k: [x for t in traces for x in t[k]] for k in ("confidence", "accepted")}
        sug_costs = {}  # the scenario's pads replace measured costs
    print(f"{pair_label}: {len(traces)} prompts x {args.tokens} tokens, greedy agreement "
          f"{statistics.mean(a for t in traces for a in t['accepted']):.3f}", flush=True)
    rows, scenarios = [], []
    for sc in SCENARIOS:
        sug = suggest(sug_trace, sug_costs, link=sc["link"], draft_ms=sc["draft_ms"], verify_ms=sc["verify_ms"])
        points = [{"label": "defaults", "method": "pipesd", "tau_seq": 0.35, "tau_tok": 0.5},
                  {"label": "protocol-1 suggestion", "method": "pipesd", "tau_seq": 0.99, "tau_tok": 0.0},
                  {"label": "check-pair suggestion", "method": "pipesd", "tau_seq": sug["tau_seq"],
                   "tau_tok": sug["tau_tok"]},
                  {"label": "token threshold 0.9", "method": "pipesd", "tau_seq": 0.0, "tau_tok": 0.9},
                  {"label": f"vanilla SD K={K_SERIAL}", "method": "vanilla-sd", "k": K_SERIAL}]
        nominal = {"gen_s": sc["draft_ms"] / 1e3, "verify_base_s": sc["verify_ms"] / 1e3, **wire_costs(sc["link"])}
        print(f"== {sc['name']}: draft {sc['draft_ms']:.0f} ms, verify {sc['verify_ms']:.0f} ms, link {sc['link']}; "
              f"check-pair suggests {sug['method']} ({sug['tau_seq']}, {sug['tau_tok']})", flush=True)
        proc, port = start_server_subprocess(serve_model, threads=1, verify_pad_ms=sc["verify_ms"], auth_token="bench")
        try:
            link = make_link(sc["link"])
            with EdgeClient(f"127.0.0.1:{port}", draft, auth_token="bench", link=link) as client:
                client.generate(prompts[0], 8)  # warm-up
                for pt in points:
                    trig = {} if pt["method"] == "vanilla-sd" else {
                        "trigger": TriggerConfig(pt["tau_seq"], pt["tau_tok"])}
                    cfg = EdgeConfig.for_method(pt["method"], draft_step_s=sc["draft_ms"] / 1e3, k=pt.get("k", 4),
                                                offline_policy="fail", record_timeline=True, **trig)
                    meas = summarise_runs(run_point(client, prompts, args.tokens, cfg), traces)
                    measured = {**nominal, "gen_s": meas["gen_s"], "verify_base_s": meas["verify_s"]}
                    p_nom = predict(pt, traces, nominal, args.tokens)
                    p_meas = predict(pt, traces, measured, args.tokens)
                    row = {"scenario": sc["name"], **pt, "measured": meas, "predicted_nominal": p_nom,
                           "predicted_measured_costs": p_meas,
                           "ratio_nominal": p_nom["tpt_s"] / meas["tpt_s"],
                           "ratio_to_last_verdict": p_nom["tpt_s"] / meas["tpt_to_last_verdict_s"],
                           "ratio_measured_costs": p_meas["tpt_s"] / meas["tpt_s"]}
                    rows.append(row)
                    print(f"  {pt['label']:<24} measured {meas['tpt_s'] * 1e3:6.2f} ms  predicted "
                          f"{p_nom['tpt_s'] * 1e3:6.2f} ms (x{row['ratio_nominal']:.3f}), with measured costs "
                          f"{p_meas['tpt_s'] * 1e3:6.2f} ms (x{row['ratio_measured_costs']:.3f}); verifications "
                          f"{meas['verifications']} vs {p_nom['verifications']}, rollbacks {meas['rollbacks']} vs "
                          f"{p_nom['rollbacks']}{'' if meas['exact'] else '  NOT EXACT'}", flush=True)
        finally:
            stop_process(proc)
        scenarios.append({**sc, "suggestion": {k: sug[k] for k in ("method", "tau_seq", "tau_tok", "pipesd_tpt_s",
                                                                  "default_tpt_s", "k", "vanilla_sd_tpt_s")},
                          "nominal_costs": nominal})
    out = {"settings": {"pair": pair_label, "prompts": args.prompts, "tokens": args.tokens,
                        "method_k": K_SERIAL, "threads": 1, "machine": platform.platform(),
                        "cpu": platform.processor() or platform.machine(), "commit": git_commit(),
                        "wall_s": time.time() - t_start, "check_pair_costs": sug_costs,
                        "suggestion_from": "check-pair on its own prompts" if rec is None else
                        "suggest() on the recording's trace (the same prompts, in-sample)"},
           "scenarios": scenarios, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    md, js = Path(f"{path}.md"), Path(f"{path}.json")  # not with_suffix: a pair name has dots
    js.write_text(json.dumps(out, indent=1, default=float))
    md.write_text(markdown(out))
    print(f"wrote {md} and .json ({time.time() - t_start:.0f} s)")
    return 0 if all(r["measured"]["exact"] for r in rows) else 1


def _pair(rows, scenario, label):
    return next(r for r in rows if r["scenario"] == scenario and r["label"] == label)


def markdown(out: dict) -> str:
    s, rows = out["settings"], out["rows"]
    ms = lambda x: f"{x * 1e3:.2f}"  # noqa: E731
    lines = ["# TPT model validation: `simulate_tpt` against the real runtime", "",
             f"Pair **{s['pair']}**, {s['prompts']} prompts x {s['tokens']} greedy tokens per point (suggestion: "
             f"{s.get('suggestion_from', 'check-pair on its own prompts')}); cloud `pipesd serve "
             f"--verify-pad-ms` in its own process, edge `EdgeClient` with `draft_step_s` and an emulated link, one "
             f"thread each; {s['machine']}, commit {s['commit']}, {s['wall_s']:.0f} s. Written by "
             "`bench/tuning/validate.py`. *Predicted*: `simulate_tpt` replaying each prompt's measured trace "
             "(the draft's confidence and agreement along the target's greedy continuation) with the nominal "
             "costs (pads, link preset, codec message sizes), or with the costs the runs measured (the edge's "
             "median draft step, the cloud's mean verification time). Ratio = predicted / measured.", ""]
    for sc in out["scenarios"]:
        lines += [f"## {sc['name']}: draft {sc['draft_ms']:.0f} ms, verify {sc['verify_ms']:.0f} ms, link "
                  f"`{sc['link']}` ({sc['note']})", "",
                  "| point | (tau_seq, tau_tok) | measured TPT ms | predicted ms | ratio | pred. (measured costs) "
                  "| ratio | measured to last verdict ms | ratio | verifications meas./pred. | rollbacks meas./pred. "
                  "| messages meas./pred. |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["scenario"] == sc["name"]):
            m, p, q = r["measured"], r["predicted_nominal"], r["predicted_measured_costs"]
            th = f"K={r['k']}, serial" if r["method"] == "vanilla-sd" else f"({r['tau_seq']}, {r['tau_tok']})"
            lines.append(f"| {r['label']} | {th} | {ms(m['tpt_s'])} | {ms(p['tpt_s'])} | {r['ratio_nominal']:.3f} | "
                         f"{ms(q['tpt_s'])} | {r['ratio_measured_costs']:.3f} | {ms(m['tpt_to_last_verdict_s'])} | "
                         f"{r['ratio_to_last_verdict']:.3f} | {m['verifications']}/{p['verifications']}"
                         f" | {m['rollbacks']}/{p['rollbacks']} | {m['messages']}/{p['messages']} |")
        d = _pair(rows, sc["name"], "defaults")
        sg = _pair(rows, sc["name"], "check-pair suggestion")
        p1 = _pair(rows, sc["name"], "protocol-1 suggestion")
        lines += ["", f"Wall clock, suggestion ({sg['tau_seq']}, {sg['tau_tok']}) / defaults: measured "
                      f"{sg['measured']['tpt_s'] / d['measured']['tpt_s']:.3f}, predicted "
                      f"{sg['predicted_nominal']['tpt_s'] / d['predicted_nominal']['tpt_s']:.3f}. "
                      f"Protocol-1 suggestion (0.99, 0.0) / defaults: measured "
                      f"{p1['measured']['tpt_s'] / d['measured']['tpt_s']:.3f}, predicted "
                      f"{p1['predicted_nominal']['tpt_s'] / d['predicted_nominal']['tpt_s']:.3f}.", ""]
    errs = [abs(math.log(r["ratio_nominal"])) for r in rows]
    errs_m = [abs(math.log(r["ratio_measured_costs"])) for r in rows]
    errs_v = [abs(math.log(r["ratio_to_last_verdict"])) for r in rows]
    same = sum(r["measured"]["verifications"] == r["predicted_nominal"]["verifications"]
               and r["measured"]["rollbacks"] == r["predicted_nominal"]["rollbacks"] for r in rows)
    worst = max(rows, key=lambda r: abs(math.log(r["ratio_nominal"])))
    lines += ["## Error", "",
              f"Nominal costs: geometric-mean error {math.exp(statistics.mean(errs)) - 1:.1%}, worst "
              f"x{worst['ratio_nominal']:.3f} ({worst['scenario']}, {worst['label']}). Measured costs: "
              f"geometric-mean error {math.exp(statistics.mean(errs_m)) - 1:.1%}, worst "
              f"x{max(rows, key=lambda r: abs(math.log(r['ratio_measured_costs'])))['ratio_measured_costs']:.3f}. "
              f"Against the TPT to the last verdict (the model's own end point; the runtime's wall time adds the "
              f"threads' teardown): geometric-mean error {math.exp(statistics.mean(errs_v)) - 1:.1%}. "
              f"Verification and rollback counts equal the prediction's at {same} of {len(rows)} points. "
              f"Greedy outputs equal the target's: "
              f"{'all' if all(r['measured']['exact'] for r in rows) else 'NOT all'}.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
