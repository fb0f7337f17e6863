"""The multi-edge throughput curve: N edges against one cloud (and against R replicas).

    python bench/fleet/run.py                 # N = 1..64, 1 and 2 replicas, ~10-12 min on 2 cores
    python bench/fleet/run.py --quick         # N = 1, 2, 4; 1 replica; about a minute

The cloud is ``pipesd serve --replicas R`` in a subprocess (the bundled target, one thread,
Prometheus metrics on a loopback port); this process runs N edges as threads, each an
:class:`~pipesd.edge.EdgeClient` with its own connection and draft runner (one shared set of
weights), generating completions back to back for ``--duration`` seconds per point. Draft steps
are padded (``EdgeConfig.draft_step_s``) so each edge is a slow device and the cloud becomes the
bottleneck as N grows; the q wire is top-k.

Modes, each at every N: ``batch`` (PipeSD, cross-session batched verification, the server's
default cap), ``nobatch`` (PipeSD, ``serve --max-batch-sessions 1``: one session per launch) and
``stream`` (method ``cloud-stream``: the cloud decodes alone and streams, batched across sessions).

Reported per point: goodput (verified tokens/s, all edges), TPT per generation at p50/p99,
sessions per launch (verifications / launches), cloud busy seconds per token, and the server's
raw counters (launches, verifications, target forwards, busy seconds) that
``pipesd.sim.CostCurve.fit`` turns into the verification cost curve. Results:
``bench/results/fleet-curve{tag}.{md,json,png}`` with machine, commit, settings and pair.
Progress on stderr. Only loopback addresses are used; every wait is bounded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

def _soak():
    """bench/soak/run.py as a module (its git_commit and pct helpers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipesd_bench_soak", ROOT / "bench" / "soak" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_S = _soak()
git_commit, pct = _S.git_commit, _S.pct

from pipesd.launch import PROMPTS, make_link, start_server_subprocess, stop_process  # noqa: E402

FULL_NS = (1, 2, 4, 8, 16, 32, 64)
QUICK_NS = (1, 2, 4)
MODES = ("batch", "nobatch", "stream")
AUTH = "fleet-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas_supported() -> bool:
    """Whether this checkout's ``pipesd serve`` has ``--replicas`` (the fleet, issue 14)."""
    out = subprocess.run([sys.executable, "-m", "pipesd", "serve", "--help"], capture_output=True, text=True)
    return "--replicas" in out.stdout


def scrape(url: str) -> dict:
    """The server's counters, summed over replicas (a ``replica`` label), from its /metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    want = {"verifications": "pipesd_cloud_verifications_total", "launches": "pipesd_cloud_batched_launches_total",
            "target_forwards": "pipesd_cloud_target_forwards_total", "busy_s": "pipesd_cloud_busy_seconds_total"}
    out = dict.fromkeys(want, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for k, metric in want.items():
            if name == metric:
                out[k] += float(line.rsplit(" ", 1)[1])
    return out


class EdgeSource:
    """Where an edge's draft and prompts come from. The bundled pair: a real draft forward per
    step (on this 2-core machine N edges' drafting competes with the cloud for the CPU and the
    GIL). A replay (``--pair replay:FILE``, bench/e2e/record.py): recorded draft steps, no
    compute, so the padded draft step is the edge's whole cost and the cloud is the bottleneck."""

    def __init__(self, spec) -> None:
        from pipesd.launch import load_pair

        self.replayed = bool(spec and spec.startswith("replay:"))
        if self.replayed:
            from pipesd.models.replay import ReplayDraft, load_recording

            rec = load_recording(spec[len("replay:"):])
            self.make_draft = lambda: ReplayDraft(rec)
            self.prompts = list(ReplayDraft(rec).recorded_prompts)
        else:
            from pipesd.models import DraftModel

            pair = load_pair(spec, threads=1)
            self.make_draft = lambda: DraftModel(pair.draft.model, pair.draft.tokenizer, threads=1)
            self.prompts = list(PROMPTS)


class Edge(threading.Thread):
    """One edge: generations back to back until the deadline (at least one)."""

    def __init__(self, idx: int, port: int, source: "EdgeSource", method: str, args, start: threading.Barrier) -> None:
        super().__init__(name=f"fleet-edge-{idx}", daemon=True)
        self.idx, self.port, self.source, self.method, self.args = idx, port, source, method, args
        self.start_line = start  # every edge connected before the clock starts: setup is not load
        self.tpts: list[float] = []
        self.tokens = 0
        self.verifications = 0
        self.drafts = 0
        self.accepted = 0
        self.errors: list[str] = []

    def run(self) -> None:
        from pipesd.edge import EdgeClient, EdgeConfig

        try:
            draft = self.source.make_draft()
            cfg = EdgeConfig.for_method(self.method, draft_step_s=self.args.draft_ms / 1e3, wire_q="topk",
                                        offline_policy="fail")
            link = make_link(self.args.link) if self.args.link != "none" else None
            with EdgeClient(f"127.0.0.1:{self.port}", draft, cfg, auth_token=AUTH, link=link,
                            client_name=f"fleet-{self.idx}") as client:
                self.start_line.wait(120)
                deadline = time.monotonic() + self.args.duration
                i = self.idx
                while True:
                    prompts = self.source.prompts
                    g = client.generate(prompts[i % len(prompts)], self.args.max_new_tokens)
                    i += 1
                    s = g.stats
                    self.tokens += s.new_tokens
                    self.verifications += s.verifications
                    self.drafts += s.verified_drafts
                    self.accepted += s.accepted_drafts
                    if s.new_tokens:
                        self.tpts.append(s.tpt_s)
                    if time.monotonic() >= deadline:
                        break
        except Exception as e:  # counted and shown; a point with errors is marked
            if not self.start_line.broken:
                self.start_line.abort()  # the others must not wait for this one
            self.errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


def run_point(port: int, metrics_url: str, n: int, mode: str, pair, args) -> dict:
    """N edges for ``args.duration`` seconds; the figures of one point of the curve."""
    method = "cloud-stream" if mode == "stream" else args.method
    line = threading.Barrier(n + 1)
    edges = [Edge(i, port, pair, method, args, line) for i in range(n)]
    for e in edges:
        e.start()
    m0 = scrape(metrics_url)
    try:
        line.wait(120)
    except threading.BrokenBarrierError:
        pass  # an edge failed to start: its error is counted below
    t0 = time.monotonic()
    for e in edges:
        e.join(max(1.0, t0 + args.duration + args.grace - time.monotonic()))
    elapsed = time.monotonic() - t0
    hung = sum(e.is_alive() for e in edges)
    time.sleep(0.3)  # the last verdicts' counters
    m1 = scrape(metrics_url)
    d = {k: m1[k] - m0[k] for k in m0}
    tokens = sum(e.tokens for e in edges)
    tpts = [x for e in edges for x in e.tpts]
    errors = [x for e in edges for x in e.errors] + [f"{hung} edges still running after the grace period"] * bool(hung)
    # An edge that failed to start aborts the start line, so the others show BrokenBarrierError:
    # the real failures go first (the samples and the log name the cause, not its echo).
    errors.sort(key=lambda x: x.startswith("BrokenBarrierError"))
    if errors:
        log(f"  N={n} {mode}: {len(errors)} edge error(s); first: {errors[0].splitlines()[0][:300]}")
    ver = sum(e.verifications for e in edges)
    return {
        "n_edges": n, "mode": mode, "method": method, "elapsed_s": elapsed, "tokens": tokens,
        "generations": len(tpts), "goodput_tok_s": tokens / elapsed if elapsed > 0 else 0.0,
        "tpt_p50_s": pct(tpts, 0.50), "tpt_p99_s": pct(tpts, 0.99),
        "tpt_mean_s": sum(tpts) / len(tpts) if tpts else float("nan"),
        "tpt_min_s": min(tpts) if tpts else float("nan"),
        "sessions_per_launch": d["verifications"] / d["launches"] if d["launches"] else 0.0,
        "cloud_busy_per_token_s": d["busy_s"] / tokens if tokens else float("nan"),
        "edge_verifications": ver, "tokens_per_verification": tokens / ver if ver else float("nan"),
        "drafts_per_verification": sum(e.drafts for e in edges) / ver if ver else float("nan"),
        "acceptance": sum(e.accepted for e in edges) / max(1, sum(e.drafts for e in edges)),
        "server": d, "errors": len(errors), "error_samples": errors[:3],
    }


def start_cloud(replicas: int, mode: str, args):
    mport = free_port()
    extra = ["--metrics-port", str(mport), "--max-sessions", str(max(64, 2 * max(args.ns))),
             "--max-clients", str(max(256, 2 * max(args.ns))), "--max-sessions-per-client", "4"]
    if replicas > 1:
        extra += ["--replicas", str(replicas)]
    if mode == "nobatch":
        extra += ["--max-batch-sessions", "1"]
    proc, port = start_server_subprocess(args.pair, threads=1, verify_pad_ms=args.verify_ms, auth_token=AUTH,
                                         timeout_s=180, extra=tuple(extra))
    url = f"http://127.0.0.1:{mport}/metrics"
    deadline = time.monotonic() + 60
    while True:
        try:
            scrape(url)
            return proc, port, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop_process(proc, 10)
                raise RuntimeError(f"the cloud's metrics endpoint {url} did not answer")
            time.sleep(0.2)


def run_curve(args) -> dict:
    """Every (replicas, mode, N) point; the result document (header + points)."""
    import torch

    torch.set_num_threads(1)
    pair = EdgeSource(args.pair)
    skipped = []
    reps = list(args.replicas)
    if any(r > 1 for r in reps) and not replicas_supported():
        skipped.append("replicas > 1: this checkout's `pipesd serve` has no --replicas yet (issue 14 items 1-3)")
        log(f"fleet: SKIP {skipped[-1]}")
        reps = [r for r in reps if r == 1]
    points = []
    # batch and stream share a server (same flags); nobatch needs --max-batch-sessions 1
    groups = [g for g in ([m for m in args.modes if m != "nobatch"], [m for m in args.modes if m == "nobatch"]) if g]
    for r in reps:
        for group in groups:
            log(f"fleet: starting `pipesd serve --replicas {r}` for mode(s) {', '.join(group)}")
            try:
                proc, port, url = start_cloud(r, group[0], args)
            except RuntimeError as e:
                skipped.append(f"replicas {r}, modes {', '.join(group)}: {str(e).splitlines()[0][:200]}")
                log(f"fleet: SKIP {skipped[-1]}")
                continue
            try:
                for mode in group:
                    if args.warmup > 0:
                        run_point(port, url, 1, mode, pair, argparse.Namespace(**{**vars(args), "duration": args.warmup}))
                    for n in args.ns:
                        p = run_point(port, url, n, mode, pair, args)
                        p["replicas"] = r
                        points.append(p)
                        log(f"  R={r} {mode:7s} N={n:3d}: goodput {p['goodput_tok_s']:7.1f} tok/s  TPT p50 "
                            f"{p['tpt_p50_s'] * 1e3:7.1f} ms p99 {p['tpt_p99_s'] * 1e3:7.1f} ms  sessions/launch "
                            f"{p['sessions_per_launch']:.2f}  errors {p['errors']}")
            finally:
                stop_process(proc, 30)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in ("out", "tag")}
    header = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "pair": args.pair or "bundled",
              "settings": settings, "skipped": skipped}
    return {"header": header, "points": points}


