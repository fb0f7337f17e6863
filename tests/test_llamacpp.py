"""GGUF export of the bundled pair (always) and the llama.cpp draft backend (where llama_cpp imports).

Tolerance for llama.cpp vs torch logits (f32 GGUF): 2e-2 absolute on logits of magnitude ~15
(llama.cpp keeps its KV cache in f16 by default; measured max difference ~3e-3).
"""
from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from pipesd import zoo
from pipesd.fingerprint import tokenizer_fingerprint
from pipesd.sampling import SamplingParams, draft_distribution
from pipesd.zoo import gguf_export as gx

LOGIT_ATOL = 2e-2
PROMPT = "import os\nimport sys\n\n\ndef main():\n    path = os.path.join("


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return zoo.load_pair()


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    return gx.export_gguf(zoo.pair_path() / "draft", tmp_path_factory.mktemp("gguf") / "draft-f32.gguf", "f32")


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


# --------------------------------------------------------------------------- exporter (always)
def test_permutation_is_llama_cpp_rotary_layout_and_inverts():
    heads, head_dim = 2, 6
    w = np.arange(heads * head_dim)[:, None].astype(np.float32) * np.ones((1, 3), np.float32)
    p = gx.permute_qk(w, heads)
    # per head, rows [0 1 2 | 3 4 5] (rotate_half halves) become adjacent rotary pairs (0,3) (1,4) (2,5)
    assert p[:, 0].tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    assert np.array_equal(gx.unpermute_qk(p, heads), w)
    with pytest.raises(ValueError, match="heads"):
        gx.permute_qk(np.zeros((10, 2), np.float32), 4)


def test_tensors_equal_torch_weights(pair, f32_gguf):
    r = gguf.GGUFReader(str(f32_gguf))
    tensors = {t.name: t for t in r.tensors}
    model = pair.draft.model
    cfg = model.config
    names = gx.gguf_name_map(cfg.num_hidden_layers)
    seen = set()
    for hf_name, w in model.state_dict().items():
        if hf_name == "lm_head.weight":
            assert cfg.tie_word_embeddings and "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
            continue
        gg = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        t = tensors[gg]
        a = np.asarray(t.data)
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32)
        if hf_name.endswith("q_proj.weight"):
            a = gx.unpermute_qk(a, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            a = gx.unpermute_qk(a, cfg.num_key_value_heads)
        assert a.shape == tuple(w.shape), hf_name
        assert np.array_equal(a, w.detach().float().numpy()), hf_name  # the stored f16 weights are exact in f32
        seen.add(gg)
    assert seen == set(tensors)


def test_f16_file_types_and_exact_weights(tmp_path, pair):
    out = gx.export_gguf(zoo.pair_path() / "draft", tmp_path / "d.gguf", "f16")
    r = gguf.GGUFReader(str(out))
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    norm = next(t for t in r.tensors if t.name == "output_norm.weight")
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16 and norm.tensor_type == gguf.GGMLQuantizationType.F32
    ref = pair.draft.model.get_input_embeddings().weight.detach().float().numpy()
    assert np.array_equal(np.asarray(emb.data).astype(np.float32), ref)  # the bundled weights are f16: lossless
    assert _fields(r)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)


def test_metadata(pair, f32_gguf):
    f = _fields(gguf.GGUFReader(str(f32_gguf)))
    cfg = pair.draft.model.config
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert f["llama.block_count"] == cfg.num_hidden_layers
    assert f["llama.embedding_length"] == cfg.hidden_size
    assert f["llama.feed_forward_length"] == cfg.intermediate_size
    assert f["llama.attention.head_count"] == cfg.num_attention_heads
    assert f["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f["llama.attention.key_length"] == f["llama.rope.dimension_count"] == cfg.head_dim
    assert f["llama.context_length"] == cfg.max_position_embeddings
    assert f["llama.vocab_size"] == pair.draft.vocab_size
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)


