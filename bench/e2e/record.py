"""Record a real draft/target pair once, for replay where the target is too slow to time.

    python bench/e2e/record.py --pair qwen2.5-coder-0.5b-1.5b --prompts humaneval:6 --max-new-tokens 64 \\
        --out bench/results/replay/qwen2.5-coder-0.5b-1.5b-humaneval6x64.jsonl.gz
    python bench/e2e/record.py --pair stdlib-code --prompts bundled:3 --max-new-tokens 32 \\
        --out tests/data/replay-stdlib-code.jsonl.gz

``--pair`` is any spec ``pipesd.launch.load_draft`` / ``load_target`` take for both halves (a
bundled or fetched pair name, a local pair directory); ``--draft`` / ``--target`` set a half
on its own. The file is what ``replay:FILE`` serves (docs/models.md, "Replay"); greedy only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _prompts(spec: str) -> list[str]:
    try:
        from pipesd.prompts import load_prompt_set
    except ImportError:  # older trees: bundled:N or a file of prompts separated by '---' lines
        from pipesd.launch import PROMPTS

        name, _, n = spec.partition(":")
        if name == "bundled":
            if not n.isdigit() or not 1 <= int(n) <= len(PROMPTS):
                raise ValueError(f"--prompts {spec}: bundled:N with 1 <= N <= {len(PROMPTS)}")
            return PROMPTS[:int(n)]
        text = Path(spec).read_text(encoding="utf-8")
        return [p for p in text.split("\n---\n") if p.strip()]
    return load_prompt_set(spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="stdlib-code", help="pair spec for both halves (default: stdlib-code)")
    ap.add_argument("--draft", default=None, help="draft spec (default: --pair)")
    ap.add_argument("--target", default=None, help="target spec (default: --pair)")
    ap.add_argument("--prompts", default="bundled:3", help="bundled:N | humaneval:N[:OFFSET] | file:PATH")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="target tokens per prompt (N)")
    ap.add_argument("--lookahead", type=int, default=48, help="the edge's lookahead the branches cover (default 48, "
                    "EdgeConfig.lookahead)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", required=True, help="output file (.jsonl.gz)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.lookahead < 1:
        ap.error(f"--lookahead must be >= 1, got {args.lookahead}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    try:
        prompts = _prompts(args.prompts)
    except (ValueError, OSError) as e:
        ap.error(f"--prompts: {e}")
    from pipesd.launch import load_draft, load_target
    from pipesd.models.replay import record

    dspec, tspec = args.draft or args.pair, args.target or args.pair
    try:
        draft = load_draft(dspec, threads=args.threads)
        target = load_target(tspec, threads=args.threads)
    except (ValueError, RuntimeError) as e:
        ap.error(str(e))
    if getattr(draft, "replayed", False) or getattr(target, "replayed", False):
        ap.error("record a live pair, not a replay")
    name = Path(args.pair).name if args.draft is None and args.target is None else f"{dspec} / {tspec}"
    print(f"record: {name}, {len(prompts)} prompts x {args.max_new_tokens} tokens, lookahead {args.lookahead}",
          file=sys.stderr, flush=True)
    rec = record(draft, target, prompts, args.max_new_tokens, lookahead=args.lookahead, pair_name=name,
                 draft_spec=dspec, target_spec=tspec)
    rec.save(args.out)
    print(f"record: wrote {args.out} ({Path(args.out).stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
