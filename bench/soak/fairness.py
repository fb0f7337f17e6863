"""Fairness soak: does one identity flooding the cloud slow another identity down?

    python bench/soak/fairness.py                    # bundled pair, about 2 minutes
    python bench/soak/fairness.py --generators 8 --verify-pad-ms 20 --tag=-8gen

One ``pipesd serve`` (child process, bundled target, one thread) with a tokens file of two
identities. ``bob`` generates the same prompts twice, one after the other: alone (unloaded),
then while ``alice`` floods (loaded): ``--generators`` EdgeClients generating back to back,
idle sessions and idle connections up to her quotas (and attempts beyond them, refused), and
``--flood`` raw sockets from loopback that never send a Hello, reopened as the server closes
them. Reported: bob's TPT (wall time per generated token, all his generations together)
loaded and unloaded and their ratio (issue 16 wants it within 1.5x), alice's tokens, the
refusals by quota, the pending handshakes evicted, and any error (there must be none).
Results: ``bench/results/soak-fairness<tag>.{md,json}`` with machine, commit and settings.
Loopback only; every loop is bounded in time. On a 2-core machine the edges' drafting shares
the CPUs with the cloud, so the ratio includes that contention, not only the verifier's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from pipesd.launch import PROMPTS, load_pair, start_server_subprocess, stop_process

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import git_commit  # noqa: E402  (bench/soak/run.py)

TOKENS = {"alice": "tok-alice-flood", "bob": "tok-bob-victim"}


def bob_tpt(port: int, draft, args) -> dict:
    """Bob's generations: every prompt, ``--rounds`` times; TPT over all of them."""
    from pipesd.edge import EdgeClient, EdgeConfig

    cfg = EdgeConfig.for_method(args.method, offline_policy="fail")
    tokens, wall, per = 0, 0.0, []
    with EdgeClient(f"127.0.0.1:{port}", draft, cfg, auth_token=TOKENS["bob"], client_name="bob") as c:
        c.generate(PROMPTS[0], 8)  # warm the connection and the caches
        for _ in range(args.rounds):
            for p in PROMPTS[: args.prompts]:
                g = c.generate(p, args.max_new_tokens)
                tokens += g.stats.new_tokens
                wall += g.stats.wall_s
                per.append(g.stats.tpt_s)
    return {"tokens": tokens, "wall_s": wall, "tpt_ms": 1e3 * wall / max(1, tokens),
            "tpt_ms_per_generation": [round(1e3 * x, 3) for x in per]}


class Flood:
    """Alice's load: generators, idle sessions and connections, and silent raw sockets."""

    def __init__(self, port: int, pair, args) -> None:
        self.port, self.pair, self.args = port, pair, args
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.refused: dict[str, int] = {}
        self.tokens = 0
        self.threads: list[threading.Thread] = []
        self.conns: list = []
        self.raw: list[socket.socket] = []
        self.raw_opened = 0
        self.idle_sessions = 0

    def start(self) -> None:
        for i in range(self.args.generators):
            t = threading.Thread(target=self._generate, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        time.sleep(1.0)  # the generators hold their connections and sessions first
        self._idle()
        t = threading.Thread(target=self._silent, daemon=True)
        t.start()
        self.threads.append(t)

    def _generate(self, i: int) -> None:
        from pipesd.edge import EdgeClient, EdgeConfig
        from pipesd.models import DraftModel

        try:
            draft = DraftModel(self.pair.draft.model, self.pair.draft.tokenizer, threads=1)
            cfg = EdgeConfig.for_method(self.args.method, offline_policy="fail")
            with EdgeClient(f"127.0.0.1:{self.port}", draft, cfg, auth_token=TOKENS["alice"],
                            client_name=f"alice-{i}") as c:
                k = i
                while not self.stop.is_set():
                    g = c.generate(PROMPTS[k % len(PROMPTS)], self.args.max_new_tokens)
                    self.tokens += g.stats.new_tokens
                    k += 1
        except Exception as e:
            self.errors.append(f"generator {i}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")

    def _idle(self) -> None:
        """Idle connections until alice's connection quota refuses her, and idle sessions on
        them up to what her session quota leaves her generators (more would refuse their next
        open: her own quota, not a fault)."""
        import numpy as np

        from pipesd.cloud.identities import DEFAULT_QUOTA
        from pipesd.transport import conn
        from pipesd.transport import messages as M

        for _ in range(self.args.idle_connections):
            try:
                c = conn.EdgeConnection.connect("127.0.0.1", self.port, auth_token=TOKENS["alice"], tls=False)
            except conn.HandshakeError as e:
                self.refused["connections"] = self.refused.get("connections", 0) + 1
                if "quota connections" not in str(e):
                    self.errors.append(f"idle connection refused without naming the quota: {e}")
                continue
            self.conns.append(c)
        budget = min(self.args.idle_sessions, DEFAULT_QUOTA.max_sessions - self.args.generators) if self.conns else 0
        for sid in range(1, max(0, budget) + 1):
            c = self.conns[sid % len(self.conns)]
            c.send(M.OpenSession(session_id=sid, prompt_ids=np.arange(1, 9, dtype=np.int32), max_new_tokens=64))
            r = c.recv(30)
            if isinstance(r, M.SessionOpened):
                self.idle_sessions += 1
            else:
                self.errors.append(f"idle session {sid}: unexpected answer {r!r}")

    def _silent(self) -> None:
        """Keep ``--flood`` raw sockets open (the server evicts them; they are reopened)."""
        while not self.stop.is_set():
            alive = []
            for s in self.raw:
                try:
                    s.setblocking(False)
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        s.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    continue
                alive.append(s)
            self.raw = alive
            while len(self.raw) < self.args.flood and not self.stop.is_set():
                try:
                    self.raw.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))
                    self.raw_opened += 1
                except OSError:
                    break
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        for c in self.conns:
            c.close()
        for s in self.raw:
            s.close()


def metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="pipesd")
    ap.add_argument("--prompts", type=int, default=6, help="bob's prompts (the first N of launch.PROMPTS)")
    ap.add_argument("--rounds", type=int, default=1, help="times bob runs them, per phase")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--generators", type=int, default=4, help="alice's generating clients")
    ap.add_argument("--idle-connections", type=int, default=40, help="alice's idle connections (tried)")
    ap.add_argument("--idle-sessions", type=int, default=12, help="alice's idle sessions (at most her quota less --generators)")
    ap.add_argument("--flood", type=int, default=300, help="raw sockets that never send a Hello")
    ap.add_argument("--verify-pad-ms", type=float, default=0.0, help="emulated cloud compute per launch")
    ap.add_argument("--bound", type=float, default=1.5, help="loaded/unloaded TPT ratio bob may see")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="pipesd-fairness-"))
    tokens_file = tmp / "tokens.txt"
    tokens_file.write_text(f"alice {TOKENS['alice']}\nbob {TOKENS['bob']}\n")  # default quotas for both
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    proc, port = start_server_subprocess(None, threads=1, verify_pad_ms=args.verify_pad_ms,
                                         extra=("--auth-tokens", str(tokens_file), "--metrics-port", str(mport)))
    flood = None
    try:
        pair = load_pair(None, threads=1)
        print(f"fairness: server pid {proc.pid} on 127.0.0.1:{port}; bob: {args.prompts} prompts x "
              f"{args.max_new_tokens} tokens x {args.rounds}", flush=True)
        unloaded = bob_tpt(port, pair.draft, args)
        print(f"  bob unloaded: TPT {unloaded['tpt_ms']:.2f} ms ({unloaded['tokens']} tokens)", flush=True)
        flood = Flood(port, pair, args)
        flood.start()
        time.sleep(2.0)  # the flood reaches its steady state
        t0 = time.monotonic()
        alice_before = flood.tokens
        loaded = bob_tpt(port, pair.draft, args)
        alice_tokens0 = flood.tokens - alice_before
        print(f"  bob loaded:   TPT {loaded['tpt_ms']:.2f} ms ({loaded['tokens']} tokens, "
              f"{time.monotonic() - t0:.1f} s; alice generated {alice_tokens0} tokens meanwhile)", flush=True)
        text = metrics(mport)
        flood.close()
        errors = list(flood.errors)
    finally:
        if flood is not None:
            flood.stop.set()
        stop_process(proc)
        if proc.stderr is not None:
            err = proc.stderr.read()
            if "Traceback" in err:
                print(err[-3000:], file=sys.stderr)

    ratio = loaded["tpt_ms"] / unloaded["tpt_ms"]
    scraped = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith(("pipesd_cloud_identity", "pipesd_cloud_handshakes", "pipesd_cloud_clients_refused"))}
    result = {
        "bench": "soak-fairness", "commit": git_commit(), "machine": platform.platform(),
        "cpus": os.cpu_count(), "settings": vars(args),
        "bob_unloaded": unloaded, "bob_loaded": loaded, "tpt_ratio": round(ratio, 3),
        "within_bound": ratio <= args.bound, "alice_tokens": flood.tokens if flood else 0,
        "alice_refused_client_side": flood.refused if flood else {}, "raw_sockets_opened": flood.raw_opened if flood else 0,
        "alice_idle_connections": len(flood.conns) if flood else 0, "alice_idle_sessions": flood.idle_sessions if flood else 0,
        "server_metrics": scraped, "errors": errors,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak-fairness{args.tag}.json").write_text(json.dumps(result, indent=1))
    md = [f"# Fairness soak{args.tag}", "",
          f"commit {result['commit']}, {result['machine']}, {result['cpus']} CPUs; settings: "
          + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k not in ("out",)), "",
          "| figure | value |", "|---|---|",
          f"| bob TPT unloaded | {unloaded['tpt_ms']:.2f} ms |",
          f"| bob TPT loaded | {loaded['tpt_ms']:.2f} ms |",
          f"| **ratio loaded / unloaded** | **{ratio:.2f}x** (bound {args.bound}x: "
          f"{'within' if ratio <= args.bound else 'OVER'}) |",
          f"| alice tokens generated while bob ran | {alice_tokens0} |",
          f"| alice idle connections, idle sessions held | {result['alice_idle_connections']}, {result['alice_idle_sessions']} |",
          f"| alice refused (client side) | {result['alice_refused_client_side']} |",
          f"| raw sockets opened (never a Hello) | {result['raw_sockets_opened']} |",
          f"| errors | {len(errors)} |", "",
          "Server metrics at the end of the loaded phase:", "", "```",
          *[f"{k} {v:g}" for k, v in scraped.items()], "```", ""]
    (out / f"soak-fairness{args.tag}.md").write_text("\n".join(md))
    print(f"fairness: bob's TPT loaded / unloaded = {ratio:.2f}x (bound {args.bound}x); "
          f"{len(errors)} error(s); results in {out}/soak-fairness{args.tag}.md", flush=True)
    for e in errors[:5]:
        print(e, file=sys.stderr)
    return 0 if not errors and ratio <= args.bound else 1


if __name__ == "__main__":
    sys.exit(main())
