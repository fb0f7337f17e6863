"""``pipesd check-pair DRAFT TARGET``: is this a usable speculative-decoding pair, and how should
it be run?

1. **Tokenizers**: the draft and the target must share one tokenizer (the fingerprint of
   :mod:`pipesd.fingerprint`, the one the edge and the cloud exchange). A mismatch is refused
   with the first token ids that differ.
2. **Agreement** on a few prompts: *text agreement* (draft argmax == target argmax at each
   position of the prompt text, teacher-forced: the model card's measure) and, along the
   target's own greedy continuation of each prompt (the sequence greedy speculative decoding
   produces), *greedy agreement* (the acceptance rate of greedy SD's drafts) and the expected
   acceptance of a sampled draft at T=1 (``sum_x min(p, q)``).
3. **Costs**: median draft step, target scoring of 1 and 8 tokens (this machine, one call at a
   time, with a cached context).
4. **Suggestion**: the draft's confidences and acceptances along those continuations fit the
   draft model of :func:`pipesd.tuning.simulate_tpt` (today's protocol: continuation rule,
   bonus, hints, DP batches); with the measured (or given) costs and a link preset, the
   modelled TPT is searched over a grid of ``(tau_seq, tau_tok)`` for the pipelined edge and
   over K for vanilla SD. The result is a **model's** suggestion, a starting point for the
   online tuner (``EdgeClient(tuner="bayes")``), not a measurement.

**One model in memory at a time.** The tokenizers are checked before any weights load. The
target goes first (the continuations are its own greedy tokens, so the draft's confidences
along them need it first): continuations, its logits rows along them, its scoring costs; then
it is freed (``del`` + ``gc``) and the draft loads for its confidences and step cost. Peak
memory is the larger model (float32: 4 bytes per parameter, announced from the checkpoint's
parameter count before loading) plus the target's probabilities along the continuations.
Every step is reported on ``progress`` (``sys.stderr`` by default).

Model specs: a local directory (a transformers causal LM, with its tokenizer files), a bundled
pair's name (``stdlib-code``: its draft or target by position) or ``NAME:draft`` /
``NAME:target``.
"""
from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO, Union

import numpy as np
import torch

from pipesd.models.pairing import PairMismatch, check_tokenizers

__all__ = ["PairMismatch", "PairReport", "resolve_model", "check_tokenizers", "load_prompts", "default_prompts",
           "measure_agreement", "measure_costs", "measure_draft_costs", "measure_target_costs", "fit_confidences",
           "suggest", "check_pair", "format_report", "checkpoint_parameters"]

GENERIC_PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "for key, value in sorted(items.items()):\n",
    "class Stack:\n    def __init__(self):\n",
    "The quick brown fox jumps over the lazy dog. The",
    "Once upon a time, in a small village by the sea,",
]
#: Thresholds searched for the suggestion: what matters is the number of nines (docs/tuning.md).
TAU_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
K_GRID = tuple(range(1, 9))


# ---------------------------------------------------------------------------------- models
def resolve_model(spec: str, role: str) -> Path:
    """A model directory from ``spec``: a local directory, a bundled or fetched
    (:mod:`pipesd.pairs`) pair name (``role`` picks ``draft`` or ``target``) or ``NAME:draft`` /
    ``NAME:target``."""
    from pipesd import zoo

    if role not in ("draft", "target"):
        raise ValueError(f"role must be 'draft' or 'target', got {role!r}")
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} has no config.json: not a transformers model directory")
        return p
    name, _, sub = spec.partition(":")
    if name in zoo.available() and sub in ("", "draft", "target"):
        return zoo.pair_path(name) / (sub or role)
    from pipesd import pairs

    if sub in ("", "draft", "target") and (name in pairs.REGISTRY or pairs.is_fetched(name)):
        return getattr(pairs.resolve(name), sub or role)  # unfetched: "run pipesd pair fetch NAME"
    raise ValueError(f"{spec!r} is neither a model directory nor a bundled pair (available: "
                     f"{', '.join(zoo.available()) or 'none'}; as NAME, NAME:draft or NAME:target) "
                     "nor a fetched pair (`pipesd pair list`)")


def _bundled_name(spec: str) -> Optional[str]:
    from pipesd import zoo

    name = spec.partition(":")[0]
    return name if not Path(spec).is_dir() and name in zoo.available() else None