def test_tokenizer_round_trips(pair, f32_gguf):
    f = _fields(gguf.GGUFReader(str(f32_gguf)))
    tok = pair.tokenizer
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tj = json.loads((zoo.pair_path() / "draft" / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == int(gguf.TokenType.CONTROL)
    assert types.count(int(gguf.TokenType.NORMAL)) == len(vocab) - 1
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.add_bos_token"] is False
    back = gx.load_gguf_tokenizer(f32_gguf)  # the exact HF tokenizer, so the cloud's fingerprint check passes
    assert tokenizer_fingerprint(back) == tokenizer_fingerprint(tok)
    assert back.encode(PROMPT) == tok.encode(PROMPT)


def test_shipped_gguf_is_what_the_exporter_writes(tmp_path):
    shipped = gx.bundled_gguf()
    fresh = gx.export_gguf(zoo.pair_path() / "draft", tmp_path / "fresh.gguf", "f16",
                           name=f"{zoo.DEFAULT_PAIR}-draft")
    a, b = gguf.GGUFReader(str(shipped)), gguf.GGUFReader(str(fresh))
    assert _fields(a) == _fields(b)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and np.asarray(ta.data).tobytes() == np.asarray(tb.data).tobytes(), \
            f"{ta.name}: shipped draft.gguf drifted from the exporter: re-run python -m pipesd.zoo.gguf_export"
    # and it is installed with the package
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"pairs/*/*"' in setup and fnmatch.fnmatch(f"pairs/{zoo.DEFAULT_PAIR}/{gx.BUNDLED_GGUF_NAME}", "pairs/*/*")


def test_cli_and_clear_errors(tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert gx.main(["--which", "target", "--dtype", "f16", "-o", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    assert _fields(r)["general.name"] == f"{zoo.DEFAULT_PAIR}-target" and _fields(r)["llama.block_count"] >= 1
    assert gx.main(["--pair", "no-such-pair", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "no bundled pair" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype"):
        gx.export_gguf(zoo.pair_path() / "draft", tmp_path / "y.gguf", "q4")
    from transformers import GPT2Config, GPT2LMHeadModel

    gdir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(gdir)
    with pytest.raises(ValueError, match="Llama-family"):
        gx.export_gguf(gdir, tmp_path / "z.gguf")


def test_clear_import_error_without_llama_cpp(monkeypatch, capsys):
    from pipesd.models.llamacpp import LlamaCppDraft

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(ImportError, match="llama-cpp-python.*docs/llamacpp.md"):
        LlamaCppDraft(gx.bundled_gguf())
    from pipesd import cli
    from pipesd.launch import load_draft

    with pytest.raises(RuntimeError, match="draft GGUF stdlib-code: .*pip install llama-cpp-python"):
        load_draft(None, 1, zoo.DEFAULT_PAIR)
    with pytest.raises(ValueError, match="not found.*a .gguf file or a bundled pair: stdlib-code"):
        load_draft(None, 1, "/no/such/draft.gguf")
    # `pipesd generate --draft-gguf stdlib-code`: a message, no traceback (the draft loads before connecting)
    assert cli.main(["generate", "x", "--cloud", "127.0.0.1:1", "--draft-gguf", zoo.DEFAULT_PAIR]) == 1
    err = capsys.readouterr().err
    assert "pipesd: error: draft GGUF stdlib-code: " in err and "pip install llama-cpp-python" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- llama.cpp (where installed)
@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (module llama_cpp) is not installed; "
                               "see docs/llamacpp.md to build it")


@pytest.fixture(scope="module")
def lc_draft(llama_cpp, f32_gguf):
    from pipesd.models import LlamaCppDraft

    d = LlamaCppDraft(f32_gguf, n_ctx=512)
    yield d
    d.close()


def test_logits_match_torch(pair, lc_draft):
    ids = pair.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ref = pair.draft.model(torch.tensor([ids])).logits[0].float()
    lc_draft.reset(ids)
    for n in [len(ids), len(ids) - 1, 3, 1, len(ids) - 5, len(ids)]:  # shrink and grow: KV rollback and reuse
        lc_draft.truncate(n) if n <= len(lc_draft) else lc_draft.extend(ids[len(lc_draft):n])
        got = lc_draft.logits()
        assert got.shape == (pair.draft.vocab_size,)
        assert torch.allclose(got, ref[n - 1], atol=LOGIT_ATOL, rtol=0), (n, float((got - ref[n - 1]).abs().max()))
        assert int(got.argmax()) == int(ref[n - 1].argmax())


def test_greedy_tokens_equal_draft_model_with_rollback(pair, lc_draft):
    ids = pair.tokenizer.encode(PROMPT)
    d = pair.draft
    for m in (d, lc_draft):
        m.reset(ids)
    a = [d.step().token for _ in range(16)]
    b = [lc_draft.step().token for _ in range(16)]
    assert a == b
    for m in (d, lc_draft):  # a rejection: keep 5 drafted tokens, append a correction
        m.truncate(len(ids) + 5)
        m.extend([pair.tokenizer.encode(" x")[0]])
    a = [d.step().token for _ in range(16)]
    f0 = lc_draft.forwards
    b = [lc_draft.step().token for _ in range(16)]
    assert a == b and lc_draft.tokens == d.tokens
    assert lc_draft.forwards - f0 == 16  # the correction, then each drafted token but the last, fed once
    lc_draft.truncate(len(lc_draft) - 1)  # the logits after a kept position cost no forward
    f1 = lc_draft.forwards
    lc_draft.logits()
    assert lc_draft.forwards == f1


def test_sampled_step_reports_the_q_it_drew_from(pair, lc_draft):
    ids = pair.tokenizer.encode(PROMPT)
    lc_draft.reset(ids)
    p = SamplingParams(temperature=0.8, top_p=0.95)
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        logits = lc_draft.logits()
        st = lc_draft.step(p, g, want_full_q=True)
        q_ids, q_probs = draft_distribution(logits, p, lc_draft.wire_topk)
        assert np.array_equal(st.q_ids, q_ids.numpy()) and np.allclose(st.q_probs, q_probs.numpy())
        j = list(st.q_ids).index(st.token)
        assert st.prob == pytest.approx(float(st.q_probs[j]))
        assert st.full_q[st.token] == pytest.approx(st.prob) and st.full_q.sum() == pytest.approx(1.0, abs=1e-4)


def test_tree_equals_draft_model(pair, lc_draft):
    ids = pair.tokenizer.encode(PROMPT)
    for m in (pair.draft, lc_draft):
        m.reset(ids)
    a, b = pair.draft.expand_tree(width=2, depth=3, confidence=0.9), lc_draft.expand_tree(width=2, depth=3,
                                                                                          confidence=0.9)
    assert a.tokens == b.tokens and a.parents == b.parents and len(b) > 3


def test_context_overflow_is_a_clear_error(llama_cpp, f32_gguf):
    from pipesd.models import LlamaCppDraft

    d = LlamaCppDraft(f32_gguf, n_ctx=16)
    try:
        d.reset(list(range(1, 20)))
        with pytest.raises(ValueError, match="n_ctx"):
            d.step()
    finally:
        d.close()
    with pytest.raises(FileNotFoundError):
        LlamaCppDraft(f32_gguf.parent / "missing.gguf")


def test_end_to_end_lossless_with_shipped_gguf(llama_cpp, pair):
    from pipesd.edge import EdgeClient, EdgeConfig
    from pipesd.launch import load_draft
    from runtime_helpers import reference_greedy, running_server

    draft = load_draft(None, 1, zoo.DEFAULT_PAIR)  # what `pipesd generate --draft-gguf stdlib-code` loads
    prompts = ["def read_config(path):\n", "for key, value in sorted(items.items()):\n"]
    n_new = 24
    try:
        with running_server(pair.target) as (_, url):
            for method in ("pipesd", "vanilla-sd"):
                with EdgeClient(url, draft, EdgeConfig.for_method(method)) as client:
                    for text in prompts:
                        g = client.generate(text, n_new)
                        ids = pair.tokenizer.encode(text)
                        assert g.token_ids == reference_greedy(pair.target.model, ids, n_new), (method, text)
                        assert g.stats.verifications >= 1
    finally:
        draft.close()


# --------------------------------------------------------------------------- llama.cpp target
# A greedy token may differ from torch's only where torch's top-2 target logits are closer than
# TIE_EPS (twice the logit tolerance of both engines): there either token is the target's argmax
# up to float error. Every such tie is counted and reported; on the bundled prompts there are none.
TIE_EPS = 2 * LOGIT_ATOL
# The same logits computed in decodes of other sizes (a rollback's tail vs a fresh prompt, one
# session vs a batch) agree to within this: llama.cpp's CPU matmul takes another path for one
# token than for several (measured differences up to ~2e-4 on logits of magnitude ~15).
KERNEL_ATOL = 1e-3
TARGET_PROMPTS = ["def read_config(path):\n", "class Stack:\n    def __init__(self):\n",
                  "for key, value in sorted(items.items()):\n", "import os\nimport sys\n\n\ndef main():\n"]


@pytest.fixture(scope="session")
def target_gguf(tmp_path_factory):
    """The bundled target exported to an f32 GGUF once per test session (the bundled weights
    are f16, so f32 holds them exactly)."""
    return gx.export_gguf(zoo.pair_path() / "target", tmp_path_factory.mktemp("gguf-target") / "target-f32.gguf",
                          "f32")


@pytest.fixture(scope="module")
def lc_target(llama_cpp, target_gguf):
    from pipesd.models.llamacpp import LlamaCppTarget

    t = LlamaCppTarget(target_gguf, slots=4, threads=1)
    yield t
    t.close()


def _torch_rows(pair, seq: list[int], start: int) -> torch.Tensor:
    with torch.inference_mode():
        return pair.target.model(torch.tensor([seq])).logits[0, start:].float()


def _no_seq_rm(target):
    """Planted bug: llama.cpp's ``seq_rm`` is skipped, so a rollback would leave the rejected
    tokens' KV cells in place."""
    import llama_cpp as real

    class NoSeqRm:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def llama_memory_seq_rm(mem, seq, p0, p1):
            return p0 == 0 and real.llama_memory_seq_rm(mem, seq, p0, p1)  # a full clear still works

    target._lc = NoSeqRm()
    return target


def _trusting_target(path, **kw):
    """Planted bug: a target that compares nothing on rollback. It trusts that what it fed is
    still the sequence's prefix, keeps the rejected tokens' KV cells and logits rows, and feeds
    only what lies past them (at consecutive positions, so llama.cpp accepts it)."""
    from pipesd.models.llamacpp import LlamaCppTarget

    class Trusting(LlamaCppTarget):
        @staticmethod
        def _plan(s, seq, want_from):
            return min(len(s._fed), len(seq) - 1) if s._slot is not None else 0

    return Trusting(path, **kw)


def test_target_logits_match_torch_at_every_verified_position(pair, lc_target):
    ids = pair.tokenizer.encode(TARGET_PROMPTS[3])
    s = lc_target.new_session(ids)
    draft = pair.tokenizer.encode("    path = os.path.join(")
    got = s.score(draft)
    ref = _torch_rows(pair, ids + draft, len(ids) - 1)
    assert got.shape == (len(draft) + 1, pair.target.vocab_size) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=LOGIT_ATOL, rtol=0), float((got - ref).abs().max())
    assert s.tokens == ids  # scoring does not change the verified sequence
    assert lc_target.vocab_size == pair.target.vocab_size
    assert lc_target.eos_token_id == pair.tokenizer.eos_token_id
    assert tokenizer_fingerprint(lc_target.tokenizer) == tokenizer_fingerprint(pair.target.tokenizer)
    s.close()


def test_target_rollback_logits_equal_a_fresh_evaluation(pair, lc_target, target_gguf):
    from pipesd.models.llamacpp import LlamaCppTarget

    ids = pair.tokenizer.encode(TARGET_PROMPTS[0])
    d1, d2 = [11, 12, 13, 14, 15], [21, 22, 23]
    s = lc_target.new_session(ids)
    s.score(d1)
    s.commit(d1[:2] + [99])  # two drafts accepted, the third rejected: the correction 99
    f0 = lc_target.forwards
    got = s.score(d2)
    assert lc_target.forwards - f0 == 1 + len(d2)  # only the correction and the new drafts are fed
    fresh = lc_target.new_session(s.tokens)
    want = fresh.score(d2)
    assert torch.allclose(got, want, atol=KERNEL_ATOL, rtol=0), float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(got, _torch_rows(pair, s.tokens + d2, len(s) - 1), atol=LOGIT_ATOL, rtol=0)
    s.truncate(len(ids))  # a rollback into the prompt: the cache keeps only the common prefix
    assert torch.allclose(s.score([7]), lc_target.new_session(ids).score([7]), atol=KERNEL_ATOL, rtol=0)
    for x in (s, fresh):
        x.close()
    # the controls: a rollback that trusts the stale cells gives other logits; one that skips
    # seq_rm is refused by llama.cpp itself (positions must follow on from what a sequence holds)
    for make, check in ((lambda: _trusting_target(target_gguf, slots=1, threads=1),
                         lambda b: (b.score(d2) - want).abs().max() > 10 * LOGIT_ATOL),
                        (lambda: _no_seq_rm(LlamaCppTarget(target_gguf, slots=1, threads=1)), None)):
        bad = make()
        try:
            b = bad.new_session(ids)
            b.score(d1)
            b.commit(d1[:2] + [99])
            if check is not None:
                assert check(b)
            else:
                with pytest.raises(RuntimeError, match="llama_decode returned -1"):
                    b.score(d2)
        finally:
            bad.close()


def test_target_batch_equals_each_session_alone_and_slots_are_reused(pair, target_gguf, llama_cpp):
    from pipesd.models.llamacpp import LlamaCppTarget

    t = LlamaCppTarget(target_gguf, slots=2, threads=1)  # 3 sessions on 2 slots: one is evicted each launch
    try:
        prompts = [pair.tokenizer.encode(p) for p in TARGET_PROMPTS[:3]]
        drafts = [[5, 6, 7, 8], [], [9]]
        ss = [t.new_session(p) for p in prompts]
        for step in range(3):
            rows = t.score_batch(ss, drafts)
            for s, d, r in zip(ss, drafts, rows):
                assert r.shape == (len(d) + 1, t.vocab_size)
                assert torch.allclose(r, _torch_rows(pair, s.tokens + d, len(s) - 1), atol=LOGIT_ATOL, rtol=0)
                s.commit(d[:1] + [int(r[min(1, len(d))].argmax())])
        with pytest.raises(ValueError, match="twice"):
            t.score_batch([ss[0], ss[0]], [[], []])
        with pytest.raises(ValueError, match="2 drafts"):
            t.score_batch(ss, [[], []])
    finally:
        t.close()


def test_target_tree_equals_its_chains(pair, lc_target):
    ids = pair.tokenizer.encode(TARGET_PROMPTS[2])
    s = lc_target.new_session(ids)
    toks, parents = [30, 31, 32, 33, 34], [-1, 0, 0, 2, -1]
    tree = s.score_tree(toks, parents)
    paths = [[], [0], [0, 1], [0, 2], [0, 2, 3], [4]]  # row r: after the path to node r - 1
    want = torch.stack([_torch_rows(pair, ids + [toks[i] for i in path], -1)[0] for path in paths])
    assert tree.shape == want.shape and torch.allclose(tree, want, atol=LOGIT_ATOL, rtol=0)
    assert s.tokens == ids
    with pytest.raises(ValueError, match="parents"):
        s.score_tree([1, 2], [-1, 5])
    s.close()


def test_target_clear_errors(llama_cpp, target_gguf, tmp_path):
    from pipesd.models.llamacpp import LlamaCppTarget

    t = LlamaCppTarget(target_gguf, n_ctx=16, slots=1)
    try:
        assert 16 <= t.n_ctx <= 256  # llama.cpp rounds a context up to a multiple of 256
        with pytest.raises(ValueError, match="n_ctx"):
            t.new_session([1] * t.n_ctx).score([2])
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 1024\)"):
            t.new_session([1, 2]).score([5000])
        with pytest.raises(ValueError, match="empty"):
            t.new_session([])
    finally:
        t.close()
    for kw, msg in (({"slots": 0}, "slots"), ({"n_ctx": -1}, "n_ctx"), ({"threads": 0}, "threads")):
        with pytest.raises(ValueError, match=msg):
            LlamaCppTarget(target_gguf, **kw)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    big = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(2000)},
                                                                              unk_token="t0")))
    with pytest.raises(ValueError, match="2000 ids but .* only 1024 logits"):
        LlamaCppTarget(target_gguf, tokenizer=big)


