"""Tree verification (``pipesd.verify.verify_tree``): greedy walk == brute force over
root-to-leaf chains, Triton == reference, chain-as-path == verify_chain, lossless
multi-candidate rejection sampling (distribution tests, planted bugs), seeds, edge cases,
validation."""
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


def _same(a: pv.TreeVerdict, b: pv.TreeVerdict) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("accepted", "path", "tokens", "num_tokens"))


def _greedy_tree(B, N, V, seed, hit=0.7):
    """Random trees whose siblings carry distinct tokens; often one of them is the target argmax."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(B, N, V, generator=g)
    par = st.random_parents(B, N, g)
    nn = torch.randint(1, N + 1, (B,), generator=g)
    am = x.argmax(-1)
    tok = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        for n in range(N):
            kids = [i for i in range(1, N) if int(par[b, i]) == n]
            if not kids:
                continue
            t = torch.randperm(V, generator=g)[: len(kids)]
            if float(torch.rand(1, generator=g)) < hit and int(am[b, n]) not in t.tolist():
                t[int(torch.randint(0, len(kids), (1,), generator=g))] = am[b, n]
            tok[b, kids] = t
    return x, tok, par, nn


def _chains(par_b, nn_b):
    """All root-to-leaf node chains of one tree."""
    kids = {n: [i for i in range(1, nn_b) if int(par_b[i]) == n] for n in range(nn_b)}
    out, stack = [], [[0]]
    while stack:
        c = stack.pop()
        if kids[c[-1]]:
            stack.extend(c + [k] for k in kids[c[-1]])
        else:
            out.append(c)
    return out


# ----------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("ft", [False, True])
def test_greedy_equals_best_chain(ft, small_blocks):
    B = 30 if not ft else 5
    x, tok, par, nn = _greedy_tree(B, 8, 45, seed=2)
    bonus = torch.arange(B) % 3 != 0
    v = pv.verify_tree(x, tok, par, nn, bonus=bonus, force_triton=ft)
    for b in range(B):
        best = None
        for c in _chains(par[b], int(nn[b])):
            cv = pv.verify_chain(x[b:b + 1, c], tok[b:b + 1, c[1:]], None, bonus=bonus[b:b + 1])
            if best is None or int(cv.accepted) > int(best[1].accepted):
                best = (c, cv)
        c, cv = best
        a = int(cv.accepted)
        assert int(v.accepted[b]) == a, b
        assert v.path[b, : a + 1].tolist() == c[: a + 1] and bool((v.path[b, a + 1:] == -1).all())
        assert v.tokens[b, : int(cv.num_tokens)].tolist() == cv.tokens[0, : int(cv.num_tokens)].tolist()
        assert int(v.num_tokens[b]) == int(cv.num_tokens)
    assert int(v.accepted.sum()) > B // 2


# ----------------------------------------------------------------------------- Triton == reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_equals_reference(dtype, small_blocks):
    for mode, seed in (("greedy", 1), ("sample", 2), ("sample", 5)):
        c = st.tree_case(5, 7, 61, 5, seed=seed, dtype=dtype)
        a = pv.verify_tree(**c, mode=mode, seed=seed, force_triton=False)
        b = pv.verify_tree(**c, mode=mode, seed=seed, force_triton=True)
        assert _same(a, b), (mode, seed, a, b)


@pytest.mark.parametrize("ft", [False, True])
def test_chain_as_path_tree_equals_verify_chain(ft, small_blocks):
    B, K, V, kq = (4, 4, 50, 5) if ft else (40, 5, 50, 5)
    c = st.chain_case(B, K, V, kq, seed=9)
    par = torch.arange(-1, K).expand(B, K + 1)
    tok = torch.cat([torch.zeros(B, 1, dtype=torch.long), c["draft_tokens"]], 1)
    qi = torch.cat([c["draft_topk_ids"], torch.full((B, 1, kq), -1)], 1)
    qp = torch.cat([c["draft_topk_probs"], torch.zeros(B, 1, kq)], 1)
    common = {k: c[k] for k in ("temperature", "top_k", "top_p", "min_p", "bonus")}
    for mode in ("greedy", "sample"):
        cv = pv.verify_chain(c["target_logits"], c["draft_tokens"], c["num_draft"], mode=mode,
                             draft_topk_ids=c["draft_topk_ids"], draft_topk_probs=c["draft_topk_probs"],
                             seed=77, force_triton=ft, **common)
        tv = pv.verify_tree(c["target_logits"], tok, par, c["num_draft"] + 1, mode=mode, draft_topk_ids=qi,
                            draft_topk_probs=qp, seed=77, force_triton=ft, **common)
        assert torch.equal(cv.tokens, tv.tokens) and torch.equal(cv.accepted, tv.accepted), mode
        assert torch.equal(tv.path[:, 1:][tv.path[:, 1:] >= 0], torch.cat([torch.arange(1, int(a) + 1) for a in cv.accepted]))


# ----------------------------------------------------------------------------- distribution (reference)
PARENTS = torch.tensor([-1, 0, 0, 0, 1, 1, 2])  # root: 3 children; node 1: 2 children; node 2: 1 child


def _tree_stat_cases(V, kq, seed, N=PARENTS.numel()):
    g = torch.Generator().manual_seed(seed)
    params = [(1.0, 0, 1.0, 0.0), (0.8, 6, 0.9, 0.0), (1.2, 0, 1.0, 0.05)]
    C = len(params)
    x = 1.5 * torch.randn(C, N, V, generator=g)
    ids, probs = st.draft_q(x, kq, g, noise=1.2)
    return x, ids, probs, params


def _run_tree_cases(x, ids, probs, params, R, seed, chunk=50_000, bonus=True, parents=PARENTS, **kw):
    C, N, V = x.shape
    kq = ids.shape[-1]
    T, k, p, mp = (torch.tensor(c) for c in zip(*params))
    g = torch.Generator().manual_seed(seed)
    pc = parents.clamp(min=0)
    res = []
    for start in range(0, R * C, chunk):
        B = min(chunk, R * C - start)
        case = torch.arange(start, start + B) % C
        qi, qp = ids[case], probs[case]
        # every node's token drawn independently from its parent's q (siblings i.i.d., with replacement)
        tok = st.draw_from_q(qi[:, pc], qp[:, pc], g)
        tok[:, 0] = 0
        v = pv.verify_tree(x[case], tok, parents.expand(B, N), None, mode="sample", draft_topk_ids=qi,
                           draft_topk_probs=qp, temperature=T[case], top_k=k[case], top_p=p[case], min_p=mp[case],
                           seed=seed * 104729 + start, bonus=bonus, **kw)
        res.append((case, v))
    cat = lambda f: torch.cat([getattr(v, f) for _, v in res])  # noqa: E731
    return torch.cat([c for c, _ in res]), cat("path"), cat("tokens")


def test_tree_sampling_is_lossless():
    """First emitted token ~ p_root; the token after accepted node c ~ p_c (node c's row), per case, batch > 1."""
    V, R = 16, 100_000
    x, ids, probs, params = _tree_stat_cases(V, 6, seed=1)
    case, path, toks = _run_tree_cases(x, ids, probs, params, R, seed=1)
    checked = 0
    for c, prm in enumerate(params):
        want = filtered_probs(x[c], *prm)
        sel = case == c
        st.check(st.hist(toks[sel, 0], V), want[0], f"case={prm} root")
        for depth in (1, 2):
            for node in range(1, PARENTS.numel()):
                cond = sel & (path[:, depth] == node)
                if int(cond.sum()) >= 2_000:
                    st.check(st.hist(toks[cond, depth], V), want[node], f"case={prm} after node {node}")
                    checked += 1
    assert checked >= 10  # interior nodes and leaves (bonus draws) at depth 1 and 2


def test_tree_sampling_is_lossless_triton_small():
    x, ids, probs, params = _tree_stat_cases(8, 4, seed=2, N=3)
    x, ids, probs, params = x[:2], ids[:2], probs[:2], params[:2]
    case, path, toks = _run_tree_cases(x, ids, probs, params, 100, seed=3, bonus=False,
                                       parents=torch.tensor([-1, 0, 0]), force_triton=True)
    for c, prm in enumerate(params):
        st.check(st.hist(toks[case == c, 0], 8), filtered_probs(x[c, 0], *prm), f"triton case={prm}")


def _local_mss(p, q, m, R, rule, g):
    """One node, ``m`` candidates, multi-candidate rejection with optional planted bugs."""
    C, V = p.shape
    case = torch.arange(R * C) % C
    pp, qq = p[case], q[case]
    if rule == "without_replacement":
        x = torch.multinomial(qq, m, replacement=False, generator=g)
    else:
        x = torch.multinomial(qq, m, replacement=True, generator=g)
    r = pp.clone()
    out = torch.full((R * C,), -1, dtype=torch.long)
    for i in range(m):
        live = out < 0
        xi = x[:, i]
        base = pp if rule == "no_residual_update" else r / r.sum(-1, keepdim=True)
        ratio = base.gather(1, xi[:, None]).squeeze(1) / qq.gather(1, xi[:, None]).squeeze(1)
        acc = live & (torch.rand(R * C, generator=g, dtype=torch.float64) < ratio.clamp(max=1))
        out = torch.where(acc, xi, out)
        rej = live & ~acc
        new = torch.clamp(r / r.sum(-1, keepdim=True) - qq, min=0)
        r = torch.where(rej[:, None] & (new.sum(-1, keepdim=True) > 0), new, r)
    final = pp if rule == "final_from_p" else r
    y = torch.multinomial(final / final.sum(-1, keepdim=True), 1, generator=g).squeeze(1)
    return case, torch.where(out >= 0, out, y)


@pytest.mark.parametrize("rule", ["correct", "no_residual_update", "final_from_p", "without_replacement"])
def test_planted_multicandidate_bugs_are_caught(rule):
    g = torch.Generator().manual_seed(41)
    C, V, R, m = 3, 12, 100_000, 3
    p = torch.softmax(1.5 * torch.randn(C, V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(1.5 * torch.randn(C, V, generator=g, dtype=torch.float64), -1)
    case, y = _local_mss(p, q, m, R, rule, g)
    if rule == "correct":
        for c in range(C):
            st.check(st.hist(y[case == c], V), p[c], f"local MSS case {c}")
    else:
        verdicts = [st.fails(st.hist(y[case == c], V), p[c]) for c in range(C)]
        assert all(verdicts), (rule, verdicts)


def test_tree_q_mismatch_is_caught():
    """Siblings drawn from one q but reported with another: the real verifier is then lossy and caught."""
    g = torch.Generator().manual_seed(43)
    V, R, N = 12, 100_000, 4
    par = torch.tensor([-1, 0, 0, 0])
    x = 1.5 * torch.randn(1, N, V, generator=g)
    dl = x + torch.randn(1, N, V, generator=g)
    ids_t, probs_t = draft_distribution(dl, SamplingParams(temperature=1.0), V)
    ids_r, probs_r = draft_distribution(dl, SamplingParams(temperature=0.4), V)
    want = filtered_probs(x[0, 0], 1.0)
    for ids, probs, ok in ((ids_t, probs_t, True), (ids_r, probs_r, False)):
        tok = st.draw_from_q(ids_t[0, 0].expand(R, N, V), probs_t[0, 0].expand(R, N, V), g)
        v = pv.verify_tree(x.expand(R, N, V), tok, par.expand(R, N), None, mode="sample",
                           draft_topk_ids=ids.expand(R, N, V), draft_topk_probs=probs.expand(R, N, V), seed=3,
                           bonus=False)
        counts = st.hist(v.tokens[:, 0], V)
        if ok:
            st.check(counts, want, "matching q")
        else:
            assert st.fails(counts, want)


# ----------------------------------------------------------------------------- seeds, batching, edges
@pytest.mark.parametrize("ft", [False, True])
def test_seeds_and_batch_independence(ft, small_blocks):
    B = 4 if ft else 16
    c = st.tree_case(B, 6, 40, 4, seed=13)
    seeds = torch.arange(B) * 31 + 5
    full = pv.verify_tree(**c, mode="sample", seed=seeds, force_triton=ft)
    assert _same(full, pv.verify_tree(**c, mode="sample", seed=seeds, force_triton=ft))
    assert any(not _same(full, pv.verify_tree(**c, mode="sample", seed=s, force_triton=ft)) for s in (1, 2, 3))
    for b in range(B):
        one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        v = pv.verify_tree(**one, mode="sample", seed=seeds[b:b + 1], force_triton=ft)
        assert torch.equal(v.tokens[0], full.tokens[b]) and torch.equal(v.path[0], full.path[b])


@pytest.mark.parametrize("ft", [False, True])
def test_edge_cases(ft):
    g = torch.Generator().manual_seed(6)
    V, N = 23, 8
    x = torch.randn(3, N, V, generator=g)
    am = x.argmax(-1)
    # root only: bonus token or nothing; nodes past num_nodes are ignored, whatever they hold
    par = torch.full((3, N), 99)
    par[:, 0] = -1
    tok = torch.full((3, N), 10**6)
    v = pv.verify_tree(x, tok, par, torch.ones(3, dtype=torch.long), bonus=torch.tensor([True, False, True]),
                       force_triton=ft)
    assert v.accepted.tolist() == [0, 0, 0] and v.num_tokens.tolist() == [1, 0, 1]
    assert v.tokens[:, 0].tolist() == [int(am[0, 0]), -1, int(am[2, 0])]
    assert v.path[:, 0].tolist() == [0, 0, 0] and bool((v.path[:, 1:] == -1).all())
    # a deep path fully accepted (plus a rejected side branch at the root)
    par = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 0]).expand(3, N)
    tok = torch.zeros(3, N, dtype=torch.long)
    for i in range(1, 7):
        tok[:, i] = am[:, i - 1]
    tok[:, 7] = (am[:, 0] + 1) % V
    for bonus in (True, False):
        v = pv.verify_tree(x, tok, par, None, bonus=bonus, force_triton=ft)
        assert v.accepted.tolist() == [6] * 3 and v.path[0].tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
        assert v.num_tokens.tolist() == [6 + bonus] * 3
        if bonus:
            assert v.tokens[:, 6].tolist() == am[:, 6].tolist()
    # the side branch first in order: siblings are tried in node order, the matching one wins
    par2 = torch.tensor([-1, 0, 0]).expand(3, 3)
    tok2 = torch.stack([torch.zeros(3, dtype=torch.long), (am[:, 0] + 1) % V, am[:, 0]], 1)
    v = pv.verify_tree(x[:, :3], tok2, par2, None, force_triton=ft)
    assert v.path[:, 1].tolist() == [2, 2, 2]


@pytest.mark.parametrize("ft", [False, True])
def test_batch_of_one_and_of_hundreds(ft):
    for B in (1, 200):
        x, tok, par, nn = _greedy_tree(B, 3, 16, seed=B)
        v = pv.verify_tree(x, tok, par, nn)
        if ft:
            assert _same(v, pv.verify_tree(x, tok, par, nn, force_triton=True))
        assert v.path.shape == (B, 3) and bool((v.accepted < nn).all())


# ----------------------------------------------------------------------------- validation
def _valid():
    c = st.tree_case(3, 5, 12, 3, seed=0)
    c["num_nodes"] = torch.tensor([5, 3, 1])
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
    (_mut(parents=lambda c: _set(c["parents"], (0, 0), 0)), "greedy", r"parents: parents\[b, 0\] must be -1"),
    (_mut(parents=lambda c: _set(c["parents"], (0, 3), 3)), "greedy", "parents: parents"),
    (_mut(parents=lambda c: _set(c["parents"], (1, 2), -1)), "greedy", "parents: parents"),
    (_mut(parents=lambda c: c["parents"][:, :4]), "greedy", "parents: expected shape"),
    (_mut(num_nodes=torch.tensor([5, 0, 1])), "greedy", "num_nodes"),
    (_mut(num_nodes=torch.tensor([6, 1, 1])), "greedy", "num_nodes"),
    (_mut(tokens=lambda c: _set(c["tokens"], (1, 2), 12)), "greedy", "tokens: tokens must be in"),
    (_mut(tokens=lambda c: c["tokens"].float()), "greedy", "tokens: expected an integer"),
    (_mut(target_logits=lambda c: c["target_logits"][:, :4]), "greedy", "tokens: expected shape"),
    (_mut(draft_topk_probs=None), "sample", "required in sample mode"),
    (_mut(tokens=lambda c: _set(c["tokens"], (0, 1), int(
        [t for t in range(12) if t not in c["draft_topk_ids"][0, int(c["parents"][0, 1])].tolist()][0]))), "sample",
     "parent's q ids"),
    (_mut(draft_topk_probs=lambda c: c["draft_topk_probs"] * 2), "sample", "sum to 1"),
    (_mut(target_logits=lambda c: _set(c["target_logits"], (0, 0, 1), float("inf"))), "sample",
     r"target_logits: node \(b=0, row=0\)"),
])
@pytest.mark.parametrize("ft", [False, True])
def test_validation(make, mode, match, ft):
    with pytest.raises(ValueError, match=match):
        pv.verify_tree(**make(), mode=mode, seed=0, force_triton=ft)


def test_unused_rows_are_not_validated():
    """q rows of leaves and logits rows past num_nodes may hold anything."""
    c = _valid()
    leaf = [i for i in range(3) if i not in c["parents"][1, 1:3].tolist()]
    c["draft_topk_probs"] = _set(c["draft_topk_probs"], (1, leaf[0]), 5.0)
    c["target_logits"] = _set(c["target_logits"], (2, 3), float("nan"))
    c["bonus"] = True
    pv.verify_tree(**c, mode="sample", seed=0)
