"""Runners: rollback-able caches, chain / tree / batched scoring, draft sampling from the reported q.

Mechanics on tiny random Llamas built in-test; the bundled pair is tested in test_zoo.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipesd.models import DraftModel, TargetModel, check_same_vocab
from pipesd.sampling import SamplingParams, draft_distribution, filtered_probs

from runtime_helpers import tiny_llama

ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes 2 OpenMP threads crawl."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=40, seed=3)


@torch.inference_mode()
def fresh(model, ids):
    """Logits of a plain forward over ``ids`` (no cache)."""
    return model(torch.tensor([ids])).logits[0].float()


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------- target chains
def test_crop_and_refeed_equals_a_fresh_forward(model):
    t = TargetModel(model)
    s = t.new_session([1, 2, 3, 4])
    s.score([5, 6, 7, 8])  # cache now holds 8 tokens
    s.commit([5, 6])  # keep two, then diverge
    close(s.score([9, 10]), fresh(model, [1, 2, 3, 4, 5, 6, 9, 10])[-3:])
    s.truncate(3)
    assert s.tokens == [1, 2, 3]
    close(s.score([11]), fresh(model, [1, 2, 3, 11])[-2:])
    s.commit([11, 12, 13])
    close(s.score([14, 15]), fresh(model, [1, 2, 3, 11, 12, 13, 14, 15])[-3:])
    s.close()  # freed: the next score re-feeds everything
    close(s.score([]), fresh(model, [1, 2, 3, 11, 12, 13])[-1:])


def test_chain_scoring_equals_step_by_step(model):
    t = TargetModel(model)
    chain = [7, 3, 9, 1, 0, 22]
    rows = t.new_session([5, 6]).score(chain)
    assert rows.shape == (len(chain) + 1, 40) and rows.dtype == torch.float32
    close(rows, fresh(model, [5, 6] + chain)[1:])
    step = t.new_session([5, 6])
    for i in range(len(chain) + 1):
        close(rows[i], step.score([])[0])
        if i < len(chain):
            step.commit([chain[i]])
    assert step.tokens == [5, 6] + chain


def test_score_reuses_the_cache_and_the_kept_logits(model):
    t = TargetModel(model)
    s = t.new_session(list(range(10)))
    f0 = t.forwards
    s.score([10, 11, 12])
    assert t.forwards - f0 == 13  # prompt + draft, one forward
    s.commit([10, 11, 12])  # all accepted: the row after 12 is already known
    f1 = t.forwards
    out = s.score([13, 14])
    assert t.forwards - f1 == 2
    close(out, fresh(model, list(range(15)))[-3:])
    s.commit([13, 20])  # one accepted, then a correction: only the correction + new draft are fed
    f2 = t.forwards
    out = s.score([21])
    assert t.forwards - f2 == 2
    close(out, fresh(model, list(range(14)) + [20, 21])[-2:])
    f3 = t.forwards
    close(s.score([])[0], out[0])  # asking again costs nothing
    assert t.forwards == f3


# --------------------------------------------------------------------------- draft
def test_draft_truncate_extend_and_greedy(model):
    d = DraftModel(model, wire_topk=5)
    d.reset([1, 2, 3])
    steps = [d.step() for _ in range(4)]
    ids = [1, 2, 3] + [s.token for s in steps]
    assert d.tokens == ids
    for i, st in enumerate(steps):
        ref = fresh(model, ids[:3 + i])[-1]
        assert st.token == int(ref.argmax())
        assert st.prob == pytest.approx(float(torch.softmax(ref, -1)[st.token]), abs=1e-5)
        qi, qp = draft_distribution(ref, SamplingParams(temperature=1.0), 5)
        assert st.q_ids.dtype == np.int32 and st.q_probs.dtype == np.float32 and st.q_ids.shape == (5,)
        assert st.q_ids.tolist() == qi.tolist()
        np.testing.assert_allclose(st.q_probs, qp.numpy(), atol=1e-5)
        close(st.logits, ref)
    d.truncate(4)
    d.extend([17])
    f0 = d.forwards
    st = d.step()
    assert d.forwards - f0 == 1  # only the correction token is fed
    assert st.token == int(fresh(model, [1, 2, 3, ids[3], 17])[-1].argmax())
    d.truncate(5)  # back to a prefix whose last logits row is kept: no forward at all
    f1 = d.forwards
    assert d.step().token == st.token and d.forwards == f1
    d.reset([1, 2, 9])  # new sequence: the common prefix [1, 2] stays cached
    f2 = d.forwards
    close(d.logits(), fresh(model, [1, 2, 9])[-1])
    assert d.forwards - f2 == 1


def test_draft_long_rollback_equals_fresh(model):
    d = DraftModel(model)
    d.reset([4])
    for _ in range(80):  # more than the kept logits rows
        d.step()
    seq = d.tokens
    d.truncate(3)
    close(d.logits(), fresh(model, seq[:3])[-1])
    d.extend(seq[3:50])
    close(d.logits(), fresh(model, seq[:50])[-1])


def test_full_q_is_the_reported_q_over_the_vocabulary(model):
    d = DraftModel(model, wire_topk=4)
    d.reset([3, 1])
    st = d.step(SamplingParams(temperature=0.9, top_k=10), torch.Generator().manual_seed(1), want_full_q=True)
    assert st.full_q.shape == (40,) and st.full_q.dtype == np.float32
    assert float(st.full_q.sum()) == pytest.approx(1.0, abs=1e-6)
    assert np.count_nonzero(st.full_q) <= 4
    np.testing.assert_array_equal(st.full_q[st.q_ids.astype(np.int64)], st.q_probs)
    d.truncate(2)
    full = d.full_distribution(SamplingParams(temperature=0.9, top_k=10))
    close(full, filtered_probs(fresh(model, [3, 1])[-1], 0.9, 10))


def _chi2_pvalue(counts: dict, q: dict) -> float:
    from scipy import stats

    if set(counts) - set(q):
        return 0.0  # a token outside the reported q: impossible under the claim
    ids = sorted(q)
    obs = np.array([counts.get(i, 0) for i in ids], dtype=np.float64)
    exp = np.array([q[i] for i in ids], dtype=np.float64)
    return float(stats.chisquare(obs, exp / exp.sum() * obs.sum()).pvalue)


def test_draft_samples_from_exactly_the_reported_q(model):
    d = DraftModel(model, wire_topk=6)
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=0)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    counts: dict = {}
    d.reset([4, 5])
    q_ref = None
    for _ in range(n):
        d.truncate(2)
        st = d.step(params, g)
        q = dict(zip(st.q_ids.tolist(), st.q_probs.tolist()))
        if q_ref is None:
            q_ref = q
            ref_ids, ref_p = draft_distribution(fresh(model, [4, 5])[-1], params, 6)
            assert st.q_ids.tolist() == ref_ids.tolist()
            np.testing.assert_allclose(st.q_probs, ref_p.numpy(), atol=1e-6)
        assert q == q_ref  # same context, same q
        assert st.prob == q[st.token]
        counts[st.token] = counts.get(st.token, 0) + 1
    assert _chi2_pvalue(counts, q_ref) > 1e-3
    # Control: draws from the untruncated filtered distribution (what a buggy draft might
    # sample from while still reporting the top-k q) must fail the same test.
    full = filtered_probs(fresh(model, [4, 5])[-1], 1.3, 0, 0.95)
    assert int((full > 0).sum()) > 6
    ctrl = torch.multinomial(full, n, replacement=True, generator=torch.Generator().manual_seed(1)).tolist()
    ccounts: dict = {}
    for t in ctrl:
        ccounts[t] = ccounts.get(t, 0) + 1
    assert _chi2_pvalue(ccounts, q_ref) < 1e-6


def test_sampling_seeds_matter(model):
    d = DraftModel(model)
    params = SamplingParams(temperature=1.5)

    def run(seed):
        d.reset([2, 3])
        g = torch.Generator().manual_seed(seed)
        return [d.step(params, g).token for _ in range(12)]

    assert run(0) == run(0)
    assert run(0) != run(1)


# --------------------------------------------------------------------------- trees
def _random_tree(n: int, gen: torch.Generator, vocab: int):
    parents, tokens = [], []
    for i in range(n):
        parents.append(int(torch.randint(-1, i, (1,), generator=gen)) if i else -1)
        tokens.append(int(torch.randint(0, vocab, (1,), generator=gen)))
    return tokens, parents


def _path(tokens, parents, i):
    out = []
    while i >= 0:
        out.append(tokens[i])
        i = parents[i]
    return out[::-1]


def test_tree_scoring_equals_each_chain(model):
    t = TargetModel(model)
    gen = torch.Generator().manual_seed(0)
    s = t.new_session([3, 8, 1, 4])
    s.score([9, 9])  # a stale draft in the cache, to be cropped under the tree
    for n in (1, 5, 12):
        tokens, parents = _random_tree(n, gen, 40)
        f0 = t.forwards
        rows = s.score_tree(tokens, parents)
        assert t.forwards - f0 == n
        assert rows.shape == (n + 1, 40)
        close(rows[0], fresh(model, [3, 8, 1, 4])[-1])
        chains = t.new_session([3, 8, 1, 4])
        for i in range(n):
            path = _path(tokens, parents, i)
            close(rows[i + 1], chains.score(path)[-1])
        assert s.tokens == [3, 8, 1, 4]
    # the session's cache is still right after trees
    s.commit([5])
    close(s.score([6]), fresh(model, [3, 8, 1, 4, 5, 6])[-2:])
    with pytest.raises(ValueError, match="parents"):
        s.score_tree([1, 2], [-1, 1])


def test_expand_tree_greedy_and_sampling(model):
    d = DraftModel(model, wire_topk=4)
    d.reset([7, 2])
    chain = []
    for _ in range(4):
        chain.append(d.step().token)
    d.reset([7, 2])
    tree = d.expand_tree(SamplingParams(), width=2, depth=4, confidence=0.0)  # never branches: the greedy chain
    assert tree.tokens == chain and tree.parents == [-1, 0, 1, 2]
    assert d.tokens == [7, 2]
    wide = d.expand_tree(SamplingParams(), width=2, depth=3, confidence=1.01, max_nodes=100)
    assert len(wide) == 2 + 4 + 8  # full binary tree of depth 3
    assert wide.q_ids.shape == (15, 4)
    # children of every expanded node are its q's top tokens; leaves have zero q rows
    for i in range(len(wide)):
        kids = [wide.tokens[j] for j in range(len(wide)) if wide.parents[j] == i]
        if kids:
            assert kids == wide.q_ids[i + 1, :2].tolist()
        else:
            assert not wide.q_probs[i + 1].any()
    assert [wide.tokens[j] for j in range(len(wide)) if wide.parents[j] == -1] == wide.q_ids[0, :2].tolist()
    for i in range(len(wide)):
        assert wide.path(i)[-1] == wide.tokens[i] and len(wide.path(i)) == wide.depth(i)
    g = torch.Generator().manual_seed(3)
    st = d.expand_tree(SamplingParams(temperature=1.0), width=3, depth=2, confidence=1.01, max_nodes=100,
                       generator=g)
    assert len(st) == 3 + 9
    for i, (tok, par) in enumerate(zip(st.tokens, st.parents)):
        qi, qp = st.q_ids[par + 1], st.q_probs[par + 1]
        assert tok in qi.tolist() and st.probs[i] == pytest.approx(float(qp[qi.tolist().index(tok)]))
    # the target scores the drafted tree like any tree
    s = TargetModel(model).new_session([7, 2])
    rows = s.score_tree(wide.tokens, wide.parents)
    assert rows.shape == (15, 40)


# --------------------------------------------------------------------------- batches
def test_batched_score_equals_per_session_score(model):
    t = TargetModel(model)
    ref_t = TargetModel(model)
    gen = torch.Generator().manual_seed(5)
    prompts = [[1, 2, 3], list(range(0, 40)) + [1] * 5, [9], [4, 4, 4, 4, 4, 4, 4]]
    sess = [t.new_session(p) for p in prompts]
    refs = [ref_t.new_session(p) for p in prompts]
    sess[2].score([3])  # one session with a warm cache
    refs[2].score([3])
    for rnd in range(4):
        drafts = [torch.randint(0, 40, (int(torch.randint(0, 6, (1,), generator=gen)),), generator=gen).tolist()
                  for _ in sess]
        out = t.score_batch(sess, drafts)
        for s, r, d, o in zip(sess, refs, drafts, out):
            want = r.score(d)
            assert o.shape == want.shape
            close(o, want)
            assert torch.equal(o.argmax(-1), want.argmax(-1))
            close(o, fresh(model, s.tokens + d)[len(s.tokens) - 1:])
        # commit a prefix of each draft plus a correction (rollback of the rest)
        for s, r, d in zip(sess, refs, drafts):
            keep = d[: len(d) // 2] + [int(torch.randint(0, 40, (1,), generator=gen))]
            s.commit(keep)
            r.commit(keep)
    # after batches the per-session caches are still right
    for s in sess:
        close(s.score([2, 3]), fresh(model, s.tokens + [2, 3])[-3:])
    with pytest.raises(ValueError, match="twice"):
        t.score_batch([sess[0], sess[0]], [[1], [2]])


# --------------------------------------------------------------------------- options / errors
def test_dtype_and_threads_options(model):
    from runtime_helpers import tiny_llama as mk

    old = torch.get_num_threads()
    try:
        d = DraftModel(mk(vocab=40, seed=3), dtype=torch.bfloat16, threads=1)
        assert torch.get_num_threads() == 1
        d.reset([1, 2])
        st = d.step()
        assert st.logits.dtype == torch.float32 and 0 <= st.token < 40
        s = TargetModel(mk(vocab=40, seed=3), dtype=torch.bfloat16).new_session([1, 2])
        assert s.score_tree([3, 4], [-1, -1]).dtype == torch.float32
    finally:
        torch.set_num_threads(old)


def _word_tokenizer(n: int, eos: str = "<eos>"):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {eos: 0, **{f"w{i}": i for i in range(1, n)}}
    tk = Tokenizer(WordLevel(vocab, unk_token=eos))
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos)


def test_mismatched_vocab_refused(model):
    other = tiny_llama(vocab=41, seed=3)
    with pytest.raises(ValueError, match="draft 41 logits, target 40"):
        check_same_vocab(DraftModel(other), TargetModel(model))
    # different tokenizers are refused even with equal logit counts
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocab(DraftModel(model, _word_tokenizer(40)), TargetModel(model, _word_tokenizer(39)))
    # one tokenizer, padded logits (40 tokens; 41 logit rows on the draft): fine
    check_same_vocab(DraftModel(other, _word_tokenizer(40)), TargetModel(model, _word_tokenizer(40)))
    with pytest.raises(ValueError, match="fewer logits"):
        check_same_vocab(DraftModel(model, _word_tokenizer(41)), TargetModel(other, _word_tokenizer(41)))


def test_bad_runner_input(model):
    d = DraftModel(model)
    with pytest.raises(ValueError, match="prompt_ids"):
        d.reset([])
    with pytest.raises(ValueError, match="token ids"):
        d.reset([1, 40])
    for bad in (0, 257, 300, True, 2.5):  # caught when the draft is made, naming wire_topk (not at generate)
        with pytest.raises(ValueError, match=r"wire_topk must be an int in \[1, 256\]"):
            DraftModel(model, wire_topk=bad)
    d.reset([1])
    with pytest.raises(ValueError, match="length"):
        d.truncate(0)
    with pytest.raises(FileNotFoundError):
        DraftModel.from_pretrained("/nonexistent/model/dir")
    t = TargetModel(model)
    with pytest.raises(ValueError, match="sessions"):
        t.score_batch([t.new_session([1])], [])
    with pytest.raises(ValueError, match="token ids"):
        t.new_session([1]).score([-1])


def test_wire_topk_limit_is_the_rings():
    from pipesd.models.runners import MAX_WIRE_TOPK
    from pipesd.ring import MAX_TOPK

    assert MAX_WIRE_TOPK == MAX_TOPK
