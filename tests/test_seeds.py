"""Sampling seeds: a run without a seed draws a fresh one (so unseeded runs differ) and
reports it in its stats (so the run can be replayed); a seeded run repeats."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipesd import launch, zoo
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.sampling import SamplingParams

from runtime_helpers import running_server

PROMPT = "def parse_args(argv):\n"
N_NEW = 16
SERIAL = ["vanilla-sd", "target-per-token"]  # bit-reproducible for a seed (pipelined runs are not: timing)


@pytest.fixture(scope="module")
def bundled():
    pair = zoo.load_pair(threads=1)
    with running_server(pair.target) as (srv, url):
        yield pair, url


@pytest.mark.parametrize("method", SERIAL + ["pipesd"])
def test_unseeded_runs_differ_and_each_reports_its_seed(bundled, method):
    pair, url = bundled
    with EdgeClient(url, pair.draft, EdgeConfig.for_method(method)) as c:
        runs = [c.generate(PROMPT, N_NEW, SamplingParams(1.0)) for _ in range(4)]
    seeds = [g.stats.seed for g in runs]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 4
    assert len({tuple(g.token_ids) for g in runs}) > 1


@pytest.mark.parametrize("method", SERIAL)
def test_the_reported_seed_replays_the_run_and_a_given_seed_repeats(bundled, method):
    pair, url = bundled
    with EdgeClient(url, pair.draft, EdgeConfig.for_method(method)) as c:
        first = c.generate(PROMPT, N_NEW, SamplingParams(1.0))
        replay = c.generate(PROMPT, N_NEW, SamplingParams(1.0, seed=first.stats.seed))
        seeded = [c.generate(PROMPT, N_NEW, SamplingParams(1.0, seed=7)) for _ in range(2)]
    assert replay.token_ids == first.token_ids and replay.stats.seed == first.stats.seed
    assert seeded[0].token_ids == seeded[1].token_ids and seeded[0].stats.seed == 7


def test_greedy_runs_draw_no_seed(bundled):
    pair, url = bundled
    with EdgeClient(url, pair.draft) as c:
        assert c.generate(PROMPT, 4).stats.seed is None


def _generate(port: int, *args: str) -> tuple[list[str], int]:
    """`pipesd generate` at temperature 1 (vanilla-sd): its token ids and the seed it printed."""
    r = subprocess.run([sys.executable, "-m", "pipesd", "generate", PROMPT, "--cloud", f"127.0.0.1:{port}",
                        "--method", "vanilla-sd", "--temperature", "1", "--max-new-tokens", str(N_NEW),
                        "--threads", "1", "--show-ids", *args], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    (ids,) = re.findall(r"^pipesd: token ids: (.*)$", r.stderr, re.M)
    (seed,) = re.findall(r"^\[sampling\] seed (\d+) \(replay: --seed \1\)$", r.stderr, re.M)
    return ids, int(seed)


def test_cli_draws_a_seed_by_default_prints_it_and_replays_it():
    proc, port = launch.start_server_subprocess(None, threads=1)
    try:
        (ids_a, seed_a), (_, seed_b) = _generate(port), _generate(port)
        ids_r, seed_r = _generate(port, "--seed", str(seed_a))
    finally:
        launch.stop_process(proc)
    assert seed_a != seed_b  # no seed given: a fresh one each run
    assert (ids_r, seed_r) == (ids_a, seed_a)  # the printed seed replays the run
