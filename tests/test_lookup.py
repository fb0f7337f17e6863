"""Prompt-lookup proposals (``pipesd.edge.lookup``): the proposer finds the longest, most recent
earlier match; a looked-up draft costs no draft forward and the draft's cache catches up later;
and with lookup on, greedy output is still exactly the target's and sampled output still follows
the target's distribution (several edges in one launch, a garbage proposer, planted bugs)."""
from __future__ import annotations

import random
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import pipesd.edge.pipeline as pipeline
import pipesd.verify as pv
from pipesd import launch, zoo
from pipesd.edge import EdgeClient, EdgeConfig, TriggerConfig
from pipesd.edge.lookup import LookupDraft, NgramIndex
from pipesd.models import DraftModel
from pipesd.sampling import SamplingParams, filtered_probs

import _stats as st
from runtime_helpers import reference_greedy, running_server, tiny_pair
from test_runtime_lossless import _chi2_pvalue, _exact_marginals


# --------------------------------------------------------------------------- the proposer
def _brute_lookup(toks: list[int], max_n: int, min_n: int):
    """The definition: for n from max_n down, the latest p < len with toks[p-n:p] == suffix."""
    end = len(toks)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        for p in range(end - 1, n - 1, -1):
            if toks[p - n:p] == toks[end - n:]:
                return toks[p], n
    return None


def test_longest_match_wins():
    ix = NgramIndex(max_n=3, min_n=1)
    # "5" alone last followed 6 (latest 1-gram match), but "3 4 5" earlier was followed by 9.
    ix.reset([3, 4, 5, 9, 8, 5, 6, 3, 4, 5])
    assert ix.lookup() == (9, 3)


def test_most_recent_occurrence_wins():
    ix = NgramIndex(max_n=2, min_n=1)
    ix.reset([1, 2, 7, 1, 2, 8, 0, 1, 2])
    assert ix.lookup() == (8, 2)


def test_no_hit_on_fresh_text():
    ix = NgramIndex(max_n=3, min_n=1)
    ix.reset([10, 11, 12, 13, 14])
    assert ix.lookup() is None
    ix.reset([4])
    assert ix.lookup() is None
    ix = NgramIndex(max_n=3, min_n=2)  # a repeated single token is not a 2-gram match
    ix.reset([7, 1, 8, 1])
    assert ix.lookup() is None


def test_index_after_appends_and_rollbacks_equals_the_definition():
    rng = random.Random(0)
    ix = NgramIndex(max_n=4, min_n=2)
    ix.reset([rng.randrange(5) for _ in range(6)])
    for _ in range(2000):
        if rng.random() < 0.15 and len(ix) > 1:
            ix.truncate(rng.randrange(1, len(ix)))
        else:
            ix.append(rng.randrange(5))
        assert ix.lookup() == _brute_lookup(ix.tokens, 4, 2), ix.tokens
    fresh = NgramIndex(4, 2)
    fresh.reset(ix.tokens)
    assert fresh._ends == ix._ends  # a rollback leaves no stale entry behind


def test_bad_settings_are_refused_naming_the_parameter():
    with pytest.raises(ValueError, match="lookup must be one of off, ngram"):
        EdgeConfig(lookup="suffix")
    with pytest.raises(ValueError, match="lookup_min_n .* must be <= lookup_max_n"):
        EdgeConfig(lookup="ngram", lookup_min_n=4, lookup_max_n=2)
    with pytest.raises(ValueError, match="lookup_confirm must be a bool"):
        EdgeConfig(lookup="ngram", lookup_confirm="yes")
    for name, bad in (("lookup_max_n", 0), ("lookup_max_tokens", 1.5), ("lookup_min_n", True)):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            EdgeConfig(lookup="ngram", **{name: bad})
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lookup_confidence must be in"):
            EdgeConfig(lookup="ngram", lookup_confidence=bad)


