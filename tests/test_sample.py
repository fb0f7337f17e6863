"""Fused sampler (``pipesd.verify.sample``): Triton kernel == PyTorch reference, exact filter
semantics of ``filtered_probs``, distribution tests with planted bugs, seeds, validation, and
a compile check of every kernel for sm_90 (H100/H200) without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import pipesd.verify as pv
from pipesd.sampling import filtered_probs
from pipesd.verify import reference as ref
from pipesd.verify._rng import philox4x32, philox_uniform

import _stats as st
import triton
import triton.language as tl
from pipesd.kernels.rowops import philox_uniform as tl_philox

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET=1 before imports"


@pytest.fixture(autouse=True)
def _single_thread():
    yield from st.single_thread()


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several vocabulary blocks on small test vocabularies (multi-block code paths)."""
    monkeypatch.setenv("PIPESD_TRITON_BLOCK", "32")
    monkeypatch.setenv("PIPESD_TRITON_PBLOCK", "16")


# ----------------------------------------------------------------------------- randomness
@triton.jit
def _philox_probe(seed_ptr, c0_ptr, out_ptr, STREAM: tl.constexpr):
    i = tl.program_id(0)
    tl.store(out_ptr + i, tl_philox(tl.load(seed_ptr + i), tl.load(c0_ptr + i), STREAM))


def test_philox_known_answers_and_kernel_bits():
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:  # Random123's Philox4x32-10 known-answer vectors
        assert tuple(int(v) for v in philox4x32(*ctr, *key)) == want
    # the Triton implementation produces the same bits
    seeds = torch.tensor([0, 1, 2**32 + 7, 2**62 + 12345, 987654321987], dtype=torch.int64)
    c0 = torch.tensor([0, 5, 17, 2**31 - 1, 3], dtype=torch.int32)
    for stream in (0, 1):
        out = torch.empty(5, dtype=torch.float32)
        _philox_probe[(5,)](seeds, c0, out, STREAM=stream)
        assert torch.equal(out, philox_uniform(seeds, c0.long(), stream))
    u = philox_uniform(torch.arange(200000), 0, 1)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_equals_reference(dtype, small_blocks):
    g = torch.Generator().manual_seed(11)
    B, V = 12, 100  # not a multiple of the block (32)
    x = (2.5 * torch.randn(B, V, generator=g)).to(dtype)
    T, k, p, mp = st.rand_params(B, V, g, greedy_frac=0.2)
    seeds = torch.randint(0, 2**62, (B,), generator=g)
    a = pv.sample(x, T, k, p, mp, seeds, force_triton=False)
    b = pv.sample(x, T, k, p, mp, seeds, force_triton=True)
    assert torch.equal(a, b), (a, b)
    assert pv.backend(x) == "torch"


def test_argmax_lowest_index_on_ties_both_paths():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, 7.0, 7.0]])
    for ft in (False, True):
        assert pv.sample(x, 0.0, seed=0, force_triton=ft).tolist() == [1, 0, 2]


def test_filter_semantics_match_filtered_probs(small_blocks):
    """The kernel's thresholds keep exactly filtered_probs' support (ties, top-p edge, min-p)."""
    from pipesd.kernels.sampling import filtered_probs_triton

    g = torch.Generator().manual_seed(3)
    V = 70
    rows, params = [], []
    for T, k, p, mp in [(1.0, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (0.7, 12, 0.9, 0.0), (1.3, 0, 1.0, 0.08),
                        (1.0, 3, 0.5, 0.2), (0.0, 4, 0.5, 0.0), (1.0, V + 3, 1.0, 0.0), (1.0, 1, 1.0, 0.0)]:
        rows.append(2 * torch.randn(V, generator=g))
        params.append((T, k, p, mp))
    # integer logits: exact ties at the top-k boundary and at the top-p edge
    tie = torch.tensor([4.0] * 3 + [3.0] * 5 + [0.0] * (V - 8))
    for T, k, p, mp in [(1.0, 4, 1.0, 0.0), (1.0, 2, 1.0, 0.0), (1.0, 0, 0.55, 0.0), (1.0, 0, 0.9, 0.0)]:
        rows.append(tie[torch.randperm(V, generator=g)])
        params.append((T, k, p, mp))
    x = torch.stack(rows)
    T, k, p, mp = (torch.tensor(c) for c in zip(*params))
    got, bad = filtered_probs_triton(x, T.float(), k.int(), p.float(), mp.float())
    want = filtered_probs(x, T, k, p, mp)
    assert not bool(bad.any())
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    # ties at the top-k boundary keep every tied token: k=4 over (3 x 4.0, 5 x 3.0) keeps 8
    assert int((got[-4] > 0).sum()) == 8 and int((got[-3] > 0).sum()) == 3


def test_filtered_probs_top_p_keeps_threshold_token():
    """Regression (fixed in pipesd.sampling): top-p could drop its own threshold token (NaN rows)."""
    g = torch.Generator().manual_seed(0)
    for V in (7, 50, 1000):
        for tp in (0.01, 0.3, 0.9):
            for k in (0, 5):
                x = 3 * torch.randn(1500, V, generator=g)
                p = filtered_probs(x, 1.0, k, tp, 0.0)
                assert not bool(torch.isnan(p).any())
                exact = torch.softmax(x.double(), -1)
                sp = exact.sort(-1, descending=True).values
                kk = k if 0 < k < V else V
                kth = sp[:, kk - 1: kk]
                sk = torch.where(sp >= kth, sp, 0.0)
                sk = sk / sk.sum(-1, keepdim=True)
                n_exp = (((sk.cumsum(-1) - sk) < tp) & (sp >= kth)).sum(-1)
                assert torch.equal((p > 0).sum(-1), n_exp)


# ----------------------------------------------------------------------------- statistics
CASES_16 = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1)]
CASES_64 = [(1.0, 0, 1.0, 0.0), (1.0, 10, 0.9, 0.0), (0.5, 0, 1.0, 0.05)]


