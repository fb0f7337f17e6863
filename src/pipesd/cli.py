"""Command line: ``pipesd serve | generate | demo``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["main"]


def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _is_local_dir(spec: str) -> bool:
    return os.path.sep in spec or spec.startswith(".") or Path(spec).is_dir()


def load_target(spec: Optional[str], threads: Optional[int] = None):
    """``spec``: a local model directory, or a bundled pair name (None: the default pair)."""
    from pipesd import zoo
    from pipesd.models import TargetModel

    if spec and _is_local_dir(spec):
        if not Path(spec).is_dir():
            raise SystemExit(f"pipesd: --model {spec}: no such directory (models load from local paths only)")
        return TargetModel.from_pretrained(spec, threads=threads)
    if spec and spec not in zoo.available():
        raise SystemExit(f"pipesd: --model {spec!r} is neither a directory nor a bundled pair ({', '.join(zoo.available())})")
    return zoo.load_pair(spec, threads=threads).target


def load_draft(spec: Optional[str], threads: Optional[int] = None):
    from pipesd import zoo
    from pipesd.models import DraftModel

    if spec and _is_local_dir(spec):
        if not Path(spec).is_dir():
            raise SystemExit(f"pipesd: --draft {spec}: no such directory (models load from local paths only)")
        return DraftModel.from_pretrained(spec, threads=threads)
    if spec and spec not in zoo.available():
        raise SystemExit(f"pipesd: --draft {spec!r} is neither a directory nor a bundled pair ({', '.join(zoo.available())})")
    return zoo.load_pair(spec, threads=threads).draft


def make_link(args) -> Optional[object]:
    """A LinkEmulator from ``--link PRESET`` and/or explicit ``--up-mbps/--down-mbps/--delay-ms``."""
    from pipesd.transport import link as L

    if args.link in (None, "none") and args.up_mbps is None:
        return None
    if args.link not in (None, "none"):
        up, down = L.link_preset(args.link)
    else:
        up = down = None
    if args.up_mbps is not None or up is None:
        mbps = args.up_mbps if args.up_mbps is not None else 10.0
        up = L.LinkProfile(mbps * 1e6, (args.delay_ms or 0.0) / 1e3, (args.msg_overhead_ms or 0.0) / 1e3)
        down_mbps = args.down_mbps if args.down_mbps is not None else mbps * 10
        down = L.LinkProfile(down_mbps * 1e6, (args.delay_ms or 0.0) / 1e3, 0.0)
    if getattr(args, "trace", None):
        trace = L.BandwidthTrace.from_csv(args.trace)
        up = L.LinkProfile(up.bandwidth_bps, up.delay_s, up.per_message_s, trace)
    return L.LinkEmulator(up, down)


def _add_link_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link", default=None, help="link preset: lan, wifi, 4g, slow, paper (default: no emulation)")
    p.add_argument("--up-mbps", type=float, default=None, help="uplink bandwidth in Mbit/s (overrides the preset)")
    p.add_argument("--down-mbps", type=float, default=None, help="downlink bandwidth in Mbit/s")
    p.add_argument("--delay-ms", type=float, default=None, help="one-way delay in ms")
    p.add_argument("--msg-overhead-ms", type=float, default=None, help="per-message startup cost in ms")
    p.add_argument("--trace", default=None, help="uplink bandwidth trace CSV (time_s,bandwidth_bps)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def _sampling(args):
    from pipesd.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)


# ---------------------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    import asyncio

    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.fingerprint import tokenizer_fingerprint

    _set_threads(args.threads)
    target = load_target(args.model, args.threads)
    token = args.auth_token if args.auth_token is not None else os.environ.get("PIPESD_AUTH_TOKEN", "")
    cfg = CloudConfig(host=args.host, port=args.port, auth_token=token, max_sessions=args.max_sessions,
                      max_prompt_tokens=args.max_prompt_tokens, max_draft_in_flight=args.max_draft_in_flight,
                      verify_pad_s=args.verify_pad_ms / 1e3)
    server = CloudServer(target, cfg, tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(server.serve())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        while not server._started.is_set():
            await asyncio.sleep(0.01)
        print(f"pipesd: cloud serving on {server.address[0]}:{server.address[1]}", flush=True)
        if args.port_file:
            Path(args.port_file).write_text(str(server.address[1]))
        await task

    asyncio.run(run())
    print("pipesd: cloud stopped", flush=True)
    return 0


# ---------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from pipesd.edge import EdgeClient, EdgeConfig

    _set_threads(args.threads)
    draft = load_draft(args.draft, args.threads)
    cfg = EdgeConfig.for_method(args.method, draft_step_s=args.draft_ms / 1e3)
    token = args.auth_token if args.auth_token is not None else os.environ.get("PIPESD_AUTH_TOKEN", "")
    with EdgeClient(args.cloud, draft, cfg, auth_token=token, link=make_link(args)) as client:
        for piece in client.stream(args.prompt, args.max_new_tokens, _sampling(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        st = client.last_generation.stats
    sys.stdout.write("\n")
    print(f"[{args.method}] {st.new_tokens} tokens, TPT {st.tpt_s * 1e3:.1f} ms, mean accepted "
          f"{st.mean_accepted:.2f}, {st.verifications} verifications, {st.rollbacks} rollbacks", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- demo
DEMO_PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "for key, value in sorted(items.items()):\n",
]


def start_server_subprocess(model: Optional[str], *, threads: int = 1, verify_pad_ms: float = 0.0,
                            auth_token: str = "", timeout_s: float = 120.0, extra: tuple = ()) -> tuple[subprocess.Popen, int]:
    """Start ``pipesd serve`` on a free port in its own process; returns (process, port)."""
    import tempfile

    port_file = Path(tempfile.mkdtemp(prefix="pipesd-")) / "port"
    cmd = [sys.executable, "-m", "pipesd", "serve", "--port", "0", "--threads", str(threads),
           "--verify-pad-ms", str(verify_pad_ms), "--port-file", str(port_file), *extra]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, PIPESD_AUTH_TOKEN=auth_token)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud server exited early:\n{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the cloud server did not start within {timeout_s} s")


def cmd_demo(args) -> int:
    import secrets

    import numpy as np

    from pipesd.edge import EdgeClient, EdgeConfig

    _set_threads(1)
    print("pipesd demo: bundled pair, edge and cloud on this machine", flush=True)
    token = secrets.token_hex(8)
    t0 = time.perf_counter()
    proc, port = start_server_subprocess(args.model, threads=1, verify_pad_ms=args.verify_pad_ms, auth_token=token)
    print(f"  cloud up on 127.0.0.1:{port} ({time.perf_counter() - t0:.1f} s); loading the draft...", flush=True)
    results = {}
    try:
        draft = load_draft(args.draft, 1)
        link = make_link(args)
        link_desc = args.link or "none"
        print(f"  link: {link_desc}; edge draft step padded to {args.draft_ms:.0f} ms; cloud verify padded to "
              f"{args.verify_pad_ms:.0f} ms; {len(DEMO_PROMPTS[: args.prompts])} prompts x {args.max_new_tokens} tokens",
              flush=True)
        methods = args.methods.split(",")
        with EdgeClient(f"127.0.0.1:{port}", draft, auth_token=token, link=link) as client:
            for method in methods:
                cfg = EdgeConfig.for_method(method, draft_step_s=args.draft_ms / 1e3, k=args.k)
                rows = []
                for i, prompt in enumerate(DEMO_PROMPTS[: args.prompts]):
                    if method == "pipesd" and i == 0 and not args.quiet:
                        print(f"\n--- {method}, prompt {i + 1} (streamed as verified) ---", flush=True)
                        sys.stdout.write(prompt)
                        for piece in client.stream(prompt, args.max_new_tokens, config=cfg):
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                        g = client.last_generation
                        print("\n---", flush=True)
                    else:
                        g = client.generate(prompt, args.max_new_tokens, config=cfg)
                    rows.append(g)
                    print(f"  {method:18s} prompt {i + 1}: {g.stats.new_tokens} tokens, TPT {g.stats.tpt_s * 1e3:6.1f} ms",
                          flush=True)
                results[method] = rows
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    _print_demo_table(results, args)
    if args.json:
        out = {m: [g.stats.to_dict() for g in rows] for m, rows in results.items()}
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    # Lossless check the user can see: PipeSD's tokens equal target-only's.
    if "target-only" in results and "pipesd" in results:
        same = all(a.token_ids == b.token_ids for a, b in zip(results["pipesd"], results["target-only"]))
        print(f"PipeSD output identical to target-only greedy output: {'yes' if same else 'NO'}")
        if not same:
            return 1
    return 0


def _print_demo_table(results: dict, args) -> None:
    import numpy as np

    def tpt(m):
        rows = results.get(m)
        return float(np.median([g.stats.tpt_s for g in rows])) if rows else float("nan")

    base_v, base_t = tpt("vanilla-sd"), tpt("target-only")
    print()
    print(f"| method | TPT (ms, median) | mean accepted | verifications / 100 tok | speedup vs vanilla SD | speedup vs target-only |")
    print("|---|---|---|---|---|---|")
    for m, rows in results.items():
        t = tpt(m)
        acc = np.mean([g.stats.mean_accepted for g in rows])
        ver = 100 * sum(g.stats.verifications for g in rows) / max(1, sum(g.stats.new_tokens for g in rows))
        print(f"| {m} | {t * 1e3:.1f} | {acc:.2f} | {ver:.1f} | {base_v / t:.2f}x | {base_t / t:.2f}x |")
    print()


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from pipesd.edge.config import METHODS

    p = argparse.ArgumentParser(prog="pipesd", description="Cloud-edge pipelined speculative decoding")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the cloud verification server")
    s.add_argument("--model", default=None, help="target model directory or bundled pair name (default: bundled)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7070, help="0 picks a free port")
    s.add_argument("--auth-token", default=None, help="shared secret (default: $PIPESD_AUTH_TOKEN or none)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--max-sessions", type=int, default=64)
    s.add_argument("--max-prompt-tokens", type=int, default=4096)
    s.add_argument("--max-draft-in-flight", type=int, default=256)
    s.add_argument("--verify-pad-ms", type=float, default=0.0, help="emulate a slower cloud: pad each verification")
    s.add_argument("--port-file", default=None, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="generate text with an edge client (streams to the terminal)")
    g.add_argument("prompt")
    g.add_argument("--cloud", required=True, help="HOST:PORT of `pipesd serve`")
    g.add_argument("--draft", default=None, help="draft model directory or bundled pair name (default: bundled)")
    g.add_argument("--method", default="pipesd", choices=METHODS)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--auth-token", default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--draft-ms", type=float, default=0.0, help="emulate a slower edge: pad each draft step")
    _add_link_args(g)
    _add_sampling_args(g)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="cloud + edge on this machine with the bundled pair; prints a comparison")
    d.add_argument("--model", default=None, help="target (default: bundled)")
    d.add_argument("--draft", default=None, help="draft (default: bundled)")
    d.add_argument("--prompts", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--methods", default="target-only,vanilla-sd,pipesd")
    d.add_argument("--k", type=int, default=4, help="draft length of vanilla SD")
    d.add_argument("--draft-ms", type=float, default=30.0, help="edge compute profile: ms per draft token")
    d.add_argument("--verify-pad-ms", type=float, default=30.0, help="cloud compute profile: ms per verification")
    d.add_argument("--json", default=None, help="write the per-run stats here")
    d.add_argument("--quiet", action="store_true", help="do not stream the first generation")
    _add_link_args(d)
    d.set_defaults(fn=cmd_demo, link="4g")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, TimeoutError, ConnectionError, OSError) as e:
        print(f"pipesd: error: {e}", file=sys.stderr)
        return 1
