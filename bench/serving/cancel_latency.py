"""The edge server after an abandoned stream (issue 16, item 5): a 1024-token stream cut after
``--cut-s`` seconds must not delay the next request. It prints the next 32-token request's
latency against an idle server's (the median of ``--idle`` requests) and exits 1 when the ratio
is above ``--max-ratio`` (2). A coarse check on wall time, so it lives here, not in tests/.

    python bench/serving/cancel_latency.py [--cut-s 2] [--verify-pad-ms 0] [--json OUT]

Bundled pair, cloud and edge server in this process, on loopback, greedy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import httpx
import torch

from pipesd import zoo
from pipesd.cloud import CloudConfig, CloudServer
from pipesd.edge import EdgeClient
from pipesd.serving import create_app, start_in_thread

PROMPT = "import os\nimport sys\n\n\ndef main():\n"
MODEL = "stdlib-code"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cut-s", type=float, default=2.0, help="read the long stream this long, then hang up")
    ap.add_argument("--long", type=int, default=1024, help="max_tokens of the stream that is cut")
    ap.add_argument("--short", type=int, default=32, help="max_tokens of the requests timed")
    ap.add_argument("--idle", type=int, default=3, help="requests timed on the idle server")
    ap.add_argument("--verify-pad-ms", type=float, default=0.0, help="pad each verification (a slower cloud)")
    ap.add_argument("--max-ratio", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pair = zoo.load_pair(threads=1)
    cloud = CloudServer(pair.target, CloudConfig(port=0, verify_pad_s=args.verify_pad_ms / 1e3))
    host, port = cloud.start_in_thread()
    client = EdgeClient(f"{host}:{port}", pair.draft)
    app = create_app(client, model_name=MODEL, max_tokens_limit=args.long, default_temperature=0)
    short = {"model": MODEL, "prompt": PROMPT, "max_tokens": args.short}
    try:
        with start_in_thread(app, timeout_s=30) as st:
            def timed() -> float:
                t0 = time.perf_counter()
                r = httpx.post(st.url + "/v1/completions", json=short, timeout=300)
                r.raise_for_status()
                return time.perf_counter() - t0

            timed()  # warm-up
            idle = statistics.median(timed() for _ in range(args.idle))
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": args.long, "stream": True}
            pieces = 0
            with httpx.stream("POST", st.url + "/v1/completions", json=body, timeout=300) as r:
                t_end = time.perf_counter() + args.cut_s
                for line in r.iter_lines():
                    pieces += line.startswith("data: {")
                    if time.perf_counter() > t_end:
                        break
            after = timed()
            health = httpx.get(st.url + "/health", timeout=30).json()
    finally:
        client.close()
        cloud.stop()
    out = {"idle_s": idle, "after_cut_s": after, "ratio": after / idle, "cut_after_s": args.cut_s,
           "pieces_read": pieces, "cancelled": health.get("cancelled"), "verify_pad_ms": args.verify_pad_ms,
           "long": args.long, "short": args.short}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if out["ratio"] > args.max_ratio:
        print(f"FAIL: the request after the cut took {out['ratio']:.2f}x an idle one's time "
              f"(limit {args.max_ratio}x)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