def test_target_input_errors_and_missing_llama_cpp(tmp_path, monkeypatch, capsys, target_gguf):
    from pipesd import cli
    from pipesd.launch import load_target
    from pipesd.models.llamacpp import LlamaCppTarget

    with pytest.raises(FileNotFoundError):
        LlamaCppTarget(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_target(None, 1, gguf=str(not_gguf))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(ImportError, match=r"target backend .*pip install 'pipesd\[llama\]'"):
        LlamaCppTarget(target_gguf)
    with pytest.raises(RuntimeError, match=r"target GGUF .*pip install 'pipesd\[llama\]'"):
        load_target(None, 1, gguf=str(target_gguf))
    for argv, msg in ((["serve", "--target-gguf", str(target_gguf)], "pip install 'pipesd[llama]'"),
                      (["serve", "--target-gguf", str(not_gguf)], "not a GGUF file"),
                      (["serve", "--target-gguf", str(target_gguf), "--model", "bundled"], "not both")):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("pipesd: error: ") and msg in err and "Traceback" not in err


def _greedy_up_to_ties(pair, prompt: list[int], got: list[int], ref: list[int]) -> int:
    """Assert ``got`` equals torch's greedy ``ref`` up to the first near-tie (see TIE_EPS);
    returns 1 where such a tie let them part, else 0."""
    if got == ref:
        return 0
    i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
    row = _torch_rows(pair, prompt + ref[:i], len(prompt) + i - 1)[0]
    top2 = torch.topk(row, 2)
    margin = float(top2.values[0] - top2.values[1])
    assert margin < TIE_EPS and got[i] in top2.indices.tolist(), \
        f"token {i}: llama.cpp target gave {got[i]}, torch {ref[i]}, top-2 margin {margin:.3g} >= {TIE_EPS}"
    return 1


def test_target_greedy_through_the_server_equals_torch_target_only(pair, lc_target):
    import threading

    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.edge import EdgeClient, EdgeConfig
    from pipesd.launch import load_draft
    from runtime_helpers import reference_greedy

    n_new = 32
    prompts = [pair.tokenizer.encode(p) for p in TARGET_PROMPTS]
    refs = {tuple(p): reference_greedy(pair.target.model, p, n_new) for p in prompts}
    server = CloudServer(lc_target, CloudConfig(port=0, verify_pad_s=0.003), tokenizer_fingerprint=tokenizer_fingerprint(lc_target.tokenizer))
    host, port = server.start_in_thread()
    out: dict = {}
    errors: list = []

    drafts = {False: load_draft(None, 1), True: load_draft(None, 1, zoo.DEFAULT_PAIR)}  # one edge each

    def worker(name: str, method: str, order: list, gguf_draft: bool) -> None:
        draft = drafts[gguf_draft]
        try:
            with EdgeClient(f"{host}:{port}", draft, EdgeConfig.for_method(method)) as c:
                out[name] = [(p, c.generate(p, n_new).token_ids) for p in order]
        except BaseException as e:  # reported below, with the test's own assertion
            errors.append(e)

    try:
        for method in ("pipesd", "vanilla-sd"):
            ts = [threading.Thread(target=worker, args=(f"{method}-a", method, prompts, False)),
                  threading.Thread(target=worker, args=(f"{method}-b", method, prompts[::-1], True))]
            for t in ts:
                t.start()
            for t in ts:
                t.join(300)
        assert not errors, errors
    finally:
        server.stop()
        drafts[True].close()
    ties = sum(_greedy_up_to_ties(pair, p, got, refs[tuple(p)]) for runs in out.values() for p, got in runs)
    assert len(out) == 4 and sum(len(r) for r in out.values()) == 4 * len(prompts)
    assert server.stats.max_batch >= 2, "the two edges were never verified in one launch"
    assert ties == 0, f"{ties} of {4 * len(prompts)} generations parted from torch at a near-tie"


@torch.inference_mode()
def _exact_marginals(target, prompt: list[int], params: SamplingParams, depth: int) -> list[np.ndarray]:
    """Exact distribution of positions 0..depth-1 under target sampling, from the served target's
    own logits: ``V + 1`` bins, the last one "ended" (an earlier token was EOS, which stops a
    generation)."""
    from pipesd.sampling import filtered_probs

    V, eos = target.vocab_size, target.tokenizer.eos_token_id
    marg, prefixes, ended = [], {(): 1.0}, 0.0
    s = target.new_session(prompt)
    for _ in range(depth):
        nxt: dict = {}
        m = np.zeros(V + 1)
        m[V] = ended
        for pre, w in prefixes.items():
            logits = s.score(list(pre))[-1]
            p = filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p).double().numpy()
            m[:V] += w * p
            for t in np.nonzero(p > 1e-12)[0]:
                if int(t) == eos:
                    ended += w * p[t]
                else:
                    nxt[pre + (int(t),)] = w * p[t]
        marg.append(m)
        prefixes = nxt
    s.close()
    return marg


