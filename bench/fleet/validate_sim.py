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
- the host (:class:`pipesd.sim.HostCPU`: cores shared by the edge threads, the server, the
  router and Ray), the replica's gap between launches and the per-generation spread: from a
  separate microbenchmark, ``--measure-host PAIR`` (the bench's own edge threads against a padded
  server at N = 1 and N = 64 only, CPU seconds from ``time.process_time`` and /proc; about a
  minute), written to ``fleet-host-cpu{tag}.json`` and read by every later run (``--host none``:
  no host model); :func:`host_from` says what is read off which point;
- predicted: goodput and TPT p50/p99 at every N >= 2 (N = 1 is listed, fitted by construction).
  No figure of an N = 2..32 point is used for calibration.

    python bench/fleet/validate_sim.py --measure-host replay:FILE --tag=-replay   # ~1 min, then:
    python bench/fleet/validate_sim.py --curve bench/results/fleet-curve-replay.json --tag=-replay

Writes ``bench/results/fleet-sim-validation{tag}.{md,json}``: per-N relative errors and whether
goodput and TPT p50 are within ``--tolerance`` (15%) for N <= 32.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

from pipesd.sim import CostCurve, EdgeModel, FleetConfig, HostCPU, simulate_fleet

ROOT = Path(__file__).resolve().parents[2]
SERIAL = ("vanilla-sd", "dual-no-pipeline", "hsl")


def _bench():
    """bench/fleet/run.py as a module (its Edge threads, EdgeSource and start_cloud)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipesd_bench_fleet", ROOT / "bench" / "fleet" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants, from /proc."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)  # ppid, utime + stime
    want, total, grew = {pid}, 0.0, True
    while grew:
        grew = False
        for p, (pp, _) in stats.items():
            if pp in want and p not in want:
                want.add(p)
                grew = True
    return sum(stats[p][1] for p in want if p in stats)


def scrape_verify(url: str) -> dict:
    """The server's launch and compute counters (summed over replicas)."""
    import urllib.request

    names = {"launches": "pipesd_cloud_batched_launches_total", "verifications": "pipesd_cloud_verifications_total",
             "forward_s": "pipesd_cloud_forward_seconds_total", "kernel_s": "pipesd_cloud_kernel_seconds_total",
             "overhead_s": "pipesd_cloud_overhead_seconds_total", "busy_s": "pipesd_cloud_busy_seconds_total"}
    out = dict.fromkeys(names, 0.0)
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for k, m in names.items():
            if name == m:
                out[k] += float(line.rsplit(" ", 1)[1])
    return out


def measure_point(bench, proc, port: int, url: str, n: int, mode: str, source, args) -> dict:
    """N edge threads for ``args.duration`` s; CPU seconds of this process (the edges) and of the
    server's process tree, per verification round and per launch."""
    import threading
    import time

    method = "cloud-stream" if mode == "stream" else "pipesd"
    line = threading.Barrier(n + 1)
    edges = [bench.Edge(i, port, source, method, args, line) for i in range(n)]
    for e in edges:
        e.start()
    try:
        line.wait(120)
    except threading.BrokenBarrierError:
        for e in edges:
            e.join(10)
        raise RuntimeError(f"measure: {mode} N={n}: an edge failed to start: "
                           f"{next((x for e in edges for x in e.errors), '?')[:300]}") from None
    c0, s0, m0, t0 = time.process_time(), tree_cpu_s(proc.pid), scrape_verify(url), time.monotonic()
    for e in edges:
        e.join(args.duration + 60)
    c1, s1, wall = time.process_time(), tree_cpu_s(proc.pid), time.monotonic() - t0
    time.sleep(0.3)
    m = {k: v - m0[k] for k, v in scrape_verify(url).items()}
    ver = sum(e.verifications for e in edges)
    errors = sum(len(e.errors) for e in edges)
    if errors or not ver:
        raise RuntimeError(f"measure: {mode} N={n}: {errors} edge errors, {ver} verifications")
    launches = max(1.0, m["launches"])
    return {"n_edges": n, "mode": mode, "wall_s": wall, "edge_cpu_s": c1 - c0, "server_cpu_s": s1 - s0,
            "verifications": ver, "tokens": sum(e.tokens for e in edges), "launches": m["launches"],
            "sessions_per_launch": m["verifications"] / launches,
            "edge_cpu_per_round_s": (c1 - c0) / ver, "server_cpu_per_launch_s": (s1 - s0) / launches,
            "verify_compute_per_launch_s": (m["forward_s"] + m["kernel_s"] + m["overhead_s"]) / launches,
            "busy_per_launch_s": m["busy_s"] / launches, "cycle_per_launch_s": wall / launches,
            "tpts_s": edges[0].tpts if n == 1 else [], "prompts": len(source.prompts)}