# ---------------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: ``.json`` (a list of strings), ``.jsonl`` (a string or
    ``{"prompt": ...}`` per line), anything else one prompt per non-empty line (``\\n``
    escapes allowed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no prompts file at {p}")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
        out = data if isinstance(data, list) else None
    elif p.suffix == ".jsonl":
        out = []
        for line in text.splitlines():
            if line.strip():
                v = json.loads(line)
                out.append(v.get("prompt") if isinstance(v, dict) else v)
    else:
        out = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not out or not all(isinstance(x, str) and x for x in out):
        raise ValueError(f"{p}: expected a non-empty list of non-empty prompt strings")
    return out


def default_prompts(tokenizer, bundled: Optional[str], n: int = 8, width: int = 192) -> list[list[int]]:
    """Bundled pair: ``n`` windows of ``width`` tokens spread over its held-out sample (text the
    models never trained on). Otherwise a few short generic prompts."""
    if bundled:
        from pipesd import zoo

        sample = zoo.pair_path(bundled) / "heldout_sample.txt"
        if sample.is_file():
            ids = tokenizer.encode(sample.read_text(), add_special_tokens=False)
            if len(ids) > width:
                k = min(n, len(ids) // width)
                starts = np.linspace(0, len(ids) - width, k).astype(int)
                return [ids[s:s + width] for s in starts]
    return [tokenizer.encode(p, add_special_tokens=False) for p in GENERIC_PROMPTS]


# ---------------------------------------------------------------------------------- measure
def _max_positions(model_or_config) -> int:
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(cfg, "max_position_embeddings", 0) or 4096)


@torch.inference_mode()
def _target_pass(target, prompts: Sequence[Sequence[int]], tokens: int, limit: int,
                 say: Callable[[str], None] = lambda m: None) -> list[dict]:
    """The target's half of :func:`measure_agreement`: per prompt its greedy continuation, its
    argmax at every position and its probabilities along the continuation (float16)."""
    out = []
    for i, ids in enumerate(prompts, 1):
        ids = list(ids)[-limit:]
        if not ids:
            continue
        say(f"agreement prompt {i}/{len(prompts)}: target continuation ({tokens} tokens)")
        cont = _greedy(target, ids, tokens)
        tl = target.model(torch.tensor([ids + cont])).logits[0].float()
        n = len(ids)
        out.append({"ids": ids, "cont": cont, "argmax": tl.argmax(-1),
                    "probs": torch.softmax(tl[n - 1: n - 1 + len(cont)], -1).half()})
    return out


@torch.inference_mode()
def _draft_pass(draft, passes: list[dict], n_prompts: int, tokens: int,
                say: Callable[[str], None] = lambda m: None) -> dict:
    """The draft's half of :func:`measure_agreement`, on the target's continuations."""
    text_hits = text_n = 0
    conf, agree, accept_t1 = [], [], []
    for i, ps in enumerate(passes, 1):
        say(f"agreement prompt {i}/{len(passes)}: draft confidences")
        ids, cont = ps["ids"], ps["cont"]
        dl = draft.model(torch.tensor([ids + cont])).logits[0].float()
        t_arg, t_probs = ps["argmax"], ps["probs"].float()
        V = min(dl.shape[-1], t_probs.shape[-1])
        dl = dl[:, :V]
        n = len(ids)
        if n > 1:  # teacher-forced on the prompt text: position i predicts token i + 1
            text_hits += int((t_arg[: n - 1] == dl[: n - 1].argmax(-1)).sum())
            text_n += n - 1
        q = torch.softmax(dl[n - 1: n - 1 + len(cont)], -1)
        conf.extend(q.max(-1).values.tolist())
        agree.extend((q.argmax(-1) == t_arg[n - 1: n - 1 + len(cont)]).tolist())
        accept_t1.extend(torch.minimum(t_probs[:, :V], q).sum(-1).tolist())
    if not agree:
        raise ValueError("no usable prompt (all empty after tokenization)")
    return {
        "prompts": n_prompts,
        "text_positions": text_n,
        "text_agreement": text_hits / text_n if text_n else None,
        "greedy_positions": len(agree),
        "greedy_agreement": float(np.mean(agree)),
        "expected_acceptance_t1": float(np.mean(accept_t1)),
        "trace": {"confidence": [float(c) for c in conf], "accepted": [bool(a) for a in agree]},
    }


def _context_limit(tokens: int, *models_or_configs) -> int:
    limit = min(_max_positions(m) for m in models_or_configs) - tokens
    if limit < 2:
        raise ValueError(f"--tokens {tokens} leaves no room for a prompt within the models' context")
    return limit


def measure_agreement(draft, target, prompts: Sequence[Sequence[int]], tokens: int = 32) -> dict:
    """Text and greedy agreement, expected T=1 acceptance, and the per-position trace
    (draft confidence, accepted) along the target's greedy continuations. The target's pass
    runs first and keeps what the draft's pass needs, so the two models need not be in
    memory together (:func:`check_pair` frees the target in between)."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    limit = _context_limit(tokens, draft.model, target.model)
    return _draft_pass(draft, _target_pass(target, prompts, tokens, limit), len(prompts), tokens)


def _greedy(target, prompt: list[int], n: int) -> list[int]:
    """``n`` target-greedy tokens after ``prompt`` (one cached forward per token)."""
    s = target.new_session(prompt)
    out = []
    try:
        for _ in range(n):
            t = int(torch.argmax(s.score([])[-1]))
            out.append(t)
            s.commit([t])
    finally:
        s.close()
    return out


def _cost_prompt(prompt: Sequence[int], limit: int, reps: int) -> list[int]:
    return list(prompt)[: max(1, limit - reps - 16)]


def measure_draft_costs(draft, prompt: Sequence[int], reps: int = 15) -> dict:
    """Median seconds of one draft step after ``prompt`` (cached): ``draft_step_s``."""
    from pipesd.sampling import SamplingParams

    prompt = _cost_prompt(prompt, _max_positions(draft.model), reps)
    greedy = SamplingParams()
    draft.reset(prompt)
    draft.step(greedy)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        draft.step(greedy)
        ts.append(time.perf_counter() - t0)
    return {"draft_step_s": statistics.median(ts), "context_tokens": len(prompt)}


def measure_target_costs(target, prompt: Sequence[int], reps: int = 15) -> dict:
    """Median seconds of target scoring of 1 and of 8 draft tokens after a cached context (a
    different first token every time, so the tokens are really fed: the kept rows of the
    previous draft do not apply, the context stays cached)."""
    prompt = _cost_prompt(prompt, _max_positions(target.model), reps)
    out = {}
    s = target.new_session(prompt)
    try:
        s.score([])
        V = target.vocab_size
        for k in (1, 8):
            ts = []
            for r in range(reps):
                d = [(r * 31 + j * 7 + 1) % V for j in range(k)]
                f0 = target.forwards
                t0 = time.perf_counter()
                s.score(d)
                ts.append(time.perf_counter() - t0)
                assert target.forwards - f0 == k
            out[f"target_score_{k}_s"] = statistics.median(ts)
    finally:
        s.close()
    return out


def measure_costs(draft, target, prompt: Sequence[int], reps: int = 15) -> dict:
    """Median seconds: one draft step; target scoring of 1 and of 8 draft tokens after a cached
    context (:func:`measure_draft_costs`, :func:`measure_target_costs`, on the same prompt).
    Also what the zoo's training script times for the model card
    (:func:`pipesd.zoo.train.time_runners`)."""
    prompt = list(prompt)[: max(1, min(_max_positions(draft.model), _max_positions(target.model)))]
    return {**measure_draft_costs(draft, prompt, reps), **measure_target_costs(target, prompt, reps)}


# ---------------------------------------------------------------------------------- suggest
def _beta_moments(x: np.ndarray, default: tuple[float, float]) -> tuple[float, float]:
    """Beta(a, b) with the sample's mean and variance (method of moments), clamped to sane shapes."""
    if len(x) < 3:
        return default
    m = float(np.clip(np.mean(x), 1e-3, 1 - 1e-3))
    v = float(np.var(x))
    if v <= 1e-9 or v >= m * (1 - m):
        return default
    k = m * (1 - m) / v - 1
    return float(np.clip(m * k, 0.05, 500.0)), float(np.clip((1 - m) * k, 0.05, 500.0))


def fit_confidences(confidence: Sequence[float], accepted: Sequence[bool], split: float = 0.5) -> dict:
    """Fit :class:`pipesd.tuning.SimConfig`'s draft model to a measured trace: a two-Beta
    mixture of confidences (``>= split``: confident, else contested, each by moments) and the
    calibration exponent ``c`` with ``mean(p ** c)`` equal to the measured acceptance."""
    p = np.clip(np.asarray(confidence, dtype=np.float64), 1e-6, 1 - 1e-6)
    acc = float(np.mean(accepted)) if len(accepted) else 0.0
    hard = p < split
    conf_a, conf_b = _beta_moments(p[~hard], (30.0, 0.5))
    hard_a, hard_b = _beta_moments(p[hard], (2.0, 2.0))
    lo, hi = 0.05, 20.0  # mean(p ** c) falls as c grows: bisect
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if float(np.mean(p ** mid)) > acc:
            lo = mid
        else:
            hi = mid
    return {"conf_a": conf_a, "conf_b": conf_b, "hard_frac": float(np.mean(hard)), "hard_a": hard_a,
            "hard_b": hard_b, "calibration": float(math.sqrt(lo * hi))}


def _wire_costs(link: str, sampling: bool) -> dict:
    """startup_s / per_token_s / delay_s of the uplink of a link preset (docs/wire.md sizes:
    8 bytes per greedy draft token, + 8 top-k (id, prob) pairs when sampling; ~40 bytes of
    frame per message)."""
    if link in ("none", ""):
        return {"startup_s": 0.0, "per_token_s": 0.0, "delay_s": 0.0, "hint_s": 0.0}
    from pipesd.transport.link import link_preset

    up, _ = link_preset(link)
    per_token_bytes = 8 + (64 if sampling else 0)
    return {"startup_s": up.per_message_s + 40 * 8 / up.bandwidth_bps,
            "per_token_s": per_token_bytes * 8 / up.bandwidth_bps, "delay_s": up.delay_s,
            "hint_s": 8 * 8 / up.bandwidth_bps}  # a hint goes without its q


def suggest(trace: dict, costs: dict, *, link: str = "paper", draft_ms: Optional[float] = None,
            verify_ms: Optional[float] = None, sampling: bool = False, segments: int = 1500) -> dict:
    """The modelled best ``(tau_seq, tau_tok)`` for a pipelined edge (over :data:`TAU_GRID` and
    the defaults) and the best K for vanilla SD, from a measured trace and costs (``draft_ms`` /
    ``verify_ms`` replace the measured draft step / verification time: the deployment's, not
    this machine's)."""
    from pipesd.edge.trigger import TriggerConfig
    from pipesd.tuning import SimConfig, simulate_tpt

    fit = fit_confidences(trace["confidence"], trace["accepted"])
    gen_s = draft_ms / 1e3 if draft_ms is not None else costs["draft_step_s"]
    if verify_ms is not None:  # as `pipesd serve --verify-pad-ms`: one verification takes this long
        vb, vt = verify_ms / 1e3, 0.0
    else:
        vt = max(0.0, (costs["target_score_8_s"] - costs["target_score_1_s"]) / 7)
        vb = max(0.0, costs["target_score_1_s"] - vt)
    wire = _wire_costs(link, sampling)
    base = SimConfig(gen_s=gen_s, verify_base_s=vb, verify_per_token_s=vt, segments=segments, **wire, **fit)
    d = TriggerConfig()
    default = simulate_tpt(d.tau_seq, d.tau_tok, base)
    pipelined = {(d.tau_seq, d.tau_tok): default}  # never suggest what the model finds slower than the defaults
    for ts in TAU_GRID:
        for tt in TAU_GRID:
            pipelined[(ts, tt)] = simulate_tpt(ts, tt, base)
    (bs, bt), best = min(pipelined.items(), key=lambda kv: kv[1].tpt_s)
    serial = {k: simulate_tpt(0.0, 0.0, base, pipeline=False, max_draft=k) for k in K_GRID}
    k_best, s_best = min(serial.items(), key=lambda kv: kv[1].tpt_s)
    method = "pipesd" if best.tpt_s <= s_best.tpt_s else "vanilla-sd"
    return {
        "method": method,
        "tau_seq": bs, "tau_tok": bt,
        "pipesd_tpt_s": best.tpt_s, "pipesd_mean_run": best.mean_draft_len, "pipesd_acceptance": best.acceptance,
        "default_thresholds": [d.tau_seq, d.tau_tok], "default_tpt_s": default.tpt_s,
        "k": k_best, "vanilla_sd_tpt_s": s_best.tpt_s,
        "speedup_vs_vanilla_sd": s_best.tpt_s / best.tpt_s,
        "model": {"link": link, "gen_s": gen_s, "verify_base_s": vb, "verify_per_token_s": vt, **wire, **fit},
        "note": "modelled by pipesd.tuning.simulate_tpt from this pair's measured confidences; a starting "
                "point: EdgeClient(tuner='bayes') tunes online on the real link",
    }


# ---------------------------------------------------------------------------------- report
@dataclass
class PairReport:
    draft: str
    target: str
    draft_dir: str
    target_dir: str
    draft_params: int
    target_params: int
    tokenizer: dict
    agreement: dict
    costs: dict
    suggestion: dict
    warnings: list = field(default_factory=list)

    def to_dict(self, trace: bool = False) -> dict:
        d = asdict(self)
        if not trace:
            d["agreement"] = {k: v for k, v in d["agreement"].items() if k != "trace"}
        return d


def checkpoint_parameters(model_dir: Union[str, Path]) -> Optional[int]:
    """Parameters stored in a model directory's ``*.safetensors`` files, read from their headers
    (no weights are loaded); None when there are none (e.g. a ``.bin`` checkpoint)."""
    total, found = 0, False
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            return None
        for name, t in header.items():
            if name != "__metadata__":
                total += math.prod(t.get("shape", []))
                found = True
    return total if found else None


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return None


def _config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def _logit_rows(cfg) -> int:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.vocab_size)


