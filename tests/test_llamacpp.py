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