def measure_host(pair: str, seconds: float = 4.0, big_n: int = 64, replicas=(1, 2), repeats: int = 3) -> dict:
    """The microbenchmark behind :class:`pipesd.sim.HostCPU`: the bench's own edge threads against
    a padded ``pipesd serve`` (the curve's settings), at N = 1 and, batched on one replica, at
    N = ``big_n``: never at a validated N. Per server also its idle CPU (Ray, pollers). About
    15 s per replica count plus the servers' start."""
    import os
    import platform
    import time

    import torch

    torch.set_num_threads(1)
    bench = _bench()
    source = bench.EdgeSource(None if pair == "bundled" else pair)
    args = argparse.Namespace(duration=seconds, max_new_tokens=24, draft_ms=20.0, verify_ms=10.0, link="none",
                              pair=pair, ns=(1, big_n))
    points, idle, load0, failed = [], {}, os.getloadavg(), []
    # (replicas, server flags as the mode, [(mode, N), ...]): batch and stream share a server
    plan = [(1, "batch", [("batch", 1), ("batch", big_n), ("stream", 1), ("stream", big_n)]),
            (1, "nobatch", [("nobatch", big_n)])] + [(r, "batch", [("batch", 1)]) for r in replicas if r > 1]
    for r, server_mode, runs in [x for _ in range(repeats) for x in plan]:  # repeats: medians, not one noisy run
        proc, port, url = bench.start_cloud(r, server_mode, args)
        try:
            measure_point(bench, proc, port, url, 1, runs[0][0], source, argparse.Namespace(**{**vars(args), "duration": 1.0}))
            if server_mode == "batch":
                time.sleep(1.0)
                c0, t0 = tree_cpu_s(proc.pid), time.monotonic()
                time.sleep(3.0)
                idle.setdefault(str(r), []).append((tree_cpu_s(proc.pid) - c0) / (time.monotonic() - t0))
                print(f"measure: R={r} idle server: {idle[str(r)][-1]:.3f} cores", file=sys.stderr)
            for mode, n in runs:
                try:
                    p = measure_point(bench, proc, port, url, n, mode, source, args)
                except RuntimeError as e:  # one repeat lost (a start barrier broken under load): the others count
                    failed.append(f"R={r} {mode} N={n}: {e}")
                    print(f"measure: SKIP {failed[-1]}", file=sys.stderr)
                    continue
                p["replicas"] = r
                points.append(p)
                print(f"measure: R={r} {mode} N={n}: edge CPU {p['edge_cpu_per_round_s'] * 1e3:.2f} ms/round, "
                      f"server CPU {p['server_cpu_per_launch_s'] * 1e3:.2f} ms/launch at "
                      f"{p['sessions_per_launch']:.2f} sessions/launch, launch cycle "
                      f"{p['cycle_per_launch_s'] * 1e3:.2f} ms (busy {p['busy_per_launch_s'] * 1e3:.2f})", file=sys.stderr)
        finally:
            bench.stop_process(proc, 30)
    return {"pair": pair, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": bench.git_commit(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "load_average_before": load0, "load_average_after": os.getloadavg(),
            "idle_server_cores": idle, "failed": failed, "points": points}


