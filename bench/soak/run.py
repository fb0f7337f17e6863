"""Soak and load: N edge clients against one cloud server on loopback for a fixed time.

    python bench/soak/run.py                       # 32 clients, 120 s
    python bench/soak/run.py --clients 64 --duration 600 --verify-ms 5

The server is a child process (``--role server``: a CloudServer with the bundled target, one
thread) that writes its stats and resident memory to a JSON file every second. This process
runs the clients: each is an EdgeClient with its own connection and its own draft runner (one
shared set of weights), generating short completions back to back until the time is up.

Reported: generated tokens/s (all clients), verifications/s and the cloud's verification batch
size (sessions per batched launch), the edge-measured verdict latency (last verify-flagged
send to its verdict) at p50/p99, errors (must be zero), and the server's resident memory after
warm-up and at the end (growth must stay under ``--rss-growth-mb``). Exit status 1 if errors or
memory growth break the bounds. Results: ``bench/results/soak.{md,json}`` with machine, commit
and settings. Only loopback addresses are used; every loop is bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from pipesd.launch import PROMPTS, load_pair, serve_until_stopped, stop_process

ROOT = Path(__file__).resolve().parents[2]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------- server role
def run_server(args) -> int:
    import torch

    torch.set_num_threads(1)
    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.fingerprint import tokenizer_fingerprint

    target = load_pair(args.pair, threads=1).target
    cfg = CloudConfig(host="127.0.0.1", port=0, max_sessions=max(64, 2 * args.clients),
                      max_sessions_per_client=4, verify_pad_s=args.verify_ms / 1e3)
    server = CloudServer(target, cfg, tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer))
    stats_path = Path(args.stats_file)

    def dump(server) -> None:
        s = dict(server.stats.__dict__)
        s["rss_mb"] = rss_mb(os.getpid())
        s["port"] = server.address[1]
        s["time"] = time.time()
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(s))
        tmp.replace(stats_path)

    serve_until_stopped(server, on_tick=dump, tick_s=1.0)  # a snapshot every second, and one at the end
    return 0


def read_stats(path: Path) -> dict:
    for _ in range(50):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RuntimeError(f"cannot read the server's stats file {path}")


# ---------------------------------------------------------------------------- clients
def verdict_latencies(timeline: list) -> list[float]:
    """Seconds from each verify-flagged send to the next verdict (edge-measured round trip)."""
    out, last_send = [], None
    for lane, t0, t1, info in sorted(timeline, key=lambda e: e[2]):
        if lane == "send" and info[2]:
            last_send = t1
        elif lane == "verdict" and last_send is not None:
            out.append(t1 - last_send)
            last_send = None
    return out


class ClientWorker(threading.Thread):
    def __init__(self, idx: int, port: int, model, tokenizer, args, deadline: float) -> None:
        super().__init__(name=f"soak-client-{idx}", daemon=True)
        self.idx, self.port, self.model, self.tok, self.args, self.deadline = idx, port, model, tokenizer, args, deadline
        self.tokens = 0
        self.generations = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.verifications = 0

    def run(self) -> None:
        from pipesd.edge import EdgeClient, EdgeConfig
        from pipesd.models import DraftModel

        try:
            draft = DraftModel(self.model, self.tok, threads=1)
            cfg = EdgeConfig.for_method(self.args.method, draft_step_s=self.args.draft_ms / 1e3,
                                        offline_policy="fail")  # a lost cloud is an error here
            cfg.record_timeline = True
            with EdgeClient(f"127.0.0.1:{self.port}", draft, cfg, client_name=f"soak-{self.idx}") as client:
                i = self.idx
                while time.monotonic() < self.deadline:
                    g = client.generate(PROMPTS[i % len(PROMPTS)], self.args.max_new_tokens)
                    i += 1
                    self.generations += 1
                    self.tokens += g.stats.new_tokens
                    self.verifications += g.stats.verifications
                    self.latencies += verdict_latencies(g.stats.timeline)
        except Exception as e:  # every error is counted and shown; the soak fails on any
            self.errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_soak(args) -> int:
    import torch

    torch.set_num_threads(1)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_file = Path(tempfile.mkdtemp(prefix="pipesd-soak-")) / "server.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "server", "--stats-file", str(stats_file),
           "--clients", str(args.clients), "--verify-ms", str(args.verify_ms)]
    if args.pair:
        cmd += ["--pair", args.pair]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    t_start = time.monotonic()
    try:
        while not stats_file.exists():
            if server.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{server.stderr.read()}")
            if time.monotonic() - t_start > 120:
                raise RuntimeError("the server did not start within 120 s")
            time.sleep(0.05)
        port = read_stats(stats_file)["port"]
        pair = load_pair(args.pair, threads=1)
        model, tok = pair.draft.model, pair.draft.tokenizer
        print(f"soak: server pid {server.pid} on 127.0.0.1:{port}; {args.clients} clients x {args.duration:.0f} s, "
              f"method {args.method}, {args.max_new_tokens} tokens per request", flush=True)

        # Warm-up: a few clients for a short while, so start memory is measured after the
        # allocator, caches and lazily built kernels have settled.
        warm_deadline = time.monotonic() + args.warmup
        warm = [ClientWorker(i, port, model, tok, args, warm_deadline) for i in range(min(4, args.clients))]
        for w in warm:
            w.start()
        for w in warm:
            w.join(args.warmup + 60)
        s0 = read_stats(stats_file)
        rss0 = s0["rss_mb"]

        deadline = time.monotonic() + args.duration
        t0 = time.monotonic()
        workers = [ClientWorker(i, port, model, tok, args, deadline) for i in range(args.clients)]
        for w in workers:
            w.start()
        next_report = t0 + args.report_every
        rss_series: list[tuple[float, float]] = []  # (seconds since start, server RSS MiB)
        while any(w.is_alive() for w in workers):
            now = time.monotonic()
            if now > deadline + args.grace:
                break
            if now >= next_report:
                s = read_stats(stats_file)
                toks = sum(w.tokens for w in workers)
                errs = sum(len(w.errors) for w in workers)
                rss_series.append((round(now - t0, 1), s["rss_mb"]))
                print(f"  t={now - t0:5.0f}s  tokens {toks:6d} ({toks / (now - t0):6.1f}/s)  verifications "
                      f"{s['verifications'] - s0['verifications']:6d}  sessions open {s['sessions_open']:3d}  "
                      f"server RSS {s['rss_mb']:.0f} MiB  errors {errs}", flush=True)
                next_report += args.report_every
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        hung = [w.name for w in workers if w.is_alive()]
        time.sleep(1.5)  # let the server drop the closed sessions and write a final snapshot
        s1 = read_stats(stats_file)
    finally:
        stop_process(server, 20)

    errors = [e for w in workers for e in w.errors] + [f"client {n} still running after the grace period" for n in hung]
    lat = [x for w in workers for x in w.latencies]
    tokens = sum(w.tokens for w in workers)
    verifs = s1["verifications"] - s0["verifications"]
    launches = s1["batched_launches"] - s0["batched_launches"]
    rss1 = s1["rss_mb"]
    growth = rss1 - rss0
    result = {
        "tokens": tokens, "tokens_per_s": tokens / elapsed, "generations": sum(w.generations for w in workers),
        "verifications": verifs, "verifications_per_s": verifs / elapsed,
        "mean_batch_sessions": verifs / launches if launches else 0.0, "max_batch_sessions": s1["max_batch"],
        "verdict_latency_p50_ms": pct(lat, 0.50) * 1e3, "verdict_latency_p99_ms": pct(lat, 0.99) * 1e3,
        "verdict_latency_samples": len(lat), "errors": len(errors), "protocol_errors": s1["protocol_errors"] - s0["protocol_errors"],
        "sessions_open_at_end": s1["sessions_open"], "server_rss_start_mb": rss0, "server_rss_end_mb": rss1,
        "server_rss_growth_mb": growth, "elapsed_s": elapsed,
    }
    result_series = {"server_rss_mb_over_time": rss_series}
    header = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
              "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {k: v for k, v in vars(args).items() if k not in ("role", "stats_file", "out")}}
    ok = not errors and growth <= args.rss_growth_mb and result["sessions_open_at_end"] == 0
    (out_dir / f"soak{args.tag}.json").write_text(json.dumps({"header": header, "result": result, **result_series, "ok": ok,
                                                              "error_samples": errors[:5]}, indent=1))
    md = [f"# Soak: {args.clients} clients, {args.duration:.0f} s, method {args.method}", "",
          f"machine: {header['machine']['platform']}, {header['machine']['cpus']} CPUs; commit {header['commit']}; "
          f"{header['date']}", f"settings: `{json.dumps(header['settings'])}`", "",
          "| figure | value |", "|---|---|"]
    md += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
    md += ["", f"verdict: {'PASS' if ok else 'FAIL'} (errors must be 0, server RSS growth <= {args.rss_growth_mb} MiB, "
           "no session left open)"]
    (out_dir / f"soak{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[5:]), flush=True)
    for e in errors[:3]:
        print("error sample:", e, file=sys.stderr)
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load after warm-up")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--grace", type=float, default=60.0, help="seconds a client may overrun the deadline")
    ap.add_argument("--method", default="pipesd")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--draft-ms", type=float, default=0.0, help="pad each draft step (0: as fast as it runs)")
    ap.add_argument("--verify-ms", type=float, default=0.0, help="pad each verification (0: as fast as it runs)")
    ap.add_argument("--pair", default=None, help="bundled (default), a bundled pair name, a local pair "
                    "directory, or self-noisy:SCALE (pipesd.launch.load_pair)")
    ap.add_argument("--rss-growth-mb", type=float, default=64.0, help="allowed server RSS growth")
    ap.add_argument("--report-every", type=float, default=10.0)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--role", choices=["soak", "server"], default="soak", help=argparse.SUPPRESS)
    ap.add_argument("--stats-file", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        ap.error("--clients must be >= 1 and --duration > 0")
    return run_server(args) if args.role == "server" else run_soak(args)


if __name__ == "__main__":
    sys.exit(main())
