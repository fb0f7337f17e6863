"""Prompt-lookup proposals: hit rate and the effective draft cost per committed token.

    python bench/e2e/lookup.py [--prompts humaneval:8] [--tokens 96] [--real-prompts 6]

(a) The bundled pair, end to end (cloud on a thread, no link emulation, greedy, method pipesd):
    lookup off and on over the same prompts; the outputs must be equal (lossless), and the run
    stats give draft forwards and measured draft seconds per committed token, the lookup hits,
    proposals and accepted lookup tokens.
(b) The real pair (Qwen2.5-Coder 0.5B -> 1.5B) on HumanEval, from the recorded target greedy
    continuations (bench/results/replay/): along the target's path, at each position the edge
    proposes the lookup token (when the index has a hit, at most ``max_tokens`` in a row) or the
    draft's own recorded greedy token. From the token sequences alone: the hit rate, how many
    lookup proposals equal the target's token, the fused proposal's agreement with the target
    against the draft's alone, and draft forwards per committed token. With the real 0.5B draft
    present (``--real-prompts N`` > 0), the same walk is run with the live draft on the first N
    prompts, timing its steps (catch-up forwards of looked-up tokens included).

The path model counts one proposal per committed position (what a serial edge drafting from the
committed prefix pays); a pipelined edge also drafts past a rejection before it hears of it, so
(a)'s end-to-end figures are the ones a deployment sees. Writes bench/results/lookup-hit-rate.md/.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "e2e"))

REPLAY = ROOT / "bench" / "results" / "replay" / "qwen2.5-coder-0.5b-1.5b.jsonl.gz"
REAL_DRAFT = Path("/root/.cache/pipesd/pairs/qwen2.5-coder-0.5b-1.5b/draft")
SETTINGS = [dict(max_n=3, min_n=1, max_tokens=8, confirm=False), dict(max_n=3, min_n=1, max_tokens=8, confirm=True),
            dict(max_n=3, min_n=2, max_tokens=8, confirm=False), dict(max_n=3, min_n=2, max_tokens=8, confirm=True),
            dict(max_n=4, min_n=3, max_tokens=8, confirm=False), dict(max_n=4, min_n=3, max_tokens=8, confirm=True)]


class _PathDraft:
    """A draft that serves recorded greedy tokens: ``steps[i]`` after ``prompt + target[:i]``."""

    vocab_size = 1 << 31

    def __init__(self, prompt: list[int], steps: list[int]) -> None:
        self.n0, self.steps, self.tokens = len(prompt), steps, []

    def reset(self, ids) -> None:
        self.tokens = list(ids)

    def truncate(self, length: int) -> None:
        del self.tokens[length:]

    def extend(self, ids) -> None:
        self.tokens.extend(ids)

    def step(self, params=None, generator=None, want_full_q: bool = False):
        import numpy as np

        from pipesd.models.runners import DraftStep

        t = self.steps[len(self.tokens) - self.n0]
        self.tokens.append(t)
        return DraftStep(t, 1.0, np.array([t]), np.array([1.0]))


def _defaults() -> dict:
    from pipesd.edge import EdgeConfig

    c = EdgeConfig()
    return dict(max_n=c.lookup_max_n, min_n=c.lookup_min_n, max_tokens=c.lookup_max_tokens, confirm=c.lookup_confirm)


DEFAULT = _defaults()
RUNS = {"off": dict(lookup="off"), "ngram": dict(lookup="ngram"),  # the EdgeConfig defaults
        "ngram-unconfirmed": dict(lookup="ngram", lookup_confirm=False),
        "ngram n1..3": dict(lookup="ngram", lookup_min_n=1, lookup_max_n=3),
        "ngram n1..3 unconfirmed": dict(lookup="ngram", lookup_min_n=1, lookup_max_n=3, lookup_confirm=False)}


def path_walk(prompt: list[int], target: list[int], draft_tokens: list[int], max_n: int, min_n: int,
              max_tokens: int, confirm: bool) -> dict:
    """Counts along the target's greedy path (``draft_tokens[i]``: the draft's greedy token after
    ``prompt + target[:i]``), with the runtime's own fusion (:class:`LookupDraft`): at each
    position one proposal, then the target's token is committed (kept, or a correction)."""
    from pipesd.edge.lookup import LookupDraft, NgramIndex

    d = LookupDraft(_PathDraft(prompt, draft_tokens), NgramIndex(max_n, min_n), max_tokens=max_tokens,
                    confirm=confirm)
    d.reset(prompt)
    c = dict(positions=0, proposals=0, lookup_right=0, draft_right=0, fused_right=0)
    for i, t in enumerate(target[:len(draft_tokens)]):
        st = d.step()
        c["positions"] += 1
        c["draft_right"] += draft_tokens[i] == t
        c["fused_right"] += st.token == t
        if d.last_lookup:
            c["proposals"] += 1
            c["lookup_right"] += st.token == t
        if st.token != t:  # a correction: the rollback the cloud's verdict would make
            d.truncate(len(prompt) + i)
            d.extend([t])
    hits_all = NgramIndex(max_n, min_n)  # the hit rate: positions whose suffix occurred earlier
    hits_all.reset(prompt)
    c["hits"] = 0
    for t in target[:len(draft_tokens)]:
        c["hits"] += hits_all.lookup() is not None
        hits_all.append(t)
    c["model_steps"] = d.model_steps
    return c