# --------------------------------------------------------------------------- fusion with the draft
def test_a_lookup_draft_costs_no_forward_and_the_cache_catches_up_in_one():
    draft, _, _ = tiny_pair()
    ld = LookupDraft(draft, NgramIndex(3, 1), confidence=0.8, max_tokens=4, confirm=False)
    prompt = [1, 2, 3, 4, 1, 2, 3]
    ld.reset(prompt)
    f0 = draft.forwards
    st1 = ld.step(SamplingParams())
    assert (st1.token, st1.prob, st1.q_ids.tolist(), st1.q_probs.tolist()) == (4, 0.8, [4], [1.0])
    assert ld.last_lookup and draft.forwards == f0 and draft.tokens == prompt + [4]
    for _ in range(3):  # 1 2 3: still the repeat, up to max_tokens in a row
        assert ld.step(SamplingParams()).prob == 0.8
    assert draft.forwards == f0 and ld.proposals == 4
    st2 = ld.step(SamplingParams())  # max_tokens reached: the draft model steps, feeding the 4 in one go
    assert not ld.last_lookup and ld.model_steps == 1
    assert draft.forwards - f0 == len(prompt) + 4  # the prompt's prefill plus the looked-up tail, one forward
    fresh, _, _ = tiny_pair()
    fresh.reset(prompt + [4, 1, 2, 3])
    assert st2.token == int(torch.argmax(fresh.logits()))  # the catch-up forward is the same as feeding it fresh
    assert ld.from_lookup[len(prompt):] == [True] * 4 + [False]
    ld.truncate(len(prompt) + 2)  # a rollback reaches the draft and the index alike
    assert draft.tokens == ld.index.tokens == prompt + [4, 1] and ld.lookup_tokens_in(0, 100) == 2


class FixedDraft:
    """A stand-in draft model that always drafts ``token`` (and counts its steps)."""

    vocab_size = 48

    def __init__(self, token: int) -> None:
        self.token, self.steps, self.tokens = token, 0, []

    def reset(self, ids):
        self.tokens = list(ids)

    def truncate(self, n):
        del self.tokens[n:]

    def extend(self, ids):
        self.tokens.extend(ids)

    def step(self, params=None, generator=None, want_full_q=False):
        from pipesd.models.runners import DraftStep

        self.steps += 1
        self.tokens.append(self.token)
        return DraftStep(self.token, 0.7, np.array([self.token]), np.array([1.0]))


def test_a_confirmed_copy_starts_only_where_the_draft_model_copied_too():
    prompt = [1, 2, 3, 4, 1, 2, 3]  # the lookup proposes 4, then 1 2 3 4 ...
    copier = LookupDraft(FixedDraft(4), NgramIndex(3, 1), max_tokens=8)  # confirm: the default
    copier.reset(prompt)
    assert copier.step().token == 4 and not copier.last_lookup  # a hit, unconfirmed: the model steps (and copies)
    assert [copier.step().token for _ in range(3)] == [1, 2, 3] and copier.inner.steps == 1  # the copy runs on
    copier.truncate(len(prompt) + 2)  # a rollback: trust is earned again
    assert copier.step().token == 4 and not copier.last_lookup and copier.inner.steps == 2
    other = LookupDraft(FixedDraft(9), NgramIndex(3, 1), max_tokens=8)
    other.reset(prompt)
    assert [other.step().token for _ in range(3)] == [9, 9, 9] and other.proposals == 0  # never confirmed


class CopyDraft(FixedDraft):
    """A stand-in draft model that repeats the sequence's period of 4 (so it copies as lookup does)."""

    def step(self, params=None, generator=None, want_full_q=False):
        self.token = self.tokens[-4]
        return super().step(params, generator, want_full_q)