def _sample_counts(target, pair, prompt: list[int], params: SamplingParams, depth: int, n: int) -> np.ndarray:
    """Histograms of positions 0..depth-1 over ``n`` seeded generations, from two edges at once
    (bins as :func:`_exact_marginals`: the last one counts generations that ended before)."""
    import threading

    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.edge import EdgeClient, EdgeConfig, TriggerConfig
    from pipesd.launch import load_draft

    counts = np.zeros((depth, target.vocab_size + 1))
    lock = threading.Lock()
    errors: list = []
    server = CloudServer(target, CloudConfig(port=0, verify_pad_s=0.003))  # a slower cloud: launches overlap
    host, port = server.start_in_thread()

    drafts = [load_draft(None, 1) for _ in range(2)]  # one edge each (loaded here: loading is not thread-safe)

    def worker(seeds, draft) -> None:
        cfg = EdgeConfig.for_method("pipesd", trigger=TriggerConfig(0.2, 0.3, 4))
        try:
            with EdgeClient(f"{host}:{port}", draft, cfg) as c:
                for i in seeds:
                    p = SamplingParams(params.temperature, params.top_k, params.top_p, params.min_p, seed=i)
                    g = c.generate(prompt, depth, p)
                    with lock:
                        for d in range(depth):
                            counts[d, g.token_ids[d] if d < len(g.token_ids) else -1] += 1
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(range(k, n, 2), drafts[k])) for k in range(2)]
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join(600)
    finally:
        server.stop()
    assert not errors, errors
    assert server.stats.max_batch >= 2 and server.stats.wasted_forwards > 0  # batched, and with rejections
    return counts