def _interleaved(cases, V, R, seed):
    g = torch.Generator().manual_seed(seed)
    C = len(cases)
    base = 1.5 * torch.randn(C, V, generator=g)
    x = base.repeat(R, 1)  # row b belongs to case b % C: neighbouring rows differ
    T, k, p, mp = (torch.tensor(c).repeat(R) for c in zip(*cases))
    want = filtered_probs(base, *(torch.tensor(c) for c in zip(*cases)))
    return x, T.float(), k.long(), p.float(), mp.float(), want


@pytest.mark.parametrize("V,cases", [(16, CASES_16), (64, CASES_64)])
def test_sampler_distribution_reference(V, cases):
    R = 100_000
    x, T, k, p, mp, want = _interleaved(cases, V, R, seed=V)
    tok = pv.sample(x, T, k, p, mp, seed=1234)
    C = len(cases)
    for c in range(C):
        st.check(st.hist(tok[c::C], V), want[c], f"case {cases[c]}")


def test_sampler_distribution_triton_small():
    V, R = 8, 150
    cases = [(1.0, 0, 1.0, 0.0), (0.8, 3, 1.0, 0.0)]
    x, T, k, p, mp, want = _interleaved(cases, V, R, seed=5)
    tok = pv.sample(x, T, k, p, mp, seed=99, force_triton=True)
    for c in range(2):
        st.check(st.hist(tok[c::2], V), want[c], f"triton case {cases[c]}")


def _wrong_sampler(name, base, T, k, p, mp, n, g):
    """Small local samplers with planted bugs (the statistic must reject them)."""
    x = base.double() / T
    probs = torch.softmax(x, -1)
    if name == "ignore_top_p":  # top-k only
        kth = probs.sort(descending=True).values[k - 1]
        q = torch.where(probs >= kth, probs, 0.0)
    elif name == "top_p_before_top_k":  # nucleus over the full distribution, then top-k
        sp, si = probs.sort(descending=True)
        keep_p = torch.zeros_like(probs, dtype=torch.bool)
        keep_p[si] = (sp.cumsum(0) - sp) < p
        kth = sp[k - 1]
        q = torch.where(keep_p & (probs >= kth), probs, 0.0)
    elif name == "nucleus_off_by_one":  # drops the token that crosses top_p
        kth = probs.sort(descending=True).values[k - 1]
        q0 = torch.where(probs >= kth, probs, 0.0)
        q0 = q0 / q0.sum()
        sp, si = q0.sort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[si] = sp.cumsum(0) < p
        q = torch.where(keep, q0, 0.0)
    elif name == "correct":
        q = filtered_probs(base, T, k, p, mp).double()
    else:
        raise ValueError(name)
    return torch.multinomial(q / q.sum(), n, replacement=True, generator=g)


@pytest.mark.parametrize("name", ["correct", "ignore_top_p", "top_p_before_top_k", "nucleus_off_by_one"])
def test_planted_sampler_bugs_are_caught(name):
    g = torch.Generator().manual_seed(8)
    V, n = 32, 100_000
    base = 1.5 * torch.randn(V, generator=g)
    T, k, p, mp = 0.8, 8, 0.7, 0.0
    want = filtered_probs(base, T, k, p, mp)
    counts = st.hist(_wrong_sampler(name, base, T, k, p, mp, n, g), V)
    if name == "correct":
        st.check(counts, want, name)
    else:
        assert st.fails(counts, want), f"planted bug {name!r} was not caught"


