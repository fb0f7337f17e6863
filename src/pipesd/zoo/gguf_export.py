"""Convert a local transformers Llama-family causal LM to GGUF, offline, with the ``gguf`` package only.

So the draft can run under llama.cpp (:class:`pipesd.models.llamacpp.LlamaCppDraft`), as on the
method's own testbed. The file follows llama.cpp's ``llama`` architecture conventions:

- tensor names from ``gguf``'s own Hugging Face -> GGUF name map (``token_embd``, ``blk.N.attn_q``, ...);
  a tied ``lm_head`` is left out (llama.cpp then reuses ``token_embd``);
- q/k projection rows are *permuted*: Hugging Face's Llama applies rotary embeddings to the two
  halves of each head (``rotate_half``), llama.cpp's ``llama`` rope rotates adjacent pairs, so
  within each head the rows ``[first half | second half]`` are interleaved
  (row ``2j`` <- ``j``, row ``2j+1`` <- ``half + j``); :func:`unpermute_qk` undoes it;
- 2-D weights in the chosen dtype (f16 or f32), 1-D norms always in f32 (llama.cpp's ``MOSTLY_F16``);
- the tokenizer as llama.cpp's byte-level BPE (``tokenizer.ggml.model = "gpt2"``: tokens, token
  types, merges, special ids) plus the original ``tokenizer.json`` under
  ``tokenizer.huggingface.json``, so the exact Hugging Face tokenizer (and so the tokenizer
  fingerprint the cloud checks) can be rebuilt from the file alone (:func:`load_gguf_tokenizer`).

CLI: ``python -m pipesd.zoo.gguf_export [--pair stdlib-code] [--which draft|target] [--model DIR]
[-o PATH] [--dtype f16|f32] [--pre NAME]``. The bundled draft ships as f16 (its stored weights are
f16, so that file is exact): :func:`bundled_gguf`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["export_gguf", "bundled_gguf", "load_gguf_tokenizer", "permute_qk", "unpermute_qk", "gguf_name_map",
           "BUNDLED_GGUF_NAME", "DTYPES"]

BUNDLED_GGUF_NAME = "draft.gguf"  # in the pair directory, next to draft/ and target/
DTYPES = ("f16", "f32")
_SUPPORTED = ("llama", "mistral")  # same tensor layout and rope as llama.cpp's "llama" architecture


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a declared dependency
        raise ImportError("GGUF export needs the `gguf` package: pip install gguf") from e
    return gguf


# --------------------------------------------------------------------------- q/k rotary layout
def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face q/k projection rows -> llama.cpp's: per head, interleave the two halves."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (llama.cpp rows -> Hugging Face rows)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- config
def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope(cfg) -> tuple[float, Optional[dict]]:
    """(theta, scaling dict or None) across transformers 4.x (``rope_theta``/``rope_scaling``) and 5.x
    (``rope_parameters``)."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        kind = params.get("rope_type", "default")
        return theta, None if kind == "default" else dict(params)
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(getattr(cfg, "rope_theta", 10000.0)), scaling


def _check_config(cfg) -> None:
    mt = getattr(cfg, "model_type", None)
    if mt not in _SUPPORTED:
        raise ValueError(f"GGUF export supports Llama-family models ({', '.join(_SUPPORTED)}), not model_type {mt!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("GGUF export: attention/MLP biases are not supported for the llama layout")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export: hidden_act {cfg.hidden_act!r} is not llama's silu")
    if getattr(cfg, "sliding_window", None):
        raise ValueError("GGUF export: sliding-window attention is not supported")
    _, scaling = _rope(cfg)
    if scaling is not None:
        raise ValueError(f"GGUF export: rope scaling {scaling} is not supported (only default rope)")


def gguf_name_map(n_layers: int):
    """``gguf``'s Hugging Face -> GGUF tensor name map for the llama architecture."""
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)


# --------------------------------------------------------------------------- tokenizer
def _pre_tokenizer_name(tok_json: dict) -> str:
    """The llama.cpp pre-tokenizer for a tokenizer.json, where it can be told for sure."""
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # plain GPT-2 byte-level split: llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2
    raise ValueError(f"cannot tell llama.cpp's pre-tokenizer for pre_tokenizer {pre.get('type')!r}; pass --pre NAME "
                     "(a name llama.cpp knows, e.g. llama-bpe, qwen2, gpt-2)")