def test_target_sampling_matches_its_distribution_and_a_stale_rollback_is_caught(pair, lc_target, target_gguf):
    import _stats as st

    prompt = pair.tokenizer.encode("def read_config(path):\n")
    params = SamplingParams(temperature=1.0, top_k=6)
    depth, n = 3, 900
    exact = _exact_marginals(lc_target, prompt, params, depth)
    counts = _sample_counts(lc_target, pair, prompt, params, depth, n)
    for d in range(depth):
        st.check(torch.from_numpy(counts[d]), torch.from_numpy(exact[d]), f"position {d}")
    bad = _trusting_target(target_gguf, slots=4, threads=1)
    try:
        bad_counts = _sample_counts(bad, pair, prompt, params, depth, n)
    finally:
        bad.close()
    assert any(st.fails(torch.from_numpy(bad_counts[d]), torch.from_numpy(exact[d])) for d in range(depth)), \
        "a target that trusts stale KV cells on rollback was not caught"


@pytest.mark.parametrize("role", ["draft", "target"])
def test_a_gguf_without_a_tokenizer_takes_the_pair_directory_next_to_it(llama_cpp, pair, f32_gguf, target_gguf,
                                                                       tmp_path, monkeypatch, role):
    """An upstream GGUF (a fetched pair's) carries llama.cpp's tokenizer, not a Hugging Face one:
    both loaders then take the tokenizer of ``role/`` beside the file, as ``pipesd pair fetch``
    lays a pair out, so text prompts and the fingerprint check work on the edge and the cloud."""
    import shutil

    from pipesd.launch import load_draft, load_target

    gg = tmp_path / f"{role}.gguf"
    shutil.copy(f32_gguf if role == "draft" else target_gguf, gg)
    (tmp_path / role).symlink_to(zoo.pair_path() / role, target_is_directory=True)
    monkeypatch.setattr(gx, "load_gguf_tokenizer", lambda path: None)  # as for an upstream file
    m = load_draft(gguf=str(gg), threads=1) if role == "draft" else load_target(gguf=str(gg), threads=1)
    try:
        assert m.tokenizer is not None
        assert tokenizer_fingerprint(m.tokenizer) == tokenizer_fingerprint(pair.tokenizer)
    finally:
        getattr(m, "close", lambda: None)()