def _announce(role: str, params: Optional[int]) -> str:
    if params is None:
        return f"loading the {role} (parameter count unknown: no safetensors header)"
    size = f"{params * 4 / 2**30:.1f} GiB" if params * 4 >= 2**30 else f"{params * 4 / 2**20:.0f} MiB"
    return f"loading the {role}: {params:,} parameters, ~{size} as float32"


def _reporter(progress: Union[TextIO, Callable[[str], None], None]) -> Callable[[str], None]:
    if progress is None:
        return lambda msg: None
    if callable(progress):
        return progress

    def say(msg: str) -> None:
        print(f"pipesd: check-pair: {msg}", file=progress, flush=True)
    return say


def check_pair(draft_spec: str, target_spec: str, *, prompts: Optional[Sequence[str]] = None, tokens: int = 32,
               link: str = "paper", draft_ms: Optional[float] = None, verify_ms: Optional[float] = None,
               sampling: bool = False, reps: int = 15,
               progress: Union[TextIO, Callable[[str], None], None] = sys.stderr) -> PairReport:
    """Load, check, measure and suggest (see the module docstring), one model in memory at a
    time. ``progress``: a text stream for one line per step (default stderr), a callable taking
    each line, or None. Raises :class:`PairMismatch` for an unusable pair, ``ValueError`` for bad
    arguments."""
    from pipesd.models import DraftModel, TargetModel

    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    say = _reporter(progress)
    ddir, tdir = resolve_model(draft_spec, "draft"), resolve_model(target_spec, "target")
    say("tokenizers: comparing (no weights loaded yet)")
    dcfg, tcfg = _config(ddir), _config(tdir)
    dtok, ttok = _load_tokenizer(ddir), _load_tokenizer(tdir)
    tok_info = check_tokenizers(dtok, ttok, _logit_rows(dcfg), _logit_rows(tcfg))
    warnings = []
    if tok_info["compared"].startswith("logit counts"):
        warnings.append("tokenizer compatibility checked by vocabulary size only: " + tok_info["compared"])
    tok = ttok or dtok
    if tok is None:
        raise ValueError("neither model directory has tokenizer files: check-pair needs one to encode prompts")
    if prompts is not None:
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    else:
        ids = default_prompts(tok, _bundled_name(target_spec) or _bundled_name(draft_spec))
    limit = _context_limit(tokens, dcfg, tcfg)
    longest = max(ids, key=len)

    say(_announce("target", checkpoint_parameters(tdir)) + " (alone: the draft loads after it is freed)")
    target = TargetModel.from_pretrained(tdir)
    tp = sum(p.numel() for p in target.model.parameters())
    passes = _target_pass(target, ids, tokens, limit, say)
    say(f"cost measurement: target scoring of 1 and 8 tokens ({reps} repetitions each)")
    costs = measure_target_costs(target, longest, reps)
    del target
    gc.collect()

    say(_announce("draft", checkpoint_parameters(ddir)) + " (the target is freed)")
    draft = DraftModel.from_pretrained(ddir)
    dp = sum(p.numel() for p in draft.model.parameters())
    agreement = _draft_pass(draft, passes, len(ids), tokens, say)
    del passes
    say(f"cost measurement: draft step ({reps} repetitions)")
    costs = {**measure_draft_costs(draft, longest, reps), **costs}
    del draft
    gc.collect()

    if dp >= tp:
        warnings.append(f"the draft ({dp:,} parameters) is not smaller than the target ({tp:,})")
    if agreement["greedy_agreement"] < 0.3:
        warnings.append("greedy agreement below 0.3: speculative decoding will gain little with this pair")
    say(f"suggestion: modelling {len(TAU_GRID) ** 2} threshold pairs and {len(K_GRID)} values of K "
        "(pipesd.tuning.simulate_tpt)")
    sug = suggest(agreement["trace"], costs, link=link, draft_ms=draft_ms, verify_ms=verify_ms, sampling=sampling)
    say("done")
    return PairReport(draft_spec, target_spec, str(ddir), str(tdir), dp, tp, tok_info, agreement, costs, sug, warnings)