def test_tv_convergence_rate():
    """TV of the real sampler shrinks ~1/sqrt(n); a planted bug's TV plateaus."""
    V = 16
    base = 1.5 * torch.randn(V, generator=torch.Generator().manual_seed(2))
    want = filtered_probs(base, 0.9, 0, 0.85, 0.0)
    wrong = filtered_probs(base, 0.9, 0, 1.0, 0.0)  # top-p forgotten
    tvs, tvs_wrong = [], []
    for n in (1_000, 10_000, 100_000):
        t, tw = 0.0, 0.0
        for s in range(4):
            tok = pv.sample(base.expand(n, V), 0.9, 0, 0.85, 0.0, seed=1000 * s + n)
            t += st.tv(st.hist(tok, V), want) / 4
            tw += st.tv(st.hist(torch.multinomial(wrong, n, True, generator=torch.Generator().manual_seed(s)), V), want) / 4
        tvs.append(t)
        tvs_wrong.append(tw)
    for a, b in zip(tvs, tvs[1:]):
        assert 2.0 < a / b < 5.0, tvs  # sqrt(10) = 3.16 per decade
    assert tvs_wrong[-1] > 0.6 * tvs_wrong[-2] and tvs_wrong[-1] > 5 * tvs[-1], tvs_wrong


# ----------------------------------------------------------------------------- seeds
def test_seeds_matter_and_reproduce():
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for ft in (False, True):
        a = pv.sample(x, 1.0, seed=7, force_triton=ft)
        assert torch.equal(a, pv.sample(x, 1.0, seed=7, force_triton=ft))
        assert not torch.equal(a, pv.sample(x, 1.0, seed=8, force_triton=ft))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(pv.sample(x, 1.0, generator=g1), pv.sample(x, 1.0, generator=g2))
    torch.manual_seed(3)
    a = pv.sample(x, 1.0)
    torch.manual_seed(3)
    assert torch.equal(a, pv.sample(x, 1.0))
    # per-row seeds: a row's draw does not depend on the rest of the batch
    seeds = torch.arange(100, 164)
    full = pv.sample(x, 1.0, seed=seeds)
    for b in (0, 17, 63):
        assert int(pv.sample(x[b:b + 1], 1.0, seed=seeds[b:b + 1])) == int(full[b])


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=torch.randn(2, 3, 4)), "logits: expected 2 dimensions"),
    (dict(logits=torch.randint(0, 5, (2, 4))), "logits: dtype"),
    (dict(logits=torch.randn(2, 4), temperature=-1.0), "temperature"),
    (dict(logits=torch.randn(2, 4), temperature=float("nan")), "temperature"),
    (dict(logits=torch.randn(2, 4), top_p=0.0), "top_p"),
    (dict(logits=torch.randn(2, 4), top_k=torch.tensor([1.5, 2.0])), "top_k"),
    (dict(logits=torch.randn(2, 4), top_k=-1), "top_k"),
    (dict(logits=torch.randn(2, 4), min_p=1.0), "min_p"),
    (dict(logits=torch.randn(2, 4), temperature=torch.ones(3)), "temperature"),
    (dict(logits=torch.randn(2, 4), seed=-3), "seed"),
    (dict(logits=torch.randn(2, 4), seed=torch.tensor([1, 2, 3])), "seed"),
    (dict(logits=torch.tensor([[0.0, float("nan")], [1.0, 2.0]])), "logits: row"),
    (dict(logits=torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])), "no finite logit"),
])
@pytest.mark.parametrize("ft", [False, True])
def test_validation(kwargs, match, ft):
    with pytest.raises(ValueError, match=match):
        pv.sample(**kwargs, force_triton=ft)


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8)
    assert pv.backend(x) == "torch" and pv.backend(x, force_triton=True) == "triton"
    monkeypatch.setenv("PIPESD_FORCE_TRITON", "1")
    assert pv.backend(x) == "triton" and pv.backend(x, force_triton=False) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        pv.sample(x, 1.0, seed=0)


# ----------------------------------------------------------------------------- CUDA path compiles
def test_kernels_compile_for_sm90():
    """Every kernel variant lowers to a cubin for sm_90 (H100/H200) with no register spills.

    Runs in a subprocess: under TRITON_INTERPRET=1 kernels are interpreted, not compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    r = subprocess.run([sys.executable, "-m", "pipesd.kernels.aot_check", "--arch", "90", "--dtype", "bf16,fp32",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 18 and all(row["has_cubin"] for row in rows), rows
    assert all(row.get("stack", 0) == 0 and row.get("local", 0) == 0 for row in rows), rows