def _sum(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        for k, v in r.items():
            out[k] = out.get(k, 0) + v
    return out


def _path_summary(c: dict) -> dict:
    n = max(1, c["positions"])
    return dict(c, hit_rate=c["hits"] / n, proposal_rate=c["proposals"] / n,
                lookup_precision=c["lookup_right"] / max(1, c["proposals"]),
                draft_agreement=c["draft_right"] / n, fused_agreement=c["fused_right"] / n,
                draft_forwards_per_token=c["model_steps"] / n)


def bundled(prompts: list[str], tokens: int) -> dict:
    """(a): end to end on the bundled pair, lookup off then on (same prompts, greedy)."""
    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.edge import EdgeClient, EdgeConfig
    from pipesd.launch import load_pair

    pair = load_pair()
    server = CloudServer(pair.target, CloudConfig(port=0))
    host, port = server.start_in_thread()
    out: dict = {"runs": {}, "path": {}}
    try:
        with EdgeClient(f"{host}:{port}", pair.draft) as client:
            client.generate(prompts[0], 8)  # warm-up
            gens = {}
            for mode, kw in RUNS.items():
                cfg = EdgeConfig.for_method("pipesd", **kw)
                gens[mode] = [client.generate(p, tokens, config=cfg) for p in prompts]
    finally:
        server.stop()
    for mode in RUNS:
        assert [g.token_ids for g in gens["off"]] == [g.token_ids for g in gens[mode]], f"{mode} changed the output"
    for mode, gs in gens.items():
        n = sum(g.stats.new_tokens for g in gs)
        s = lambda k: sum(getattr(g.stats, k) for g in gs)  # noqa: E731
        out["runs"][mode] = dict(committed=n, drafted=s("drafted"), draft_steps=s("draft_steps"), draft_s=s("draft_s"),
                                 lookup_hits=s("lookup_hits"), lookup_proposals=s("lookup_proposals"),
                                 lookup_accepted=s("lookup_accepted"), wall_s=s("wall_s"),
                                 acceptance_rate=s("accepted_drafts") / max(1, s("verified_drafts")),
                                 draft_forwards_per_token=s("draft_steps") / max(1, n),
                                 draft_ms_per_token=1e3 * s("draft_s") / max(1, n), tpt_ms=1e3 * s("wall_s") / max(1, n),
                                 lookup_share_of_drafts=s("lookup_proposals") / max(1, s("drafted")))
    # the path model on the same pair, from the target's greedy output and the draft's greedy steps
    d = pair.draft
    walks = {i: [] for i in range(len(SETTINGS))}
    for g in gens["off"]:
        ids = list(g.prompt_ids)
        dt = []
        for i in range(len(g.token_ids)):
            d.reset(ids + g.token_ids[:i])
            dt.append(int(d.logits().argmax()))
        for k, sset in enumerate(SETTINGS):
            walks[k].append(path_walk(ids, g.token_ids, dt, **sset))
    out["path"] = {json.dumps(s): _path_summary(_sum(walks[k])) for k, s in enumerate(SETTINGS)}
    return out


def real_pair(real_prompts: int) -> dict:
    """(b): the recorded real pair's paths; with the live 0.5B draft, timed steps on a few prompts."""
    from pipesd.models.replay import load_recording

    rec = load_recording(REPLAY)
    out: dict = {"prompts": len(rec.prompts), "path": {}}
    for s in SETTINGS:
        rows = [path_walk(r.prompt_ids, r.target, [e[0] for e in r.draft], **s) for r in rec.prompts]
        out["path"][json.dumps(s)] = _path_summary(_sum(rows))
    if real_prompts > 0 and REAL_DRAFT.is_dir():
        out["live"] = live_draft_walk(rec.prompts[:real_prompts], DEFAULT)
    return out


def live_draft_walk(records, s: dict) -> dict:
    """The real 0.5B draft along the recorded paths: every position a draft step (lookup off),
    or a lookup proposal when there is one (on); measured draft seconds per committed token."""
    import torch

    from pipesd.edge.lookup import LookupDraft, NgramIndex
    from pipesd.models import DraftModel
    from pipesd.sampling import SamplingParams

    torch.set_num_threads(1)
    draft = DraftModel.from_pretrained(REAL_DRAFT, threads=1)
    modes = {"off": dict(s, max_tokens=0), "ngram": s, "ngram n1..3": dict(s, min_n=1, max_n=3)}
    acc = {mode: dict(positions=0, draft_steps=0, draft_s=0.0, agree=0) for mode in modes}
    for r in records:  # modes interleaved per prompt: a load change on the machine hits them alike
        for mode, m in modes.items():
            c = acc[mode]
            # lookup off: max_tokens 0, so a hit is never used and every position is a draft step
            d = LookupDraft(draft, NgramIndex(m["max_n"], m["min_n"]), max_tokens=m["max_tokens"], confirm=m["confirm"])
            draft.reset(r.prompt_ids)
            draft.logits()  # the prompt's prefill, outside the timing
            d.reset(r.prompt_ids)
            for i, t in enumerate(r.target):
                t0 = time.perf_counter()
                st = d.step(SamplingParams())
                dt = time.perf_counter() - t0
                if not d.last_lookup:
                    c["draft_steps"] += 1
                    c["draft_s"] += dt
                c["agree"] += st.token == t
                c["positions"] += 1
                if st.token != t:  # a correction: the rollback the cloud's verdict would make
                    d.truncate(len(r.prompt_ids) + i)
                    d.extend([t])
    res = {}
    for mode, c in acc.items():
        n = max(1, c["positions"])
        res[mode] = dict(positions=c["positions"], draft_steps=c["draft_steps"], draft_s=c["draft_s"],
                         agreement=c["agree"] / n, draft_forwards_per_token=c["draft_steps"] / n,
                         draft_ms_per_token=1e3 * c["draft_s"] / n,
                         ms_per_forward=1e3 * c["draft_s"] / max(1, c["draft_steps"]))
    return res


def write_md(path: Path, data: dict) -> None:
    a, b = data["bundled"], data["real_pair"]
    lines = [f"# Prompt-lookup proposals: hit rate and draft cost per committed token",
             "", f"Commit `{data['commit']}`, machine {data['machine']}, {data['date']}.",
             f"Command: `{data['command']}`.", "",
             f"## (a) Bundled pair ({data['bundled_pair']}), end to end, method pipesd, greedy, "
             f"{data['settings']['prompts']} x {data['settings']['tokens']} tokens",
             "", f"Lookup settings of `ngram` (the EdgeConfig defaults): {_label(DEFAULT)}, confidence 0.9; the other rows "
                 "change what their name says. Outputs with lookup on equal those with it off (asserted).", "",
             "| lookup | committed | drafted | lookup proposals (share) | lookup accepted | draft forwards / token "
             "| draft ms / token | acceptance | TPT ms |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in a["runs"].items():
        lines.append(f"| {mode} | {r['committed']} | {r['drafted']} | {r['lookup_proposals']} "
                     f"({r['lookup_share_of_drafts']:.1%}) | {r['lookup_accepted']} | {r['draft_forwards_per_token']:.3f} "
                     f"| {r['draft_ms_per_token']:.3f} | {r['acceptance_rate']:.3f} | {r['tpt_ms']:.2f} |")
    lines += ["", "Path model (one proposal per committed position, along the target's greedy path):", ""]
    lines += _path_table(a["path"])
    lines += ["", f"## (b) Real pair (qwen2.5-coder-0.5b -> 1.5b), HumanEval, recorded target greedy paths "
                  f"({b['prompts']} prompts x 64 tokens, {REPLAY.relative_to(ROOT)})", ""]
    lines += _path_table(b["path"])
    if "live" in b:
        lines += ["", f"Live 0.5B draft along the first {data['settings']['real_prompts']} paths (1 CPU thread; "
                      f"`ngram`: {_label(DEFAULT)}; `ngram n1..3`: n 1..3, confirmed), the same walk as the path "
                      "model with the draft's steps timed (catch-up forwards included):", "",
                  "| lookup | positions | draft forwards / token | ms / forward | draft ms / token | proposal = target |",
                  "|---|---|---|---|---|---|"]
        for mode, r in b["live"].items():
            lines.append(f"| {mode} | {r['positions']} | {r['draft_forwards_per_token']:.3f} | {r['ms_per_forward']:.1f} | "
                         f"{r['draft_ms_per_token']:.1f} | {r['agreement']:.3f} |")
    lines += ["", "Terms: hit rate = positions whose last n tokens occurred earlier; proposal rate = positions "
                  "drafted by lookup (a hit is not used after max_tokens in a row); lookup precision = lookup "
                  "proposals equal to the target's token; agreement = proposals equal to the target's token "
                  "(draft alone vs fused); draft forwards / token = draft-model steps per committed token."]
    path.write_text("\n".join(lines) + "\n")


def _label(s: dict) -> str:
    return f"n {s['min_n']}..{s['max_n']}, <= {s['max_tokens']} in a row, {'confirmed' if s['confirm'] else 'unconfirmed'}"


def _path_table(p: dict) -> list[str]:
    rows = ["| settings | positions | hit rate | proposal rate | lookup precision | draft agreement | fused agreement "
            "| draft forwards / token |", "|---|---|---|---|---|---|---|---|"]
    for k, r in p.items():
        s = json.loads(k)
        rows.append(f"| {_label(s)} | {r['positions']} | "
                    f"{r['hit_rate']:.3f} | {r['proposal_rate']:.3f} | {r['lookup_precision']:.3f} | "
                    f"{r['draft_agreement']:.3f} | {r['fused_agreement']:.3f} | {r['draft_forwards_per_token']:.3f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="humaneval:8", help="prompt set for (a) (pipesd.prompts spec)")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per prompt in (a)")
    ap.add_argument("--real-prompts", type=int, default=6, help="prompts timed with the live 0.5B draft (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from run import git_commit, machine

    from pipesd import zoo
    from pipesd.prompts import load_prompt_set

    prompts = load_prompt_set(args.prompts)
    data = dict(commit=git_commit(), machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command="python bench/e2e/lookup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                bundled_pair=zoo.DEFAULT_PAIR,
                settings=dict(prompts=args.prompts, tokens=args.tokens, real_prompts=args.real_prompts,
                              path_settings=SETTINGS))
    data["bundled"] = bundled(prompts, args.tokens)
    data["real_pair"] = real_pair(args.real_prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lookup-hit-rate.json").write_text(json.dumps(data, indent=1) + "\n")
    write_md(out / "lookup-hit-rate.md", data)
    print((out / "lookup-hit-rate.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
