"""bench/fleet/run.py's core on a tiny curve: a real `pipesd serve` subprocess, real edges.

Checks the result document's shape and that its figures agree with each other; no timing bounds."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_fleet_{name}", ROOT / "bench" / "fleet" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    run = _load("run")
    args = run.parse_args(["--ns", "1,2", "--replicas", "1", "--modes", "batch,nobatch,stream", "--duration", "0.3",
                           "--max-new-tokens", "6", "--warmup", "0", "--draft-ms", "5", "--verify-ms", "2"])
    doc = run.run_curve(args)
    out = tmp_path_factory.mktemp("fleet")
    paths = run.write_results(doc, out, "-test")
    return json.loads((out / "fleet-curve-test.json").read_text()), paths


def test_the_curve_has_every_point_with_its_header(curve):
    doc, paths = curve
    h = doc["header"]
    assert {"machine", "commit", "date", "pair", "settings", "skipped"} <= set(h)
    assert h["pair"] == "bundled" and h["settings"]["ns"] == [1, 2]
    assert sorted((p["mode"], p["n_edges"]) for p in doc["points"]) == [
        ("batch", 1), ("batch", 2), ("nobatch", 1), ("nobatch", 2), ("stream", 1), ("stream", 2)]
    assert {p.suffix for p in paths} >= {".json", ".md"}


def test_goodput_and_tpt_are_positive_and_consistent(curve):
    doc, _ = curve
    for p in doc["points"]:
        assert p["errors"] == 0, p["error_samples"]
        assert p["tokens"] > 0 and p["generations"] >= p["n_edges"]
        assert p["goodput_tok_s"] == pytest.approx(p["tokens"] / p["elapsed_s"])
        assert 0 < p["tpt_min_s"] <= p["tpt_p50_s"] <= p["tpt_p99_s"]
        # no edge commits faster than its fastest generation: N edges over the elapsed time
        assert p["goodput_tok_s"] <= p["n_edges"] / p["tpt_min_s"] * (1 + 1e-9)
        assert p["server"]["launches"] > 0 and p["sessions_per_launch"] >= 1.0
        assert p["cloud_busy_per_token_s"] > 0 and math.isfinite(p["tokens_per_verification"])
        assert p["method"] == ("cloud-stream" if p["mode"] == "stream" else "pipesd")


def test_nobatch_serves_one_session_per_launch(curve):
    # `serve --max-batch-sessions 1`: every launch verifies exactly one session
    doc, _ = curve
    nob = [p for p in doc["points"] if p["mode"] == "nobatch"]
    assert nob and all(p["server"]["launches"] == p["server"]["verifications"] for p in nob)


def test_the_validator_reads_the_curve_and_reports_an_error_per_point(curve):
    doc, _ = curve
    res = _load("validate_sim").validate(doc)
    assert len(res["rows"]) == len(doc["points"])
    for row in res["rows"]:
        assert row["simulated"]["goodput_tok_s"] > 0 and math.isfinite(row["rel_error"]["goodput"])
