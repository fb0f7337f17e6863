"""Replay: a recording of the bundled pair, served back through the real runtime (a CloudServer
with the replay target, an EdgeClient with the replay draft), reproduces the live pair's greedy
runs token for token, for every method that verifies with the target.

Acceptance statistics: methods whose schedule does not depend on timing (serial drafting, or
the cloud decoding alone) must match the live run's exactly. A pipelined method's schedule
depends on when verdicts arrive (live and live differ too), so there the check is on the
models: every step the live draft was asked for and every verification the live target
scored, the replay answers as the live models did (the same token and top-k ids, the same
probabilities up to float32 noise; the same argmax up to and including the first mismatch,
all that greedy verification reads).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from pipesd import zoo
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.edge.config import METHODS
from pipesd.launch import PROMPTS, load_draft, load_target
from pipesd.models.replay import FORMAT, VERSION, ReplayDraft, ReplayTarget, load_recording, record
from pipesd.sampling import SamplingParams

from runtime_helpers import running_server

DATA = Path(__file__).parent / "data" / "replay-stdlib-code.jsonl.gz"
N = 32
TEXTS = PROMPTS[:3]
VERIFYING = [m for m in METHODS if m != "edge-only"]
CLOUD_DECODES = {"cloud-stream", "target-per-token"}  # no drafts: the schedule is one token per verdict


def timing_free(method: str) -> bool:
    """Whether the method's verifications and drafts are the same whatever the timing."""
    return method in CLOUD_DECODES or not EdgeConfig.for_method(method).pipeline


class SpyDraft:
    """The live draft, logging every step: (sequence before, token, prob, q ids, q probs)."""

    def __init__(self, draft) -> None:
        self._d, self.log = draft, []

    def __getattr__(self, name):
        return getattr(self._d, name)

    def step(self, params=SamplingParams(), generator=None, want_full_q=False):
        before = self._d.tokens
        st = self._d.step(params, generator, want_full_q)
        self.log.append((before, st.token, st.prob, st.q_ids.copy(), st.q_probs.copy()))
        return st


class SpySession:
    def __init__(self, s, log) -> None:
        self._s, self._log = s, log

    def __getattr__(self, name):
        return getattr(self._s, name)

    def score(self, draft):
        rows = self._s.score(draft)
        self._log.append((self._s.tokens, list(draft), rows.argmax(-1).tolist()))
        return rows

    def score_tree(self, tokens, parents):
        rows = self._s.score_tree(tokens, parents)
        self._log.append((self._s.tokens, (list(tokens), list(parents)), rows.argmax(-1).tolist()))
        return rows


class SpyTarget:
    """The live target, logging every scored job: (session tokens, drafts, argmax per row)."""

    def __init__(self, target) -> None:
        self._t, self.log = target, []

    def __getattr__(self, name):
        return getattr(self._t, name)

    def new_session(self, prompt_ids):
        return SpySession(self._t.new_session(prompt_ids), self.log)

    def score_batch(self, sessions, drafts):
        out = self._t.score_batch([s._s for s in sessions], drafts)
        for s, d, rows in zip(sessions, drafts, out):
            self.log.append((s._s.tokens, list(d), rows.argmax(-1).tolist()))
        return out


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair()


@pytest.fixture(scope="module")
def rec():
    return load_recording(DATA)


@pytest.fixture(scope="module")
def live_server(pair):
    spy = SpyTarget(pair.target)
    with running_server(spy) as (_, url):
        yield spy, url


@pytest.fixture(scope="module")
def replay_server(rec):
    with running_server(ReplayTarget(rec)) as (_, url):
        yield url


def generate_all(url, draft, method):
    with EdgeClient(url, draft, EdgeConfig.for_method(method)) as c:
        return [c.generate(t, N) for t in TEXTS]


def test_the_committed_recording_is_what_the_recorder_makes_of_the_bundled_pair(pair, rec):
    fresh = record(pair.draft, pair.target, TEXTS, N, lookahead=rec.header["lookahead"], pair_name="stdlib-code",
                   progress=None)
    assert [r.prompt_ids for r in fresh.prompts] == [r.prompt_ids for r in rec.prompts]
    assert [r.target for r in fresh.prompts] == [r.target for r in rec.prompts]
    for a, b in zip(fresh.prompts, rec.prompts):
        assert sorted(a.branches) == sorted(b.branches)
        for ea, eb in zip(a.draft + sum(a.branches.values(), []), b.draft + sum(b.branches.values(), [])):
            assert ea[0] == eb[0] and ea[2] == eb[2]
            np.testing.assert_allclose([ea[1], *ea[3]], [eb[1], *eb[3]], rtol=1e-5, atol=1e-7)