def format_report(r: PairReport) -> str:
    """The human-readable table printed by ``pipesd check-pair``."""
    a, c, s = r.agreement, r.costs, r.suggestion
    ms = lambda x: f"{x * 1e3:.2f} ms"  # noqa: E731
    text = "-" if a["text_agreement"] is None else f"{a['text_agreement']:.3f} ({a['text_positions']} positions)"
    rows = [
        ("draft", f"{r.draft} ({r.draft_params:,} parameters)"),
        ("target", f"{r.target} ({r.target_params:,} parameters, {r.target_params / max(1, r.draft_params):.1f}x)"),
        ("tokenizer", f"compatible: {r.tokenizer['compared']}, {r.tokenizer['vocab']} tokens"
                      + (f", fingerprint {r.tokenizer['fingerprint']}" if r.tokenizer["fingerprint"] else "")),
        ("prompts", f"{a['prompts']}"),
        ("text agreement (teacher-forced)", text),
        ("greedy agreement (target's continuation)", f"{a['greedy_agreement']:.3f} ({a['greedy_positions']} positions)"),
        ("expected acceptance, sampling T=1", f"{a['expected_acceptance_t1']:.3f}"),
        ("draft step", ms(c["draft_step_s"])),
        ("target scoring, 1 token", ms(c["target_score_1_s"])),
        ("target scoring, 8 tokens", ms(c["target_score_8_s"])),
    ]
    m = s["model"]
    rows += [
        ("modelled setting", f"link {m['link']}, draft {ms(m['gen_s'])}/token, verification "
                             f"{ms(m['verify_base_s'])} + {ms(m['verify_per_token_s'])}/token"),
        ("suggested method", s["method"]),
        ("suggested thresholds (pipesd)", f"tau_seq {s['tau_seq']}, tau_tok {s['tau_tok']} -> model TPT "
                                          f"{ms(s['pipesd_tpt_s'])}, {s['pipesd_mean_run']:.1f} drafts/verification "
                                          f"(defaults {tuple(s['default_thresholds'])}: {ms(s['default_tpt_s'])})"),
        ("best K (vanilla SD)", f"{s['k']} -> model TPT {ms(s['vanilla_sd_tpt_s'])}"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    lines.append(f"note: {s['note']}")
    lines += [f"warning: {x}" for x in r.warnings]
    draft = _bundled_name(r.draft) or r.draft
    if s["method"] == "pipesd":
        lines.append(f"run: pipesd generate PROMPT --cloud HOST:PORT --draft {draft} --tau-seq {s['tau_seq']} "
                     f"--tau-tok {s['tau_tok']}")
    else:
        lines.append(f"run: pipesd generate PROMPT --cloud HOST:PORT --draft {draft} --method vanilla-sd --k {s['k']}")
    return "\n".join(lines)
