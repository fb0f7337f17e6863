"""Batched chain verification (``pipesd.verify.verify_chain``): greedy exactness, Triton ==
reference, lossless rejection sampling (distribution tests at batch > 1 with planted bugs and
a convergence test), seeds, batch independence, edge cases and validation."""
import pytest
import torch

import pipesd.verify as pv
from pipesd.sampling import SamplingParams, draft_distribution, filtered_probs

import _stats as st


@pytest.fixture(autouse=True)
def _single_thread():
    yield from st.single_thread()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setenv("PIPESD_TRITON_BLOCK", "32")
    monkeypatch.setenv("PIPESD_TRITON_PBLOCK", "16")


def _same(a: pv.ChainVerdict, b: pv.ChainVerdict) -> bool:
    return (torch.equal(a.accepted, b.accepted) and torch.equal(a.tokens, b.tokens)
            and torch.equal(a.num_tokens, b.num_tokens))


def _naive_greedy(x, draft, nd, bonus):
    """The definition, one request at a time."""
    B, N, V = x.shape
    toks = torch.full((B, N), -1, dtype=torch.long)
    acc = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        am = x[b].float().argmax(-1)
        out = []
        for j in range(int(nd[b])):
            if int(draft[b, j]) == int(am[j]):
                out.append(int(draft[b, j]))
                acc[b] += 1
            else:
                out.append(int(am[j]))
                break
        else:
            if bool(bonus[b]):
                out.append(int(am[int(nd[b])]))
        toks[b, : len(out)] = torch.tensor(out, dtype=torch.long)
    return acc, toks


# ----------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("ft", [False, True])
def test_greedy_matches_definition(ft, small_blocks):
    B = 40 if not ft else 8
    c = st.chain_case(B, 5, 77, 4, seed=1)
    x = c["target_logits"]
    am = x.argmax(-1)
    g = torch.Generator().manual_seed(2)
    draft = torch.where(torch.rand(B, 5, generator=g) < 0.8, am[:, :5], torch.randint(0, 77, (B, 5), generator=g))
    v = pv.verify_chain(x, draft, c["num_draft"], bonus=c["bonus"], force_triton=ft)
    acc, toks = _naive_greedy(x, draft, c["num_draft"], c["bonus"])
    assert v.backend == ("triton" if ft else "torch")
    assert torch.equal(v.accepted, acc) and torch.equal(v.tokens, toks)
    assert torch.equal(v.num_tokens, (toks >= 0).sum(-1))
    assert int(acc.sum()) > B  # the case exercises long accepted runs


@pytest.mark.parametrize("ft", [False, True])
def test_greedy_ties_pick_lowest_index(ft):
    x = torch.tensor([[[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 0.0, 0.0]]])
    v = pv.verify_chain(x, torch.tensor([[2]]), torch.tensor([1]), force_triton=ft)
    assert v.accepted.tolist() == [0] and v.tokens.tolist() == [[1, -1]]
    v = pv.verify_chain(x, torch.tensor([[1]]), torch.tensor([1]), force_triton=ft)
    assert v.accepted.tolist() == [1] and v.tokens.tolist() == [[1, 0]]


# ----------------------------------------------------------------------------- Triton == reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_equals_reference(dtype, small_blocks):
    for mode, seed in (("greedy", 0), ("sample", 3)):
        c = st.chain_case(6, 4, 67, 5, seed=seed + 10 * (dtype == torch.float16), dtype=dtype)
        a = pv.verify_chain(**c, mode=mode, seed=seed, force_triton=False)
        b = pv.verify_chain(**c, mode=mode, seed=seed, force_triton=True)
        assert _same(a, b), (mode, a, b)


def test_triton_equals_reference_long_runs(small_blocks):
    """Drafts that are usually accepted (q close to p), all filters on, residual draws."""
    c = st.chain_case(5, 6, 90, 8, seed=21, scale=3.0)
    c["num_draft"] = torch.tensor([6, 6, 5, 0, 6])
    a = pv.verify_chain(**c, mode="sample", seed=5, force_triton=False)
    b = pv.verify_chain(**c, mode="sample", seed=5, force_triton=True)
    assert _same(a, b), (a, b)
    assert int(a.accepted.sum()) >= 8