def host_from(meas: dict, replicas: int, mode: str, cores: int) -> tuple:
    """:class:`HostCPU` for (replicas, mode) from the microbenchmark, the replica's gap between
    launches (``(gap_s, gap_per_session_s)``), the figures as a dict, and the per-generation TPT
    spread (the N = 1 run's TPT by prompt over its mean).

    - edge CPU per round: the N = big point (one replica, batched). At N = 1 an edge burns more per
      round (3-4 ms here) in its pollers' sleep(0.2 ms) loops while it waits for a verdict; that
      part yields under load, so the loaded point is the CPU a round needs;
    - launch CPU: the server tree's CPU per launch net of its idle CPU, at N = 1 (one session per
      launch) and N = big (many): base and per-session slope; stream launches from their own
      N = 1 and N = big points;
    - background: the server tree's idle CPU (Ray's processes with two replicas);
    - with two replicas the router splices every frame: the server tree's CPU per round at N = 1
      beyond one replica's, net of idle, goes into the per-round CPU;
    - gap: at N = big with one session per launch (nobatch) the replica launches back to back;
      its wall time per launch beyond the busy time (taking the job, applying and sending the
      verdict on the event loop), per launch. No per-session slope: the batched point's gap is
      too sensitive to other load on the machine to read one from it. Wall time, so it holds no
      core in the model (its CPU is in the launch CPU)."""
    pts = meas["points"]
    idle = {int(k): statistics.median(v) if isinstance(v, list) else v for k, v in meas["idle_server_cores"].items()}

    def pt(m, n1, r=1):  # every repeat of a point
        return [p for p in pts if p["mode"] == m and (p["n_edges"] == 1) == n1 and p["replicas"] == r]

    def med(ps, f):  # the median over repeats of a figure of one point
        return statistics.median(f(p) for p in ps)

    def net_per_launch(p, r=1):
        return max(0.0, p["server_cpu_s"] - idle.get(r, 0.0) * p["wall_s"]) / max(1.0, p["launches"])

    def line(p1, pb, f):
        x1, xb = med(p1, lambda p: p["sessions_per_launch"]), med(pb, lambda p: p["sessions_per_launch"])
        y1, yb = med(p1, f), med(pb, f)
        slope = max(0.0, (yb - y1) / (xb - x1))
        return max(0.0, y1 - slope * x1), slope

    kind = "stream" if mode == "stream" else "batch"
    base, slope = line(pt(kind, True), pt(kind, False), net_per_launch)
    rnd, router = (med(pt("batch", False), lambda p: p["edge_cpu_per_round_s"]), 0.0) if kind == "batch" else (0.0, 0.0)
    p2 = pt("batch", True, replicas) if replicas > 1 else []
    if p2 and kind == "batch":
        def per_round(r):
            return lambda p: max(0.0, p["server_cpu_s"] - idle.get(r, 0.0) * p["wall_s"]) / p["verifications"]
        router = max(0.0, med(p2, per_round(replicas)) - med(pt("batch", True), per_round(1)))
    gap = (0.0, 0.0)
    nb = pt("nobatch", False)
    if kind == "batch" and nb:
        gap = (med(nb, lambda p: max(0.0, p["cycle_per_launch_s"] - p["busy_per_launch_s"])), 0.0)
    bg = idle.get(replicas, idle.get(1, 0.0))
    host = HostCPU(cores, edge_round_s=rnd + router, launch_s=base, launch_per_session_s=slope, background_cores=bg,
                   label=f"microbenchmark {meas['date']} ({meas['commit']})")
    spread = ()
    b1 = pt("batch", True)
    k = min(len(p["tpts_s"]) for p in b1)
    k = min(k, b1[0]["prompts"])
    if kind == "batch" and k >= 2:  # TPT by prompt (the median over repeats) over its mean
        tp = [statistics.median(p["tpts_s"][i] for p in b1) for i in range(k)]
        m = sum(tp) / len(tp)
        spread = tuple(t / m for t in tp)
    how = {"edge_round_ms": rnd * 1e3, "router_round_ms": router * 1e3, "launch_ms": base * 1e3,
           "launch_per_session_ms": slope * 1e3, "background_cores": bg, "gap_ms": gap[0] * 1e3,
           "gap_per_session_ms": gap[1] * 1e3, "repeats": len(b1)}
    return host, gap, how, spread


