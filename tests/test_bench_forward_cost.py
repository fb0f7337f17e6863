"""bench/trees/forward_cost.py: its argument errors, and its quick mode on the bundled draft writes
a complete, self-consistent table (every timed forward is checked inside to have fed n tokens)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "trees" / "forward_cost.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trees_forward_cost", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, says", [
    (["--backends", "bundled-torch,warp-drive"], "unknown backend"),
    (["--ns", "1,x"], "--ns"),
    (["--ns", "0,2"], "1..64"),
    (["--repeats", "1"], "--repeats must be >= 2"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_arguments_are_argparse_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_tree_is_width_two_breadth_first():
    par = _bench().tree_parents(7)
    assert par == [-1, -1, 0, 0, 1, 1, 2]
    assert all(p < i for i, p in enumerate(par))


def test_quick_run_on_the_bundled_draft_writes_every_cell(tmp_path):
    import torch

    threads = torch.get_num_threads()
    assert _bench().main(["--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the process-wide setting is given back
    d = json.loads((tmp_path / "draft-forward-cost-quick.json").read_text())
    s = d["header"]["settings"]
    assert s["quick"] and s["ns"] == [1, 2, 4] and s["repeats"] == 3 and s["torch_threads"] == 1
    assert d["header"]["commit"] and d["header"]["machine"]["cpus"]
    assert [b["backend"] for b in d["header"]["backends"]] == ["bundled-torch"]
    assert {sk["backend"] for sk in d["header"]["skipped"]} == {"bundled-gguf", "qwen0.5b-torch", "qwen0.5b-gguf"}
    cells = {(r["mode"], r["n"]): r for r in d["rows"]}
    assert set(cells) == {(m, n) for m in ("chain-last", "chain-all", "tree") for n in (1, 2, 4)}
    for (mode, n), r in cells.items():
        assert len(r["times_ms"]) == 3 and min(r["times_ms"]) > 0
        assert r["ci_ms"][0] <= r["median_ms"] <= r["ci_ms"][1]
        assert r["tokens_per_step"] == pytest.approx(n / r["ratio_to_step"])
    assert cells[("chain-last", 1)]["ratio_to_step"] == 1.0  # t(1) is the step itself
    md = (tmp_path / "draft-forward-cost-quick.md").read_text()
    assert "## bundled-torch (torch)" in md and md.count("| tree |") == 3