def test_a_shadow_lookup_proposes_nothing_and_records_what_the_real_one_would():
    """Shadow (the adaptive schedule's measurement): the draft model drafts every token, and
    the positions and tokens recorded are the ones a real LookupDraft proposes on the same
    sequence (the model copies, so the two sequences stay equal)."""
    prompt = [1, 2, 3, 4, 1, 2, 3]
    real = LookupDraft(CopyDraft(0), NgramIndex(3, 1), max_tokens=2)
    shadow = LookupDraft(CopyDraft(0), NgramIndex(3, 1), max_tokens=2, shadow=True)
    for d in (real, shadow):
        d.reset(prompt)
    proposed = {}
    for _ in range(9):
        st = real.step()
        if real.last_lookup:
            proposed[len(real) - 1] = st.token
        assert shadow.step().token == st.token and not shadow.last_lookup
    assert shadow.inner.steps == 9 and shadow.proposals == 0 and shadow.lookup_tokens_in(0, 100) == 0
    assert real.proposals == shadow.shadow_count == 6 and shadow.shadow_at == proposed  # same rules, same positions
    # a verdict: the sequence holds the target's tokens up to its end; score and forget below it
    n = len(prompt)
    shadow.index.tokens[n + 2] = 99  # say the target's token there differs from the proposal
    checked, right = shadow.shadow_check(n, n + 4)
    assert (checked, right) == (sum(n <= p < n + 4 for p in proposed), sum(n <= p < n + 4 for p in proposed) - 1)
    assert min(shadow.shadow_at) >= n + 4
    shadow.truncate(n + 5)  # a rollback drops the proposals at and above it
    assert all(p < n + 5 for p in shadow.shadow_at)


# --------------------------------------------------------------------------- greedy, several edges in one launch
REPEATING = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2], [7, 8, 7, 8, 7, 8, 7], [20, 21, 22, 20, 21, 22, 20, 21],
             [9, 30, 9, 31, 9, 30, 9]]
N_NEW = 40


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def refs(pair):
    return {tuple(p): reference_greedy(pair[2], p, N_NEW) for p in REPEATING}