def _tokenizer_fields(model_dir: Path, vocab_size: int, pre: Optional[str]) -> dict:
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise FileNotFoundError(f"{tj_path}: GGUF export needs a fast tokenizer (tokenizer.json) next to the model")
    raw = tj_path.read_text(encoding="utf-8")
    tj = json.loads(raw)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}")
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}

    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    by_id = {i: t for t, i in vocab.items()}
    n = max(by_id) + 1
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} ids but the model only {vocab_size} embedding rows")
    tokens, types = [], []
    gguf = _gguf()
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # holes and padded embedding rows: named, unused (llama.cpp needs one token per row)
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif t in added:
            tokens.append(t)
            types.append(int(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(t)
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special_id(key: str) -> Optional[int]:
        v = tcfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return vocab.get(v) if isinstance(v, str) else None

    return {"raw": raw, "tokens": tokens, "types": types, "merges": merges,
            "pre": pre or _pre_tokenizer_name(tj),
            "bos": special_id("bos_token"), "eos": special_id("eos_token"), "pad": special_id("pad_token"),
            "unk": special_id("unk_token"), "add_bos": bool(tcfg.get("add_bos_token", False)),
            "add_eos": bool(tcfg.get("add_eos_token", False)), "chat_template": tcfg.get("chat_template")}


# --------------------------------------------------------------------------- export
def export_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "f16", *, name: Optional[str] = None,
                pre: Optional[str] = None) -> Path:
    """Write ``model_dir`` (a local transformers Llama-family causal LM with a tokenizer.json) as GGUF.

    ``dtype``: ``f16`` or ``f32`` for the 2-D weights (norms stay f32). ``pre``: llama.cpp's
    pre-tokenizer name, when it cannot be told from the tokenizer. Deterministic: the same
    input gives the same file. Returns the path written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf = _gguf()
    import torch
    from pipesd.models import load_local

    model_dir = Path(model_dir)
    model, _ = load_local(model_dir, torch.float32)
    cfg = _text_config(model.config)
    _check_config(cfg)
    n_layers, n_head = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_head)
    emb = model.get_input_embeddings().weight
    vocab_size = int(emb.shape[0])
    theta, _ = _rope(cfg)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tok = _tokenizer_fields(model_dir, vocab_size, pre)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name or model_dir.name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32))
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(vocab_size)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                     ("unk", w.add_unk_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    w.add_string(gguf.Keys.Tokenizer.HF_JSON, tok["raw"])

    names = gguf_name_map(n_layers)
    wanted = np.float16 if dtype == "f16" else np.float32
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise ValueError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        a = t.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            a = permute_qk(a, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            a = permute_qk(a, n_kv)
        a = np.ascontiguousarray(a.astype(wanted if a.ndim >= 2 else np.float32))
        w.add_tensor(gg, a)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def bundled_gguf(pair: Optional[str] = None) -> Path:
    """The shipped GGUF of a bundled pair's draft (f16; see the module docstring)."""
    from pipesd import zoo

    p = zoo.pair_path(pair) / BUNDLED_GGUF_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: this pair ships no GGUF draft; make one with "
                                f"`python -m pipesd.zoo.gguf_export --pair {pair or zoo.DEFAULT_PAIR} -o PATH`")
    return p


# --------------------------------------------------------------------------- reading back
def _field(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def load_gguf_tokenizer(path: str | Path):
    """The Hugging Face tokenizer stored in a GGUF file (exact when the file has
    ``tokenizer.huggingface.json``, as :func:`export_gguf` writes; ``None`` otherwise)."""
    gguf = _gguf()
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    r = gguf.GGUFReader(str(path))
    raw = _field(r, gguf.Keys.Tokenizer.HF_JSON)
    if not raw:
        return None
    tokens = _field(r, gguf.Keys.Tokenizer.LIST)

    def tok_of(key: str) -> Optional[str]:
        i = _field(r, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    kw = {k: v for k, v in (("bos_token", tok_of(gguf.Keys.Tokenizer.BOS_ID)),
                            ("eos_token", tok_of(gguf.Keys.Tokenizer.EOS_ID)),
                            ("pad_token", tok_of(gguf.Keys.Tokenizer.PAD_ID)),
                            ("unk_token", tok_of(gguf.Keys.Tokenizer.UNK_ID))) if v is not None}
    tmpl = _field(r, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    tk = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw), **kw)
    if tmpl:
        tk.chat_template = tmpl
    return tk


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[list] = None) -> int:
    from pipesd import zoo

    ap = argparse.ArgumentParser(prog="python -m pipesd.zoo.gguf_export",
                                 description="Convert a local Llama-family transformers model to GGUF (offline).")
    ap.add_argument("--pair", default=None, help=f"bundled pair (default {zoo.DEFAULT_PAIR})")
    ap.add_argument("--which", default="draft", choices=("draft", "target"), help="which model of the pair")
    ap.add_argument("--model", default=None, help="a model directory instead of a bundled pair")
    ap.add_argument("-o", "--output", default=None, help="output file (default: ./<pair>-<which>.<dtype>.gguf)")
    ap.add_argument("--dtype", default="f16", choices=DTYPES)
    ap.add_argument("--pre", default=None, help="llama.cpp pre-tokenizer name, when it cannot be told")
    args = ap.parse_args(argv)
    try:
        if args.model:
            src, label = Path(args.model), Path(args.model).name
        else:
            pdir = zoo.pair_path(args.pair)
            src, label = pdir / args.which, f"{pdir.name}-{args.which}"
        out = Path(args.output or f"{label}.{args.dtype}.gguf")
        export_gguf(src, out, args.dtype, name=label, pre=args.pre)
    except (ValueError, FileNotFoundError) as e:
        print(f"gguf_export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