# ----------------------------------------------------------------------------- distribution (reference)
def _stat_cases(V: int, K: int, kq: int, seed: int):
    """C different (p, q, params) cases; q sometimes covers less than p's support, one case has k = 1."""
    g = torch.Generator().manual_seed(seed)
    params = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.05), (1.2, 0, 1.0, 0.0)]
    C = len(params)
    x = 1.5 * torch.randn(C, K + 1, V, generator=g)
    ids, probs = st.draft_q(x[:, :K], kq, g, noise=1.0)
    # case 3: a k = 1 q (one-hot draft; padding ids -1 with probability 0)
    ids[3, :, 1:] = -1
    probs[3, :, 0] = 1.0
    probs[3, :, 1:] = 0.0
    return x, ids, probs, params


def _run_chain_cases(x, ids, probs, params, R, seed, chunk=50_000, **kw):
    C, N, V = x.shape
    K = N - 1
    T, k, p, mp = (torch.tensor(c) for c in zip(*params))
    g = torch.Generator().manual_seed(seed)
    outs = []
    for start in range(0, R * C, chunk):
        B = min(chunk, R * C - start)
        case = (torch.arange(start, start + B) % C)  # interleaved: neighbouring rows differ
        draft = st.draw_from_q(ids[case], probs[case], g)
        v = pv.verify_chain(x[case], draft, torch.full((B,), K), mode="sample", draft_topk_ids=ids[case],
                            draft_topk_probs=probs[case], temperature=T[case], top_k=k[case], top_p=p[case],
                            min_p=mp[case], seed=seed * 7919 + start, **kw)
        outs.append((case, v))
    case = torch.cat([c for c, _ in outs])
    return case, torch.cat([v.tokens for _, v in outs]), torch.cat([v.accepted for _, v in outs])


def test_sampling_is_lossless_at_every_position():
    """Emitted token at position j (given the run reached j) ~ the target's filtered p_j, per case, batch > 1."""
    for V, K, kq in ((16, 2, 6), (48, 2, 10)):
        x, ids, probs, params = _stat_cases(V, K, kq, seed=V)
        R = 100_000
        case, toks, acc = _run_chain_cases(x, ids, probs, params, R, seed=V)
        for c, prm in enumerate(params):
            want = filtered_probs(x[c], *prm)
            sel = case == c
            for j in range(K + 1):
                reached = sel & (acc >= j)
                n = int(reached.sum())
                assert n >= (R if j == 0 else 2_000) or j == K, (c, j, n)
                if n < 2_000:
                    continue
                st.check(st.hist(toks[reached, j], V), want[j], f"V={V} case={prm} pos={j}")
            # and independently of which draft was accepted before it: y_1 | (y_0 = a accepted) ~ p_1
            both = sel & (acc >= 1)
            for a in torch.unique(toks[both, 0]).tolist():
                cond = both & (toks[:, 0] == a)
                if int(cond.sum()) >= 5_000:
                    st.check(st.hist(toks[cond, 1], V), want[1], f"V={V} case={prm} pos=1 | y0={a}")


def test_sampling_is_lossless_triton_small():
    x, ids, probs, params = _stat_cases(8, 1, 4, seed=3)
    x, ids, probs, params = x[:2], ids[:2], probs[:2], params[:2]
    R = 150
    case, toks, _ = _run_chain_cases(x, ids, probs, params, R, seed=4, bonus=False, force_triton=True)
    for c, prm in enumerate(params):
        st.check(st.hist(toks[case == c, 0], 8), filtered_probs(x[c, 0], *prm), f"triton case={prm}")


def _local_verify(p, q, R, rule, g):
    """A small single-position verifier with optional planted bugs; p, q ``[C, V]`` dense."""
    C, V = p.shape
    case = torch.arange(R * C) % C
    pp, qq = p[case], q[case]
    if rule == "batch_row0":  # a batching bug: every row verified against row 0's p
        pp = p[torch.zeros_like(case)]
    x = torch.multinomial(qq, 1, generator=g).squeeze(1)
    u = torch.rand(R * C, generator=g, dtype=torch.float64)
    px, qx = pp.gather(1, x[:, None]).squeeze(1), qq.gather(1, x[:, None]).squeeze(1)
    if rule == "inverted_ratio":
        accept = u < torch.clamp(qx / px, max=1.0)
    else:
        accept = u < torch.clamp(px / qx, max=1.0)
    if rule == "residual_from_p":
        resid = pp
    elif rule == "residual_abs":
        resid = (pp - qq).abs()
    else:
        resid = torch.clamp(pp - qq, min=0.0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, pp)
    y = torch.multinomial(resid / resid.sum(-1, keepdim=True), 1, generator=g).squeeze(1)
    return case, torch.where(accept, x, y)