def test_recording_header_and_round_trip(rec, tmp_path):
    h = rec.header
    assert (h["format"], h["version"], h["greedy_only"]) == (FORMAT, VERSION, True)
    assert (h["pair_name"], h["max_new_tokens"], h["lookahead"], h["prompts"]) == ("stdlib-code", N, 48, 3)
    assert h["wire_topk"] == 8 and h["draft_vocab_size"] == h["target_vocab_size"] == 1024
    assert h["eos_token_id"] == 0 and h["tokenizer_id"] and h["text_exact"]
    for r in rec.prompts:
        assert len(r.target) == N + 1 or r.target[-1] == h["eos_token_id"]  # one past N: the scored bonus row
        assert len(r.draft) == min(N, len(r.target))
        for i, b in r.branches.items():
            assert r.draft[i][0] != r.target[i] and len(b) <= min(h["lookahead"] - 1, N - 1 - i)
    out = tmp_path / "again.jsonl.gz"
    rec.save(out)
    assert out.read_bytes() == DATA.read_bytes()  # what is read is all there is, written the same way
    assert DATA.stat().st_size < 100_000


def test_replay_models_are_labelled_and_load_through_specs():
    d, t = load_draft(f"replay:{DATA}"), load_target(f"replay:{DATA}")
    assert isinstance(d, ReplayDraft) and isinstance(t, ReplayTarget)
    assert d.replayed and t.replayed and d.pair_name == t.pair_name == "stdlib-code (replayed)"
    assert d.recorded_prompts == TEXTS and d.max_new_tokens == N


@pytest.mark.parametrize("method", VERIFYING)
def test_replay_reproduces_the_live_pair(pair, rec, live_server, replay_server, method):
    spy_t, live_url = live_server
    spy_t.log.clear()
    spy_d = SpyDraft(pair.draft)
    live = generate_all(live_url, spy_d, method)
    replay = generate_all(replay_server, ReplayDraft(rec), method)
    for g, r, p in zip(live, replay, rec.prompts):
        assert r.prompt_ids == g.prompt_ids == p.prompt_ids
        assert r.token_ids == g.token_ids == p.target[:N]
        assert r.text == g.text
    if timing_free(method):
        for g, r in zip(live, replay):
            for key in ("drafted", "verifications", "accepted_lengths", "verified_drafts", "accepted_drafts",
                        "rollbacks", "bonus_tokens", "trigger_reasons", "cloud_forwards", "wasted_forwards"):
                assert getattr(r.stats, key) == getattr(g.stats, key), key
    # Every question the live run put to the models, the replay answers as the live models did.
    d = ReplayDraft(rec)
    for before, tok, prob, qi, qp in spy_d.log:
        d.reset(before)
        st = d.step()
        assert st.token == tok and np.array_equal(st.q_ids, qi)
        # The live draft's own numbers differ in the last bits with its cache path (how many
        # tokens one forward fed); the recording holds one of them.
        np.testing.assert_allclose([st.prob, *st.q_probs], [prob, *qp], rtol=1e-5, atol=1e-7)
    t = ReplayTarget(rec)
    for tokens, draft, argmax in spy_t.log:
        if isinstance(draft, tuple):  # a tree: the replay answers every node on the live target's path
            toks, parents = draft
            got = t.new_session(tokens).score_tree(toks, parents).argmax(-1).tolist()
            assert got[0] == argmax[0]
            on_path = [False] * len(toks)
            for i, q in enumerate(parents):
                on_path[i] = (q < 0 or on_path[q]) and toks[i] == argmax[q + 1]
                if on_path[i]:
                    assert got[i + 1] == argmax[i + 1], (i, toks, parents)
            continue
        got = t.new_session(tokens).score(draft).argmax(-1).tolist()
        m = next((i for i, x in enumerate(draft) if x != argmax[i]), len(draft))
        assert got[: m + 1] == argmax[: m + 1]
    assert spy_d.log or method in CLOUD_DECODES
    assert spy_t.log


def test_an_unrecorded_prompt_is_refused(rec, replay_server):
    with EdgeClient(replay_server, ReplayDraft(rec)) as c:
        with pytest.raises(ValueError, match="not in the replay recording"):
            c.generate("def unrecorded():\n", 8)
    with pytest.raises(ValueError, match="does not start with a recorded prompt"):
        ReplayTarget(rec).new_session([5, 6, 7])


