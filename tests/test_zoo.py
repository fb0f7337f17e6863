"""The bundled pair (offline load, quality bars measured now), timing pairs, the training script."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipesd import zoo
from pipesd.sampling import SamplingParams


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes 2 OpenMP threads crawl."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair()


def test_available_and_paths():
    assert zoo.DEFAULT_PAIR in zoo.available()
    p = zoo.pair_path()
    assert p == zoo.pair_path(zoo.DEFAULT_PAIR)
    for f in ("draft/model.safetensors", "target/model.safetensors", "draft/tokenizer.json", "target/tokenizer.json",
              "MODEL_CARD.md", "metrics.json", "heldout_sample.txt"):
        assert (p / f).is_file(), f
    assert not (p / "_ckpt.pt").exists()
    with pytest.raises(ValueError, match="no bundled pair"):
        zoo.pair_path("no-such-pair")


def test_pair_loads_offline_in_a_clean_process(tmp_path):
    """HF_HUB_OFFLINE, an empty HF cache: everything comes from the package."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    code = ("from pipesd import zoo; p = zoo.load_pair(threads=1); ids = p.tokenizer.encode('import os\\n');"
            "p.draft.reset(ids); st = p.draft.step(); s = p.target.new_session(ids);"
            "print(p.name, st.token, tuple(s.score([st.token]).shape), type(p.draft.model).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    name, _, *rest = out.stdout.split()
    assert name == zoo.DEFAULT_PAIR and rest[-1] == "LlamaForCausalLM"
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


def test_pair_runners_and_tokenizer(pair):
    assert pair.name == zoo.DEFAULT_PAIR and pair.path == zoo.pair_path()
    tok = pair.tokenizer
    assert tok.eos_token is not None and tok.eos_token_id is not None
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    assert pair.draft.vocab_size == pair.target.vocab_size == len(tok)
    assert pair.draft.tokenizer.get_vocab() == tok.get_vocab()
    assert next(pair.target.model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 loaded


def _heldout_windows(pair, n_max=8, width=256):
    text = (pair.path / "heldout_sample.txt").read_text()
    ids = torch.tensor(pair.tokenizer.encode(text))
    n = min(n_max, (len(ids) - 1) // width)
    assert n * width >= 1500, "held-out sample too short"
    starts = torch.linspace(0, len(ids) - width - 1, n).long()  # spread over the whole sample
    return torch.stack([ids[s:s + width + 1] for s in starts.tolist()])


def test_pair_meets_its_bars(pair):
    card = json.loads((pair.path / "metrics.json").read_text())
    dp = sum(p.numel() for p in pair.draft.model.parameters())
    tp = sum(p.numel() for p in pair.target.model.parameters())
    assert tp >= 5 * dp and card["draft_params"] == dp and card["target_params"] == tp
    size = sum(f.stat().st_size for f in pair.path.rglob("*") if f.is_file())
    assert size <= 40 * 10**6
    assert card["greedy_agreement"] >= 0.5 and card["target_ppl"] < card["draft_ppl"]
    # Measured now, on a fixed held-out sample (not read from the card): ~2000 positions.
    x = _heldout_windows(pair)
    inp, lab = x[:, :-1], x[:, 1:]
    with torch.inference_mode():
        tl = pair.target.model(inp).logits.float()
        dl = pair.draft.model(inp).logits.float()
    agreement = float((tl.argmax(-1) == dl.argmax(-1)).float().mean())
    t_ppl = math.exp(F.cross_entropy(tl.flatten(0, 1), lab.flatten()).item())
    d_ppl = math.exp(F.cross_entropy(dl.flatten(0, 1), lab.flatten()).item())
    print(f"held-out sample: {lab.numel()} positions, agreement {agreement:.3f}, ppl target {t_ppl:.1f} draft {d_ppl:.1f}")
    assert agreement >= 0.5, f"draft/target greedy agreement {agreement:.3f} below the 50% bar"
    assert t_ppl < 0.9 * d_ppl, f"target perplexity {t_ppl:.1f} not clearly below the draft's {d_ppl:.1f}"


def test_pair_greedy_speculative_decoding_is_exact(pair):
    """Draft 4, verify with one target forward, accept the agreeing prefix + the target's token:
    the output equals target-only greedy decoding (runners on the real pair, caches rolled back)."""
    prompt = pair.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
    n = 40
    ref = pair.target.new_session(prompt)
    want = []
    for _ in range(n):
        t = int(ref.score([])[-1].argmax())
        want.append(t)
        ref.commit([t])
    d, s = pair.draft, pair.target.new_session(prompt)
    d.reset(prompt)
    out, accepted = [], 0
    while len(out) < n:
        draft = [d.step(SamplingParams()).token for _ in range(4)]
        rows = s.score(draft)
        k = 0
        while k < len(draft) and int(rows[k].argmax()) == draft[k]:
            k += 1
        new = draft[:k] + [int(rows[k].argmax())]
        accepted += k
        s.commit(new)
        out += new
        d.truncate(len(prompt) + len(out) - 1)
        d.extend(new[-1:])
        assert d.tokens == s.tokens
    assert out[:n] == want
    assert accepted > 0


def test_timing_pair_shapes():
    p = zoo.timing_pair("tiny", vocab_size=512)
    assert p.tokenizer is None  # the bundled tokenizer does not fit 512 logits
    assert sum(x.numel() for x in p.target.model.parameters()) > sum(x.numel() for x in p.draft.model.parameters())
    p.draft.reset([1, 2])
    assert 0 <= p.draft.step().token < 512
    q = zoo.timing_pair("tiny")
    assert q.tokenizer is not None and q.draft.vocab_size == len(q.tokenizer)
    from pipesd.zoo.timing import timing_configs

    d, t = timing_configs("1b-8b", 128256)
    assert (d.num_hidden_layers, d.hidden_size, t.num_hidden_layers, t.hidden_size) == (16, 2048, 32, 4096)
    with pytest.raises(ValueError, match="size"):
        zoo.timing_pair("huge")


def test_training_script_runs_and_resumes(tmp_path):
    """A miniature run of the recipe, and an interrupted + resumed run giving the same weights."""
    from safetensors.torch import load_file

    from pipesd.zoo import train

    common = ["--max-train-mb", "0.15", "--vocab", "512", "--batch", "2", "--seq-len", "32", "--joint-steps", "3",
              "--draft-steps", "2", "--eval-windows", "2", "--timing-reps", "2", "--threads", "1"]
    old = torch.get_num_threads()
    try:
        assert train.main(["--out", str(tmp_path / "a"), *common]) == 0
        # interrupted in phase 1 (joint), then in phase 2 (draft only), then finished
        assert train.main(["--out", str(tmp_path / "b"), *common, "--stop-after", "2"]) == 3
        assert (tmp_path / "b" / "_ckpt.pt").exists()
        assert train.main(["--out", str(tmp_path / "b"), *common, "--resume", "--stop-after", "1"]) == 3
        assert train.main(["--out", str(tmp_path / "b"), *common, "--resume"]) == 0
        assert train.main(["--out", str(tmp_path / "a"), *common, "--measure-only"]) == 0
    finally:
        torch.set_num_threads(old)
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["joint_steps"] == 3 and m["vocab"] == 512 and "greedy_agreement" in m
    assert "greedy agreement" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert not (tmp_path / "b" / "_ckpt.pt").exists()
    for sub in ("draft", "target"):
        a = load_file(tmp_path / "a" / sub / "model.safetensors")
        b = load_file(tmp_path / "b" / sub / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