def write_results(doc: dict, out: Path, tag: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    h = doc["header"]
    paths = [out / f"fleet-curve{tag}.json", out / f"fleet-curve{tag}.md"]
    paths[0].write_text(json.dumps(doc, indent=1))
    md = [f"# The multi-edge curve ({'quick' if h['settings'].get('quick') else 'full'} run)", "",
          f"machine: {h['machine']['platform']}, {h['machine']['cpus']} CPUs; commit {h['commit']}; {h['date']}; "
          f"pair {h['pair']}", f"settings: `{json.dumps(h['settings'])}`", ""]
    md += [f"skipped: {s}" for s in h["skipped"]] + ([""] if h["skipped"] else [])
    md += ["| replicas | mode | N | goodput tok/s | TPT p50 ms | TPT p99 ms | sessions/launch | cloud busy ms/token "
           "| tokens/verification | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        md.append(f"| {p['replicas']} | {p['mode']} | {p['n_edges']} | {p['goodput_tok_s']:.1f} | "
                  f"{p['tpt_p50_s'] * 1e3:.1f} | {p['tpt_p99_s'] * 1e3:.1f} | {p['sessions_per_launch']:.2f} | "
                  f"{p['cloud_busy_per_token_s'] * 1e3:.2f} | {p['tokens_per_verification']:.2f} | {p['errors']} |")
    paths[1].write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for key in sorted({(p["replicas"], p["mode"]) for p in doc["points"]}):
            pts = [p for p in doc["points"] if (p["replicas"], p["mode"]) == key]
            ns = [p["n_edges"] for p in pts]
            ax[0].plot(ns, [p["goodput_tok_s"] for p in pts], "o-", label=f"R={key[0]} {key[1]}")
            ax[1].plot(ns, [p["tpt_p99_s"] * 1e3 for p in pts], "o-", label=f"R={key[0]} {key[1]}")
        for a, yl in zip(ax, ("goodput (verified tokens/s)", "TPT p99 (ms)")):
            a.set_xscale("log", base=2)
            a.set_xlabel("edges")
            a.set_ylabel(yl)
            a.grid(alpha=0.3)
        ax[0].legend(fontsize=8)
        fig.suptitle(f"multi-edge curve, pair {h['pair']}, commit {h['commit']}")
        fig.tight_layout()
        png = out / f"fleet-curve{tag}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        paths.append(png)
    except ImportError:
        log("fleet: matplotlib missing, no PNG")
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1, 2, 4, one replica, shorter points")
    ap.add_argument("--ns", default=None, help="comma-separated edge counts (default: 1,2,4,...,64; quick 1,2,4)")
    ap.add_argument("--replicas", default=None, help="comma-separated replica counts (default 1,2; quick 1)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load per point (default 4; quick 2)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of one edge before each server's points")
    ap.add_argument("--grace", type=float, default=60.0, help="seconds an edge may overrun its point")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per generation (default 24; quick 12)")
    ap.add_argument("--draft-ms", type=float, default=20.0, help="pad each draft step to this (a slow edge device)")
    ap.add_argument("--verify-ms", type=float, default=10.0,
                    help="pad each launch to this (serve --verify-pad-ms): a heavier target than the bundled one")
    ap.add_argument("--method", default="pipesd", help="the SD method of the batch/nobatch modes")
    ap.add_argument("--link", default="none", help="edge link emulation: none (loopback) or a preset (lan, wifi...)")
    ap.add_argument("--pair", default=None, help="bundled (default), a bundled pair name, or replay:FILE (recorded "
                    "draft steps, no edge compute: the cloud is the bottleneck; record one with bench/e2e/record.py)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    q = args.quick
    try:
        args.ns = tuple(int(x) for x in args.ns.split(",")) if args.ns else (QUICK_NS if q else FULL_NS)
        args.replicas = tuple(int(x) for x in args.replicas.split(",")) if args.replicas else ((1,) if q else (1, 2))
    except ValueError:
        ap.error("--ns and --replicas take comma-separated whole numbers")
    if min(args.ns) < 1 or min(args.replicas) < 1:
        ap.error("--ns and --replicas must be >= 1")
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not args.modes or any(m not in MODES for m in args.modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    args.duration = args.duration if args.duration is not None else (2.0 if q else 4.0)
    args.max_new_tokens = args.max_new_tokens or (12 if q else 24)
    if args.duration <= 0 or args.max_new_tokens < 1 or args.draft_ms < 0 or args.verify_ms < 0:
        ap.error("--duration must be > 0, --max-new-tokens >= 1, --draft-ms and --verify-ms >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run_curve(args)
    for p in write_results(doc, Path(args.out), args.tag):
        log(f"fleet: wrote {p}")
    bad = sum(p["errors"] for p in doc["points"])
    return 1 if bad or not doc["points"] else 0


if __name__ == "__main__":
    sys.exit(main())
