"""bench/e2e/run.py's own logic: its statistics, its argument errors, and one tiny real run that
checks every method's greedy output against the target (the benchmark's exit code says so)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "bench" / "e2e" / "run.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_ratio_interval_contains_the_point_and_is_paired():
    b = _bench()
    base = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    pt, lo, hi = b.ratio_ci(base, [x / 2 for x in base])
    # each prompt is exactly 2x faster: pairing makes every resample's ratio exactly 2
    assert (pt, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
    pt, lo, hi = b.ratio_ci(base, [12.0, 9.0, 31.0, 18.0, 70.0, 33.0])
    assert lo <= pt <= hi and lo < hi


def test_bootstrap_interval_brackets_the_median():
    b = _bench()
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 100.0]
    lo, hi = b.bootstrap_ci(xs)
    assert lo <= 5.0 <= hi and hi < 100.0  # one outlier does not move the median's interval


def test_dominated_by_needs_both_faster_and_no_costlier():
    b = _bench()
    rows = [{"method": "a", "tpt_s": 1.0, "cloud_busy_ms_per_token": 5.0},
            {"method": "b", "tpt_s": 2.0, "cloud_busy_ms_per_token": 5.0},
            {"method": "c", "tpt_s": 0.5, "cloud_busy_ms_per_token": 9.0},
            {"method": "edge-only", "tpt_s": 0.1, "cloud_busy_ms_per_token": 0.0}]
    assert b.dominated_by(rows[1], rows) == ["a"]
    assert b.dominated_by(rows[0], rows) == []  # c is faster but costs more cloud time
    assert b.dominated_by(rows[2], rows) == []


@pytest.mark.parametrize("args, says", [
    (["--pair", "/no/such/draft:/no/such/target"], "is not a model directory"),
    (["--pair", "no-such-pair"], "unknown pair"),
    (["--pair", "replay:/no/such/file.jsonl.gz"], "no recording"),
    (["--replay"], "--replay takes a pair name"),
    (["--scenarios", "S9-mars"], "unknown scenario"),
    (["--methods", "pipesd,warp-drive"], "unknown method"),
    (["--k-sweep", "2,x"], "--k-sweep"),
    (["--scenarios", "live-gguf"], "live-gguf needs a live pair with GGUF files"),
])
def test_bad_arguments_are_argparse_errors(args, says):
    p = subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr and "Traceback" not in p.stderr


def test_a_tiny_run_checks_exactness_and_writes_results(tmp_path):
    """Real server subprocess, real edge, two methods, two prompts: exit 0 only if every greedy
    output equals the target's; the JSON has per-generation rows and the header names the pair."""
    p = subprocess.run([sys.executable, str(RUN), "--scenarios", "S1-laptop", "--methods", "cloud-stream,vanilla-sd,pipesd",
                        "--k-sweep", "4", "--prompts", "bundled:2", "--max-new-tokens", "12", "--verify-ms", "2",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    assert d["header"]["pair"] == "stdlib-code (bundled)" and d["header"]["mode"] == "live"
    assert d["header"]["all_exact"] is True
    assert {g["method"] for g in d["generations"]} == {"cloud-stream", "vanilla-sd", "pipesd"}
    assert len([g for g in d["generations"] if g["method"] == "pipesd"]) == 2
    assert all(g["exact"] for g in d["generations"])
    row = next(r for r in d["rows"] if r["method"] == "pipesd")
    assert row["cloud_busy_ms_per_token"] > 0 and len(row["speedup_vs_cloud-stream"]) == 3
    assert (tmp_path / next(tmp_path.glob("e2e-*.json")).name.replace(".json", "-pareto.png")).is_file()


def test_the_live_gguf_scenario_serves_the_pairs_gguf_target(tmp_path):
    """live-gguf on a fetched pair: the cloud subprocess loads the pair's target GGUF with
    llama.cpp (and nothing else: --model with --target-gguf is refused), the edge drafts with
    the draft GGUF, and every greedy output equals the llama.cpp target's own greedy. The
    'fetched pair' is the bundled one, exported to GGUF in the test."""
    pytest.importorskip("llama_cpp")
    from pipesd import zoo
    from pipesd.zoo import gguf_export as gx

    root = tmp_path / "home" / "pairs" / "bundled-gguf"
    root.mkdir(parents=True)
    for role in ("draft", "target"):
        (root / role).symlink_to(zoo.pair_path() / role, target_is_directory=True)
        gx.export_gguf(zoo.pair_path() / role, root / f"{role}.gguf", "f32")
    (root / "pair.json").write_text("{}\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(RUN), "--pair", "bundled-gguf", "--scenarios", "live-gguf",
                        "--methods", "cloud-stream,pipesd", "--prompts", "bundled:1", "--max-new-tokens", "8",
                        "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PIPESD_HOME=str(tmp_path / "home")))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads((out / "e2e-full-bundled-gguf-live-gguf.json").read_text())
    assert d["header"]["pair"] == "bundled-gguf (live)" and d["header"]["all_exact"] is True
    assert {g["method"] for g in d["generations"]} == {"cloud-stream", "pipesd"}
    assert all(g["exact"] and g["scenario"] == "live-gguf" for g in d["generations"])


class _TieTarget:
    """A fake target: after any prefix, the greedy token is ``len(prefix) % 3`` with a clear
    margin, except after a prefix of length 6, where tokens 0 and 1 are within 0.01 (a near-tie)."""

    eos_token_id = None
    vocab_size = 4

    def new_session(self, prefix):
        import torch

        class S:
            def __init__(s, ids):
                s.ids = list(ids)

            def score(s, drafts):
                row = torch.zeros(4)
                if len(s.ids) == 6:
                    row[0], row[1] = 1.0, 0.99
                else:
                    row[len(s.ids) % 3] = 1.0
                return row[None]

            def commit(s, toks):
                s.ids += toks

            def close(s):
                pass

        return S(prefix)


def _gen(prompt, ids, finish="length"):
    from types import SimpleNamespace

    return SimpleNamespace(prompt_ids=prompt, token_ids=ids, verified=True, finish_reason=finish)


def test_exactness_accepts_a_divergence_only_at_a_near_tie_of_the_reference():
    run = _bench()
    ref = run.Reference(_TieTarget())
    prompt = [3, 3, 3, 3]  # greedy: position k (prefix length 4 + k) gives (4 + k) % 3, a tie at k = 2
    greedy = [1, 2, 0, 1, 2, 0]
    assert ref.tokens(prompt, 6) == greedy
    g = _gen(prompt, greedy)
    assert ref.exact(g, 6) and ref.ties[id(g)] == []  # test_perfect_match
    took_runner_up = _gen(prompt, [1, 2, 1, 1, 2, 0])  # the tie broken the other way, then greedy from there
    assert ref.exact(took_runner_up, 6)
    assert [t["pos"] for t in ref.ties[id(took_runner_up)]] == [2] and ref.ties[id(took_runner_up)][0]["margin"] < 0.02
    assert not ref.exact(_gen(prompt, [1, 0, 0, 1, 2, 0]), 6)  # a divergence with a clear margin
    assert not ref.exact(_gen(prompt, [1, 2, 3, 1, 2, 0]), 6)  # at the tie, but not the runner-up
    assert not ref.exact(_gen(prompt, [1, 2, 1, 0, 2, 0]), 6)  # after the tie, not the greedy from there
    assert not ref.exact(_gen(prompt, greedy[:4]), 6)  # cut short without EOS
    assert not run.Reference(_TieTarget(), tie_tol=0.0).exact(_gen(prompt, [1, 2, 1, 1, 2, 0]), 6)
