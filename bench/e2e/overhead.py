"""Framework overhead: what PipeSD costs beyond the models.

    python bench/e2e/overhead.py [--tokens 256] [--prompts 4]

Edge: time the compute and send threads spend outside the draft forward, the compute-profile
padding, verdict waits and the (emulated) wire: ring pushes/pops, trigger, planning,
framing, verdict bookkeeping. Reported per drafted token (target: <= 50 us).
Cloud: verifier time outside the target forward and the verification kernel: packing
tensors, session bookkeeping, verdict assembly. Reported per verification (target: <= 1 ms).

Edge and cloud run in this one process (the cloud on a thread), both on the bundled pair with
no padding and a LAN link, so both sides are as busy as they can be; sharing the GIL makes
the figures conservative (an upper bound of the overhead in separate processes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "e2e"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from run import git_commit, machine

    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.edge import EdgeClient, EdgeConfig
    from pipesd.launch import PROMPTS, load_pair, make_link

    pair = load_pair()
    server = CloudServer(pair.target, CloudConfig(port=0))
    host, port = server.start_in_thread()
    rows = []
    try:
        with EdgeClient(f"{host}:{port}", pair.draft, link=make_link("lan")) as client:
            client.generate(PROMPTS[0], 8)
            for method in ("pipesd", "vanilla-sd"):
                s0 = (server.stats.batched_launches, server.stats.overhead_s, server.stats.forward_s, server.stats.kernel_s)
                drafted = over = 0.0
                t0 = time.perf_counter()
                tokens = 0
                for p in PROMPTS[: args.prompts]:
                    g = client.generate(p, args.tokens, config=EdgeConfig.for_method(method))
                    drafted += g.stats.drafted
                    over += g.stats.edge_overhead_s
                    tokens += g.stats.new_tokens
                wall = time.perf_counter() - t0
                st = server.stats
                launches = st.batched_launches - s0[0]
                rows.append({
                    "method": method, "tokens": tokens, "drafted": int(drafted), "wall_s": wall,
                    "edge_overhead_us_per_draft": 1e6 * over / max(1, drafted),
                    "cloud_overhead_ms_per_verification": 1e3 * (st.overhead_s - s0[1]) / max(1, launches),
                    "cloud_forward_ms_per_verification": 1e3 * (st.forward_s - s0[2]) / max(1, launches),
                    "cloud_kernel_ms_per_verification": 1e3 * (st.kernel_s - s0[3]) / max(1, launches),
                    "verifications": launches,
                })
    finally:
        server.stop()
    header = {"machine": machine(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "settings": {"tokens": args.tokens, "prompts": args.prompts, "link": "lan", "pair": "stdlib-code",
                           "threads": 1, "in_process": True}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(f"machine {header['machine']['processor']} x{header['machine']['cpus']}, commit {header['commit']}")
    print("| method | edge overhead us/draft (target <= 50) | cloud overhead ms/verification (target <= 1) | "
          "cloud forward ms | kernel ms | verifications |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['edge_overhead_us_per_draft']:.1f} | {r['cloud_overhead_ms_per_verification']:.3f} | "
              f"{r['cloud_forward_ms_per_verification']:.2f} | {r['cloud_kernel_ms_per_verification']:.3f} | "
              f"{r['verifications']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