def test_past_the_recorded_length_or_lookahead_is_an_error_naming_the_position(rec):
    r, d = rec.prompts[0], ReplayDraft(rec)
    d.reset(r.prompt_ids + r.target[:N])
    with pytest.raises(ValueError, match=f"position {N} of the target's path was not recorded"):
        d.step()
    i, branch = next((i, b) for i, b in r.branches.items() if b and b[-1][0] != rec.header["eos_token_id"])
    d.reset(r.prompt_ids + r.target[:i] + [r.draft[i][0]] + [e[0] for e in branch])
    with pytest.raises(ValueError, match=f"position {i + len(branch) + 1} after the divergence at {i}"):
        d.step()
    stray = next(t for t in range(1, 1024) if t not in (r.target[i], r.draft[i][0]))
    d.reset(r.prompt_ids + r.target[:i] + [stray])
    with pytest.raises(ValueError, match=f"leaves the recording at position {i}"):
        d.step()
    s = ReplayTarget(rec).new_session(r.prompt_ids + r.target[:N - 1])
    s.score([r.target[N - 1]])  # row N (scored past the last draft, clipped at max_new_tokens = N) is recorded
    with pytest.raises(ValueError, match=f"position {N + 1} of the target's path was not recorded"):
        s.score([r.target[N - 1], r.target[N]])  # a draft at position N: a run longer than the recording


def test_target_rows_argmax_is_the_path_up_to_the_first_mismatch(rec):
    r = rec.prompts[0]
    s = ReplayTarget(rec).new_session(r.prompt_ids + r.target[:3])
    wrong = (r.target[5] + 1) % 1024
    rows = s.score(r.target[3:5] + [wrong, 9, 9])
    assert rows.shape == (6, 1024)
    assert rows.argmax(-1).tolist()[:3] == r.target[3:6]  # rows up to the mismatch at draft index 2
    tree = s.score_tree([r.target[3], wrong, r.target[4]], [-1, -1, 0])
    assert tree.argmax(-1).tolist()[:2] == r.target[3:5] and tree[3].argmax() == r.target[5]


def test_sampling_is_refused(rec, replay_server):
    with EdgeClient(replay_server, ReplayDraft(rec)) as c:  # by the cloud, at open
        with pytest.raises(RuntimeError, match="greedy sessions only"):
            c.generate(TEXTS[0], 8, sampling=SamplingParams(temperature=0.8))
    d = ReplayDraft(rec)  # and by the replay draft itself, whatever cloud it talks to
    d.reset(rec.prompts[0].prompt_ids)
    with pytest.raises(ValueError, match="greedy only"):
        d.step(SamplingParams(temperature=0.8))


def test_the_cloud_refuses_a_sampling_session_on_a_replay_target(pair, replay_server):
    """A live draft cannot get sampled verdicts out of a recording either: the cloud refuses the
    session when it opens (a replay target holds no distributions to sample from)."""
    with EdgeClient(replay_server, pair.draft) as c:
        with pytest.raises(RuntimeError, match="greedy sessions only"):
            c.generate(TEXTS[0], 8, sampling=SamplingParams(temperature=0.8))


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing-prompt", "not-a-recording"])
def test_a_damaged_file_is_refused_clearly(tmp_path, damage):
    raw = DATA.read_bytes()
    lines = gzip.decompress(raw).decode().splitlines()
    if damage == "truncated":
        data = raw[: len(raw) // 2]
    elif damage == "corrupt":
        data = raw[:100] + bytes(b ^ 0xFF for b in raw[100:140]) + raw[140:]
    elif damage == "missing-prompt":
        data = gzip.compress(("\n".join(lines[:-1]) + "\n").encode())
    else:
        data = gzip.compress(b'{"hello": 1}\n')
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=r"replay file .*bad\.jsonl\.gz"):
        load_draft(f"replay:{bad}")
    with pytest.raises(ValueError, match="no such file"):
        load_target(f"replay:{tmp_path / 'absent.jsonl.gz'}")


def test_pipesd_serve_serves_a_replay(rec):
    """``pipesd serve --model replay:FILE`` (the benchmarks' server), verification padded outside the model."""
    from pipesd.launch import start_server_subprocess, stop_process

    proc, port = start_server_subprocess(f"replay:{DATA}", verify_pad_ms=5.0)
    try:
        with EdgeClient(f"127.0.0.1:{port}", ReplayDraft(rec), EdgeConfig.for_method("pipesd", draft_step_s=0.001)) as c:
            g = c.generate(TEXTS[1], N)
        assert g.token_ids == rec.prompts[1].target[:N]
    finally:
        stop_process(proc)