def rel(sim: float, meas: float) -> float:
    return (sim - meas) / meas if meas and math.isfinite(meas) and math.isfinite(sim) else float("nan")


def validate(doc: dict, tolerance: float = 0.15, max_n: int = 32, seed: int = 0, host_meas: dict = None) -> dict:
    """Per (replicas, mode): calibrate, simulate every N, compare. ``host_meas``: the host-CPU
    microbenchmark (:func:`measure_host`); None: no host-CPU model, no spread."""
    st = doc["header"]["settings"]
    floor = st.get("verify_ms", 0.0) / 1e3
    cores = int(doc["header"]["machine"]["cpus"])
    rows_out, fits, hosts = [], {}, {}
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
            host, spread = None, ()
            if host_meas:
                host, gap, how, spread = host_from(host_meas, r, mode, cores)
                if mode != "stream":
                    cost = dataclasses.replace(cost, gap_s=gap[0], gap_per_session_s=gap[1])
                hosts[f"{r}/{mode}"] = {**how, "cores": cores, "spread": list(spread)}
            if mode == "stream":  # the stream's per-token time outside the launch: the replica's gap
                busy1 = one["server"]["busy_s"] / one["server"]["launches"]
                cost = dataclasses.replace(cost, gap_s=max(0.0, one["tpt_mean_s"] - busy1))
                em = EdgeModel.from_measured(one["tpt_mean_s"], 1.0, 0.0, cost.time(1, 1), label="stream")
            else:  # the N = 1 edge saw one launch and the gap after it per verification
                dpv = one["drafts_per_verification"]
                em = EdgeModel.from_measured(one["tpt_mean_s"], one["tokens_per_verification"], dpv,
                                             cost.time(1, dpv + 1) + cost.gap(1), pipelined=one["method"] not in SERIAL)
            em = dataclasses.replace(em, spread=spread)
            fits[f"{r}/{mode}"] = cost
            for p in pts:
                cfg = FleetConfig(p["n_edges"], em, cost, replicas=r, routing="least-loaded",
                                  mode="stream" if mode == "stream" else "sd",
                                  max_batch_sessions=1 if mode == "nobatch" else 32, max_new=st["max_new_tokens"],
                                  duration_s=st["duration"], seed=seed, host=host)
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
            "host_cpu": hosts, "host_source": ({k: host_meas.get(k) for k in (
                "pair", "date", "commit", "machine", "settings", "load_average_before", "load_average_after")}
                if host_meas else None),
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
    hs = res.get("host_source")
    if hs:
        md += [f"Host-CPU model ({hs['machine']['cpus']} cores shared by the edge threads, the server and, with two "
               f"replicas, the router and Ray): calibrated from a separate microbenchmark "
               f"(`validate_sim.py --measure-host {hs['pair']}`, {hs['date']}, commit {hs['commit']}: the bench's "
               "edge threads against a padded server at N = 1 and N = 64 only, the medians of its repeats, CPU seconds from "
               "`time.process_time` and /proc), never from the curve's N = 2..32 points: edge CPU per round from "
               "its batched N = 64 point (at N = 1 the edge's pollers burn more per round, and that part yields "
               "under load); launch CPU net of the server's idle CPU at N = 1 (one session) and N = 64 (base + "
               "per-session slope; stream launches from the stream's own N = 1 and N = 64); the idle server's CPU "
               "as background; with two replicas the router's CPU per round (its N = 1 server CPU per round beyond "
               "one replica's); the replica's gap between launches (wall time beyond busy, one session per launch) "
               "from the nobatch N = 64 point. The padding sleep of a launch holds no core. Per-generation spread: "
               "that N = 1 run's TPT per prompt over its mean, rotated per edge as the bench rotates prompts. Load "
               f"average before / after the microbenchmark: {hs.get('load_average_before')} / "
               f"{hs.get('load_average_after')}.", ""]
        for k, h in res["host_cpu"].items():
            md.append(f"- host CPU, {k} (replicas/mode): {h['cores']} cores, edge {h['edge_round_ms']:.2f} + router "
                      f"{h['router_round_ms']:.2f} ms per round, launch {h['launch_ms']:.2f} ms + "
                      f"{h['launch_per_session_ms']:.2f} ms/session, background {h['background_cores']:.3f} cores, "
                      f"gap {h['gap_ms']:.2f} ms + {h['gap_per_session_ms']:.3f} ms/session, "
                      f"spread {', '.join(f'{x:.2f}' for x in h['spread']) or 'none'}")
    else:
        md += ["No host-CPU model (`--host none` or no microbenchmark file): edges and server do not contend.", ""]
    for r, c in res["cost_fits"].items():
        md.append(f"- cost fit, {r} (replicas/mode): base {c['base_s'] * 1e3:.3f} ms + {c['per_session_s'] * 1e3:.3f} ms/session"
                  f" + {c['per_token_s'] * 1e3:.4f} ms/token, floor {c['floor_s'] * 1e3:.1f} ms, gap {c['gap_s'] * 1e3:.2f} ms"
                  f" + {c.get('gap_per_session_s', 0.0) * 1e3:.3f} ms/session")
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
    ap.add_argument("--host", default=None,
                    help="the host-CPU microbenchmark's JSON (default: fleet-host-cpu{tag}.json beside the curve, "
                    "made by --measure-host); 'none': no host-CPU model")
    ap.add_argument("--measure-host", metavar="PAIR", default=None,
                    help="run the host-CPU microbenchmark with this pair (e.g. replay:FILE) and write --host")
    ap.add_argument("--measure-seconds", type=float, default=4.0, help="seconds per microbenchmark point")
    ap.add_argument("--measure-repeats", type=int, default=3, help="microbenchmark repeats (their medians are used)")
    args = ap.parse_args(argv)
    if args.measure_seconds <= 0 or args.measure_repeats < 1:
        ap.error("--measure-seconds must be > 0 and --measure-repeats >= 1")
    if args.host is None:
        args.host = str(Path(args.curve).resolve().parent / f"fleet-host-cpu{args.tag}.json")
    if args.measure_host:
        meas = measure_host(args.measure_host, args.measure_seconds, repeats=args.measure_repeats)
        Path(args.host).write_text(json.dumps(meas, indent=1))
        print(f"validate: wrote {args.host}", file=sys.stderr)
        return 0
    try:
        doc = json.loads(Path(args.curve).read_text())
    except (OSError, ValueError) as e:
        ap.error(f"--curve: cannot read {args.curve}: {e}")
    host_meas = None
    if args.host != "none":
        try:
            host_meas = json.loads(Path(args.host).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--host: cannot read {args.host} ({e}); make it with --measure-host PAIR or pass --host none")
    res = validate(doc, args.tolerance, args.max_n, host_meas=host_meas)
    for p in write(res, Path(args.out), args.tag):
        print(f"validate: wrote {p}", file=sys.stderr)
    print(Path(args.out, f"fleet-sim-validation{args.tag}.md").read_text())
    return 0 if res["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