def _edges_at_once(url: str, pair, cfgs: list[EdgeConfig], prompts: list) -> dict:
    """One edge per config, all at once (each with its own draft), every prompt each."""
    out, errors = {}, []

    def worker(i: int, cfg: EdgeConfig) -> None:
        try:
            with EdgeClient(url, DraftModel(pair[0].model, wire_topk=8), cfg) as c:
                out[i] = [c.generate(p, N_NEW) for p in (prompts[i:] + prompts[:i])]
        except BaseException as e:  # reported by the test's own assertion
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(cfgs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert not errors, errors
    return out


LOOKUP_CFGS = [
    EdgeConfig.for_method("pipesd", lookup="ngram"),
    EdgeConfig.for_method("pipesd", lookup="ngram", lookup_max_tokens=1, lookup_min_n=2, lookup_confirm=False),
    EdgeConfig.for_method("vanilla-sd", k=4, lookup="ngram", lookup_confirm=False),
    EdgeConfig.for_method("pipesd", trigger=TriggerConfig(0.0, 0.0, 64), lookahead=64, lookup="ngram",
                          lookup_max_tokens=32, lookup_confirm=False),  # long runs: lookups far ahead, rollbacks
]


def test_greedy_with_lookup_equals_target_only_at_batch_above_one(pair, refs):
    with running_server(pair[1], verify_pad_s=0.003) as (srv, url):
        out = _edges_at_once(url, pair, LOOKUP_CFGS, REPEATING)
        assert srv.stats.max_batch >= 2, "the edges were never verified in one launch"
    hits = proposals = accepted = 0
    for i, gens in out.items():
        for p, g in zip(REPEATING[i:] + REPEATING[:i], gens):
            assert g.token_ids == refs[tuple(p)], f"{LOOKUP_CFGS[i].method} with lookup diverged on prompt {p}"
            s = g.stats
            assert s.lookup_proposals <= s.lookup_hits and s.lookup_accepted <= s.lookup_proposals
            assert s.drafted == s.lookup_proposals + s.draft_steps and s.draft_forwards_saved == s.lookup_proposals
            hits, proposals, accepted = hits + s.lookup_hits, proposals + s.lookup_proposals, accepted + s.lookup_accepted
    assert hits > 0 and proposals > 0 and accepted > 0, (hits, proposals, accepted)


class GarbageIndex(NgramIndex):
    """A planted wrong proposer: always a hit, never the right token's neighbour."""

    def lookup(self):
        return (self.tokens[-1] * 7 + 3) % 48, 1


def test_a_garbage_proposer_still_gives_the_exact_greedy_output(pair, refs, monkeypatch):
    def garbage(draft, cfg):
        return LookupDraft(draft, GarbageIndex(1, 1), confidence=cfg.lookup_confidence, max_tokens=cfg.lookup_max_tokens,
                           confirm=cfg.lookup_confirm)

    monkeypatch.setattr(pipeline, "_lookup_draft", garbage)
    cfgs = [EdgeConfig.for_method("pipesd", lookup="ngram", lookup_confirm=False),
            EdgeConfig.for_method("pipesd", lookup="ngram", trigger=TriggerConfig(0.0, 0.0, 16), lookup_max_tokens=3,
                                  lookup_confirm=False)]
    with running_server(pair[1], verify_pad_s=0.003) as (srv, url):
        out = _edges_at_once(url, pair, cfgs, REPEATING)
    rollbacks = 0
    for i, gens in out.items():
        for p, g in zip(REPEATING[i:] + REPEATING[:i], gens):
            assert g.token_ids == refs[tuple(p)]
            assert g.stats.lookup_proposals > 0
            rollbacks += g.stats.rollbacks
    assert rollbacks > 0  # the garbage was proposed, rejected and rolled back


# --------------------------------------------------------------------------- sampling: the verifier
def test_verify_chain_is_exact_with_a_one_hot_q_beside_a_wider_one():
    """A deterministic draft's q is one-hot (top-k ids [x], probs [1], zero-padded to the batch's
    k): the emitted token is distributed as p; the same draft reported with a soft q is caught."""
    g = torch.Generator().manual_seed(5)
    V, R, k = 12, 60_000, 4
    x = 1.5 * torch.randn(1, 2, V, generator=g)
    want = filtered_probs(x[0, 0], 1.0)
    tok = int(torch.argsort(want)[V // 2])  # a mid-probability token: accepted about p(tok) of the time
    onehot_ids, onehot_p = torch.zeros(1, 1, k, dtype=torch.long), torch.zeros(1, 1, k)
    onehot_ids[..., 0], onehot_p[..., 0] = tok, 1.0
    soft_ids = torch.tensor([[[tok, (tok + 1) % V, (tok + 2) % V, (tok + 3) % V]]])
    soft_p = torch.full((1, 1, k), 0.25)
    for ids, probs, ok in ((onehot_ids, onehot_p, True), (soft_ids, soft_p, False)):
        v = pv.verify_chain(x.expand(R, 2, V), torch.full((R, 1), tok), torch.ones(R, dtype=torch.long),
                            mode="sample", draft_topk_ids=ids.expand(R, 1, k), draft_topk_probs=probs.expand(R, 1, k),
                            temperature=1.0, seed=7, bonus=False)
        counts = st.hist(v.tokens[:, 0], V)
        if ok:
            st.check(counts, want, "one-hot q")
            assert abs(float((v.accepted == 1).double().mean()) - float(want[tok])) < 0.01  # accepted with p(x)
        else:
            assert st.fails(counts, want), "a deterministic draft verified against a soft q was not caught"


# --------------------------------------------------------------------------- sampling: end to end
class SoftQLookup(LookupDraft):
    """A planted bug: lookup tokens sent with the draft-like q (x at 0.5, the rest spread), not one-hot."""

    def step(self, params=None, generator=None, want_full_q: bool = False):
        s = super().step(params, generator, want_full_q)
        if self.last_lookup:
            s.q_ids = np.array([s.token, (s.token + 1) % 12, (s.token + 2) % 12], dtype=np.int32)
            s.q_probs = np.array([0.5, 0.25, 0.25], dtype=np.float32)
        return s


def _sampled_counts(url, draft, prompt, depth, n, vocab, cfg, seed0):
    counts, hits = np.zeros((depth, vocab)), 0
    with EdgeClient(url, draft, cfg) as client:
        for i in range(n):
            g = client.generate(prompt, depth, SamplingParams(1.0, 0, 1.0, 0.0, seed=seed0 + i))
            hits += g.stats.lookup_proposals
            for d, t in enumerate(g.token_ids):
                counts[d, t] += 1
    return counts, hits


def test_sampling_with_lookup_matches_the_target_distribution_and_a_soft_q_is_caught(monkeypatch):
    vocab, depth, n = 12, 3, 1200
    draft, target, target_m = tiny_pair(vocab=vocab, noise=0.6, wire_topk=4)
    prompt = [1, 2, 1, 2, 1]  # repeats: lookups propose from the first step on
    exact = _exact_marginals(target_m, prompt, SamplingParams(1.0, 0, 1.0), depth)
    cfg = EdgeConfig.for_method("pipesd", trigger=TriggerConfig(0.2, 0.3, 4), lookup="ngram", lookup_max_tokens=2,
                                lookup_confirm=False)
    with running_server(target) as (srv, url):
        counts, proposals = _sampled_counts(url, draft, prompt, depth, n, vocab, cfg, 0)
        assert proposals > n  # most generations drafted with lookups
        for d in range(depth):
            p = _chi2_pvalue(counts[d], exact[d])
            assert p > 1e-3, f"position {d}: sampled distribution with lookup differs from the target's (p={p:.2e})"
        monkeypatch.setattr(pipeline, "_lookup_draft",
                            lambda d, c: SoftQLookup(d, NgramIndex(3, 1), max_tokens=2, confirm=False))
        bad, _ = _sampled_counts(url, draft, prompt, depth, n // 2, vocab, cfg, 10_000)
    assert min(_chi2_pvalue(bad[d], exact[d]) for d in range(depth)) < 1e-6, "the planted soft q was not caught"


# --------------------------------------------------------------------------- the CLI
def test_generate_lookup_flag_reports_hits_and_stays_exact():
    import json

    from pipesd.models import load_local

    prompt = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
    model, tok = load_local(zoo.pair_path() / "target")
    want = reference_greedy(model, tok.encode(prompt, add_special_tokens=False), 24)
    proc, port = launch.start_server_subprocess(None, threads=1)
    try:
        r = subprocess.run([sys.executable, "-m", "pipesd", "generate", prompt, "--cloud", f"127.0.0.1:{port}",
                            "--max-new-tokens", "24", "--threads", "1", "--lookup", "ngram", "--show-ids"],
                           capture_output=True, text=True, timeout=180)
    finally:
        launch.stop_process(proc)
    assert r.returncode == 0, r.stderr
    (ids,) = [ln for ln in r.stderr.splitlines() if ln.startswith("pipesd: token ids: ")]
    assert json.loads(ids.split(": ", 2)[2]) == want
    m = re.search(r"^\[lookup\] (\d+) hits, (\d+) proposals \((\d+) draft forwards saved\), (\d+) accepted; "
                  r"(\d+) draft forwards$", r.stderr, re.M)
    assert m and int(m.group(2)) > 0 and int(m.group(2)) == int(m.group(3)), r.stderr


def test_generate_lookup_refuses_an_unknown_mode():
    r = subprocess.run([sys.executable, "-m", "pipesd", "generate", "x", "--cloud", "127.0.0.1:9", "--lookup", "lz"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "argument --lookup: invalid choice: 'lz'" in r.stderr and "Traceback" not in r.stderr