@pytest.mark.parametrize("rule", ["correct", "inverted_ratio", "residual_from_p", "residual_abs", "batch_row0"])
def test_planted_rejection_bugs_are_caught(rule):
    g = torch.Generator().manual_seed(17)
    C, V, R = 3, 16, 100_000
    p = torch.softmax(1.5 * torch.randn(C, V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(1.5 * torch.randn(C, V, generator=g, dtype=torch.float64), -1)
    case, y = _local_verify(p, q, R, rule, g)
    verdicts = [st.fails(st.hist(y[case == c], V), p[c]) for c in range(C)]
    if rule == "correct":
        for c in range(C):
            st.check(st.hist(y[case == c], V), p[c], f"local correct case {c}")
    elif rule == "batch_row0":
        assert not verdicts[0] and all(verdicts[1:]), verdicts  # row 0 is right, the others are caught
    else:
        assert all(verdicts), (rule, verdicts)


def test_q_mismatch_is_caught():
    """Drafts sampled from one q but verified with another (HF #47932): the real verifier's
    output then differs from the target, and the same statistic catches it."""
    g = torch.Generator().manual_seed(23)
    V, R = 16, 100_000
    x = 1.5 * torch.randn(1, 2, V, generator=g)
    dl = x[:, :1] + torch.randn(1, 1, V, generator=g)
    ids_true, probs_true = draft_distribution(dl, SamplingParams(temperature=1.0), V)
    ids_rep, probs_rep = draft_distribution(dl, SamplingParams(temperature=0.5), V)  # what the edge *reports*
    want = filtered_probs(x[0, 0], 1.0)
    for ids, probs, expect_ok in ((ids_true, probs_true, True), (ids_rep, probs_rep, False)):
        draft = st.draw_from_q(ids_true.expand(R, 1, V), probs_true.expand(R, 1, V), g)
        v = pv.verify_chain(x.expand(R, 2, V), draft, torch.ones(R, dtype=torch.long), mode="sample",
                            draft_topk_ids=ids.expand(R, 1, V), draft_topk_probs=probs.expand(R, 1, V),
                            temperature=1.0, seed=5, bonus=False)
        counts = st.hist(v.tokens[:, 0], V)
        if expect_ok:
            st.check(counts, want, "matching q")
        else:
            assert st.fails(counts, want), "a q differing from the sampled-from one was not caught"


def test_tv_shrinks_like_one_over_sqrt_n():
    g = torch.Generator().manual_seed(31)
    V = 16
    x = 1.5 * torch.randn(1, 2, V, generator=g)
    ids, probs = st.draft_q(x[:, :1], 6, g, noise=1.0)
    want = filtered_probs(x[0, 0], 1.0)
    tvs = []
    for n in (1_000, 10_000, 100_000):
        t = 0.0
        for s in range(4):
            draft = st.draw_from_q(ids.expand(n, 1, 6), probs.expand(n, 1, 6), g)
            v = pv.verify_chain(x.expand(n, 2, V), draft, torch.ones(n, dtype=torch.long), mode="sample",
                                draft_topk_ids=ids.expand(n, 1, 6), draft_topk_probs=probs.expand(n, 1, 6),
                                seed=n + s, bonus=False)
            t += st.tv(st.hist(v.tokens[:, 0], V), want) / 4
        tvs.append(t)
    for a, b in zip(tvs, tvs[1:]):
        assert 2.0 < a / b < 5.0, tvs


# ----------------------------------------------------------------------------- seeds and batching
@pytest.mark.parametrize("ft", [False, True])
def test_seeds_reproduce_and_matter(ft, small_blocks):
    c = st.chain_case(6 if ft else 64, 3, 40, 4, seed=8, scale=1.0)
    c.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = pv.verify_chain(**c, mode="sample", seed=1, force_triton=ft)
    assert _same(a, pv.verify_chain(**c, mode="sample", seed=1, force_triton=ft))
    diff = [not _same(a, pv.verify_chain(**c, mode="sample", seed=s, force_triton=ft)) for s in (2, 3, 4)]
    assert any(diff)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert _same(pv.verify_chain(**c, mode="sample", generator=g1, force_triton=ft),
                 pv.verify_chain(**c, mode="sample", generator=g2, force_triton=ft))


@pytest.mark.parametrize("ft", [False, True])
def test_batched_equals_one_at_a_time(ft, small_blocks):
    B = 5 if ft else 12
    c = st.chain_case(B, 4, 50, 5, seed=12)
    seeds = torch.arange(1000, 1000 + B) * 7
    for mode in ("greedy", "sample"):
        full = pv.verify_chain(**c, mode=mode, seed=seeds, force_triton=ft)
        for b in range(B):
            one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
            v = pv.verify_chain(**one, mode=mode, seed=seeds[b:b + 1], force_triton=ft)
            assert torch.equal(v.tokens[0], full.tokens[b]) and int(v.accepted) == int(full.accepted[b]), (mode, b)


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("ft", [False, True])
def test_edge_cases(ft):
    g = torch.Generator().manual_seed(4)
    V = 19
    # zero drafts (K = 0): bonus token only, or nothing
    x0 = torch.randn(3, 1, V, generator=g)
    v = pv.verify_chain(x0, torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                        bonus=torch.tensor([True, False, True]), force_triton=ft)
    am = x0.argmax(-1)[:, 0]
    assert v.accepted.tolist() == [0, 0, 0] and v.num_tokens.tolist() == [1, 0, 1]
    assert v.tokens[:, 0].tolist() == [int(am[0]), -1, int(am[2])]
    # all accepted, bonus on / off (greedy and sample with q = one-hot on the argmax)
    x = torch.randn(2, 4, V, generator=g)
    am = x.argmax(-1)
    for bonus in (True, False):
        v = pv.verify_chain(x, am[:, :3], None, bonus=bonus, force_triton=ft)
        assert v.accepted.tolist() == [3, 3]
        want = am if bonus else torch.cat([am[:, :3], torch.full((2, 1), -1)], 1)
        assert torch.equal(v.tokens, want) and v.num_tokens.tolist() == [3 + bonus] * 2
        ids = am[:, :3, None]
        s = pv.verify_chain(x, am[:, :3], None, mode="sample", draft_topk_ids=ids, draft_topk_probs=torch.ones(2, 3, 1),
                            temperature=0.0, bonus=bonus, seed=0, force_triton=ft)
        assert _same(s, v)
    # top_p = 1 and top_k >= V are "off": same as plain temperature sampling
    c = st.chain_case(2, 2, V, 3, seed=6)
    base = dict(c, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    a = pv.verify_chain(**base, mode="sample", seed=3, force_triton=ft)
    b = pv.verify_chain(**dict(base, top_k=V + 1, top_p=1.0), mode="sample", seed=3, force_triton=ft)
    assert _same(a, b)
    # a NaN in a row that is never read (past num_draft, bonus off) is fine; in a used row it is an error
    x = torch.randn(2, 3, V, generator=g)
    x[0, 2, 5] = float("nan")
    pv.verify_chain(x, torch.zeros(2, 2, dtype=torch.long), torch.tensor([1, 2]), bonus=torch.tensor([False, True]),
                    force_triton=ft)
    with pytest.raises(ValueError, match=r"target_logits: position \(b=0, row=2\)"):
        pv.verify_chain(x, torch.zeros(2, 2, dtype=torch.long), torch.tensor([2, 2]), force_triton=ft)


@pytest.mark.parametrize("ft", [False, True])
def test_zero_probability_entries_are_padding(ft, small_blocks):
    """q rows padded with any id at probability 0 (e.g. 0, as a zero-filled buffer) == padded with -1."""
    c = st.chain_case(4, 3, 40, 5, seed=14)
    probs = c["draft_topk_probs"].clone()
    probs[..., 3:] = 0
    probs = probs / probs.sum(-1, keepdim=True)
    g = torch.Generator().manual_seed(1)
    c.update(draft_topk_probs=probs, draft_tokens=st.draw_from_q(c["draft_topk_ids"], probs, g))
    out = []
    for pad in (-1, 0, 39):
        ids = c["draft_topk_ids"].clone()
        ids[..., 3:] = pad
        out.append(pv.verify_chain(**dict(c, draft_topk_ids=ids), mode="sample", seed=4, force_triton=ft))
    assert _same(out[0], out[1]) and _same(out[0], out[2])


def test_full_vocabulary_q_takes_the_reference_path(monkeypatch):
    """A dense q (k = V, the paper's wire format) is verified by the reference even when Triton is forced."""
    monkeypatch.setattr(pv, "TRITON_MAX_Q_ENTRIES", 16)
    c = st.chain_case(3, 2, 20, 20, seed=15)  # k = V = 20 > 16
    a = pv.verify_chain(**c, mode="sample", seed=2, force_triton=True)
    b = pv.verify_chain(**c, mode="sample", seed=2, force_triton=False)
    assert a.backend == "torch" and _same(a, b)
    assert pv.verify_chain(**dict(c, num_draft=torch.zeros(3, dtype=torch.long)), mode="greedy",
                           force_triton=True).backend == "triton"


@pytest.mark.parametrize("ft", [False, True])
def test_batch_of_one_and_of_hundreds(ft):
    for B, modes in ((1, ("greedy", "sample")), (200, ("greedy", "sample") if not ft else ("greedy",))):
        c = st.chain_case(B, 1, 16, 3, seed=B)
        for mode in modes:
            v = pv.verify_chain(**c, mode=mode, seed=2)
            if ft:
                assert _same(v, pv.verify_chain(**c, mode=mode, seed=2, force_triton=True))
            assert v.tokens.shape == (B, 2) and bool((v.num_tokens <= c["num_draft"] + 1).all())


# ----------------------------------------------------------------------------- validation
def _valid():
    c = st.chain_case(3, 2, 10, 3, seed=0)
    c["num_draft"] = torch.tensor([2, 2, 1])
    return c


def _mut(**changes):
    def f():
        c = _valid()
        for k, v in changes.items():
            c[k] = v(c) if callable(v) else v
        return c
    return f


def _set(t, idx, val):
    t = t.clone()
    t[idx] = val
    return t


@pytest.mark.parametrize("make,mode,match", [
    (_mut(target_logits=lambda c: c["target_logits"][0]), "greedy", "target_logits: expected 3 dimensions"),
    (_mut(target_logits=lambda c: c["target_logits"].long()), "greedy", "target_logits: dtype"),
    (_mut(draft_tokens=lambda c: c["draft_tokens"][:, :1]), "greedy", "draft_tokens: expected shape"),
    (_mut(draft_tokens=lambda c: c["draft_tokens"].float()), "greedy", "draft_tokens: expected an integer"),
    (_mut(num_draft=torch.tensor([3, 0, 0])), "greedy", "num_draft"),
    (_mut(num_draft=torch.tensor([2, 2])), "greedy", "num_draft: expected shape"),
    (_mut(draft_tokens=lambda c: _set(c["draft_tokens"], (1, 0), 10)), "greedy", "draft_tokens: tokens must be in"),
    (_mut(bonus=torch.ones(2, dtype=torch.bool)), "greedy", "bonus"),
    (_valid, "beam", "mode"),
    (_mut(draft_topk_ids=None), "sample", "required in sample mode"),
    (_mut(draft_topk_ids=lambda c: c["draft_topk_ids"][:, :1]), "sample", "draft_topk_ids: expected shape"),
    (_mut(draft_topk_probs=lambda c: _set(c["draft_topk_probs"], (0, 0, 2), -0.1)), "sample", "draft_topk_probs: must be"),
    (_mut(draft_topk_probs=lambda c: c["draft_topk_probs"] * 0.5), "sample", "sum to 1"),
    (_mut(draft_topk_ids=lambda c: _set(c["draft_topk_ids"], (0, 0, 1), int(c["draft_topk_ids"][0, 0, 0]))), "sample",
     "distinct"),
    (_mut(draft_tokens=lambda c: _set(c["draft_tokens"], (0, 0), int(
        [t for t in range(10) if t not in c["draft_topk_ids"][0, 0].tolist()][0]))), "sample", "must be in its q ids"),
    (_mut(temperature=-0.5), "sample", "temperature"),
    (_mut(top_p=torch.tensor([1.0, 0.0, 0.5])), "sample", "top_p"),
    (_mut(top_k=1.5), "sample", "top_k"),
    (_mut(target_logits=lambda c: _set(c["target_logits"], (1, 1, 3), float("nan"))), "sample",
     r"target_logits: position \(b=1, row=1\)"),
])
@pytest.mark.parametrize("ft", [False, True])
def test_validation(make, mode, match, ft):
    with pytest.raises(ValueError, match=match):
        pv.verify_chain(**make(), mode=mode, seed=0, force_triton=ft)


def test_seed_and_generator_are_exclusive():
    with pytest.raises(ValueError, match="seed"):
        pv.verify_chain(**_valid(), mode="sample", seed=1, generator=torch.Generator())
