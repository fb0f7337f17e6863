"""Replay of a real draft/target pair: record once what greedy verification needs, serve it
back as drop-in models that cost nothing (see docs/models.md, "Replay").

Terms: the *path* of a prompt is the target's greedy output after it; at each path position
the draft's own greedy token is recorded (its probability and its top-``wire_topk`` q too); a
*divergence* is a position where the draft's token differs from the path's, and its *branch*
is the draft's greedy continuation after that token, as far as the edge can draft before the
correction arrives (``lookahead - 1`` tokens). Every sequence a greedy run can put to either
model is the path or one branch, so:

- :class:`ReplayDraft` serves the recorded step for any such sequence, and raises
  :class:`ValueError` naming the position for anything else (it never invents a token);
- :class:`ReplayTarget` serves logits rows whose argmax is the path's token wherever the scored
  prefix is on the path. Past a draft's first mismatch the row is a constant filler: greedy
  verification accepts while draft == argmax and stops at the first mismatch, so it never
  reads a row past it (nor past an EOS, which the protocol clips). Sampling would read every
  row's distribution: a replay is greedy only (the draft refuses sampling).

File: gzip JSON lines; line 1 the header (:data:`FORMAT`, :data:`VERSION`, what was recorded
and how), then one line per prompt. Probabilities are float32, written in their shortest
exact decimal form.
"""
from __future__ import annotations

import gzip
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

import numpy as np
import torch

from pipesd.models.runners import DraftStep, _SeqState, _checked_ids as _checked

__all__ = ["FORMAT", "VERSION", "Recording", "PromptRecord", "ReplayDraft", "ReplayTarget", "ReplayTargetSession",
           "ReplayTokenizer", "record", "load_recording", "edge_prompt_ids"]

FORMAT = "pipesd-replay"
VERSION = 1

Entry = tuple  # (token, prob, q_ids tuple, q_probs tuple): one recorded draft step


@dataclass
class PromptRecord:
    """One prompt's recording. ``draft[i]``: the draft's step after ``prompt_ids + target[:i]``;
    ``branches[i]``: its continuation after its own token at divergence ``i`` (``branches[i][j]``
    is the step at position ``i + 1 + j``)."""

    text: str
    prompt_ids: list
    target: list
    draft: list
    branches: dict = field(default_factory=dict)


@dataclass
class Recording:
    """A header (dict, see :func:`record`) and one :class:`PromptRecord` per prompt."""

    header: dict
    prompts: list

    @property
    def pair_name(self) -> str:
        return str(self.header["pair_name"])

    def save(self, path: str | Path) -> None:
        """Write the gzip JSON-lines file (no name, mtime 0: the same recording gives the same bytes)."""
        lines = [json.dumps(self.header, separators=(",", ":"), sort_keys=True)]
        for r in self.prompts:
            lines.append(json.dumps({"text": r.text, "prompt_ids": r.prompt_ids, "target": r.target,
                                     "draft": [_entry_out(e) for e in r.draft],
                                     "branches": [[i, [_entry_out(e) for e in b]] for i, b in sorted(r.branches.items())]},
                                    separators=(",", ":")))
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f, gzip.GzipFile(filename="", fileobj=f, mode="wb", mtime=0) as g:
            g.write(("\n".join(lines) + "\n").encode("utf-8"))


def _f32(x: float) -> float:
    """``x`` as float32, as the Python float whose repr is its shortest decimal that reads back
    (through :func:`_f32_in`) as the same float32."""
    v = np.float32(x)
    short = float(str(v))
    return short if np.float32(short) == v else float(v)


def _f32_in(x) -> float:
    return float(np.float32(float(x)))


def _entry_out(e: Entry) -> list:
    return [int(e[0]), _f32(e[1]), [int(i) for i in e[2]], [_f32(p) for p in e[3]]]


# ---------------------------------------------------------------------------- loading
def load_recording(path: str | Path) -> Recording:
    """Read and check a recording; :class:`ValueError` naming the file for anything amiss."""
    p = Path(path)
    where = f"replay file {p}"
    try:
        raw = gzip.decompress(p.read_bytes())
        lines = raw.decode("utf-8").splitlines()
        objs = [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file (record one with bench/e2e/record.py)") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not objs or not isinstance(objs[0], dict) or objs[0].get("format") != FORMAT:
        raise ValueError(f"{where}: not a {FORMAT} recording (no header line)")
    h = objs[0]
    if h.get("version") != VERSION:
        raise ValueError(f"{where}: format version {h.get('version')!r}; this pipesd reads version {VERSION}")
    try:
        for key in ("pair_name", "max_new_tokens", "lookahead", "wire_topk", "draft_vocab_size", "target_vocab_size",
                    "eos_token_id", "prompts", "pieces"):
            if key not in h:
                raise ValueError(f"the header has no {key!r}")
        if len(objs) - 1 != h["prompts"]:
            raise ValueError(f"the header promises {h['prompts']} prompts, the file holds {len(objs) - 1}")
        prompts = [_prompt_in(o, h, n) for n, o in enumerate(objs[1:])]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{where} is truncated or corrupt: {e}") from None
    return Recording(h, prompts)


def _prompt_in(o: dict, h: dict, n: int) -> PromptRecord:
    k, vd, vt = int(h["wire_topk"]), int(h["draft_vocab_size"]), int(h["target_vocab_size"])

    def ids(xs, vocab, what):
        out = [int(x) for x in xs]
        if out and (min(out) < 0 or max(out) >= vocab):
            raise ValueError(f"prompt {n}: {what} outside [0, {vocab})")
        return out

    def entry(e) -> Entry:
        tok, prob, qi, qp = e
        if len(qi) != k or len(qp) != k:
            raise ValueError(f"prompt {n}: a q row of {len(qi)} ids / {len(qp)} probs, expected {k}")
        return (ids([tok], vd, "a draft token")[0], _f32_in(prob), tuple(ids(qi, vd, "q ids")),
                tuple(_f32_in(x) for x in qp))

    rec = PromptRecord(str(o["text"]), ids(o["prompt_ids"], vd, "prompt ids"), ids(o["target"], vt, "target tokens"),
                       [entry(e) for e in o["draft"]], {int(i): [entry(e) for e in b] for i, b in o["branches"]})
    if not rec.prompt_ids or not rec.target:
        raise ValueError(f"prompt {n}: empty prompt or target path")
    if len(rec.draft) > len(rec.target):
        raise ValueError(f"prompt {n}: {len(rec.draft)} draft steps for a {len(rec.target)}-token path")
    for i in rec.branches:
        if not 0 <= i < len(rec.draft) or rec.draft[i][0] == rec.target[i]:
            raise ValueError(f"prompt {n}: a branch at {i}, which is not a divergence")
    return rec


# ---------------------------------------------------------------------------- tokenizer
class ReplayTokenizer:
    """The recorded prompts' token ids and the recorded tokens' bytes: what the edge, the cloud
    and the benchmarks ask of a tokenizer. ``encode`` knows only the recorded prompt texts."""

    add_bos_token = False  # recorded prompt ids already hold whatever the real tokenizer added

    def __init__(self, rec: Recording) -> None:
        h = rec.header
        self._prompts = {r.text: list(r.prompt_ids) for r in rec.prompts}
        self._bytes = {int(i): bytes.fromhex(b) for i, b in h["pieces"].items()}
        self.eos_token_id: Optional[int] = h.get("eos_token_id")
        self.bos_token_id: Optional[int] = h.get("bos_token_id")
        self.pad_token_id: Optional[int] = h.get("pad_token_id")
        self.all_special_ids: list[int] = [int(i) for i in h.get("special_ids", [])]
        self.vocab_size = int(h["draft_vocab_size"])
        self.name_or_path = f"replay:{h['pair_name']}"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False, **_) -> list[int]:
        """The recorded ids of a recorded prompt text; ValueError for any other text."""
        ids = self._prompts.get(text)
        if ids is None:
            shown = "; ".join(repr(t[:40]) for t in self._prompts)
            raise ValueError(f"prompt {text[:60]!r} is not in the replay recording (a replay serves only the "
                             f"prompts it recorded: {shown})")
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_) -> str:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        out = []
        for i in ids:
            i = int(i)
            if i in special:
                continue
            b = self._bytes.get(i)
            if b is None:
                raise ValueError(f"token {i} is not in the replay recording (it holds the bytes of recorded tokens only)")
            out.append(b)
        return b"".join(out).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict:
        """The recorded tokens (for the tokenizer fingerprint: both halves of a replay agree)."""
        return {b.hex(): i for i, b in self._bytes.items()}


# ---------------------------------------------------------------------------- lookup
def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _candidates(rec: Recording, seq: Sequence[int]) -> list[PromptRecord]:
    """Recorded prompts ``seq`` starts with, longest first."""
    seq = list(seq)
    found = [r for r in rec.prompts if len(r.prompt_ids) <= len(seq) and seq[:len(r.prompt_ids)] == r.prompt_ids]
    return sorted(found, key=lambda r: -len(r.prompt_ids))


def _no_prompt(seq: Sequence[int]) -> ValueError:
    return ValueError(f"the sequence (first ids {list(seq[:8])}) does not start with a recorded prompt: a replay "
                      "serves only the prompts it recorded")


def _draft_step(r: PromptRecord, x: Sequence[int], lookahead: int) -> Entry:
    """The recorded draft step after ``prompt + x``; ValueError naming the position otherwise."""
    i = _lcp(x, r.target)
    if i == len(x):  # on the path
        if i < len(r.draft):
            return r.draft[i]
        raise ValueError(f"replay draft: position {i} of the target's path was not recorded (the recording holds "
                         f"{len(r.draft)} positions: run with max_new_tokens <= {len(r.draft)})")
    if i >= len(r.draft) or x[i] != r.draft[i][0]:
        raise ValueError(f"replay draft: the sequence leaves the recording at position {i} (token {x[i]} is neither "
                         "the target's nor the draft's there; a replay serves greedy runs only)")
    branch = r.branches.get(i, [])
    tail = list(x[i + 1:])
    j = _lcp(tail, [e[0] for e in branch])
    if j < len(tail):
        raise ValueError(f"replay draft: the sequence leaves the recorded branch after the divergence at {i} at "
                         f"position {i + 1 + j}")
    if j < len(branch):
        return branch[j]
    raise ValueError(f"replay draft: position {i + 1 + j} after the divergence at {i} is past the recorded branch "
                     f"({len(branch)} tokens, recorded with lookahead {lookahead}): drafting further ahead than "
                     "the recording (a longer lookahead, drafting offline) needs a new recording")


def _locate_draft(rec: Recording, seq: Sequence[int]) -> tuple[PromptRecord, Entry]:
    cands = _candidates(rec, seq)
    if not cands:
        raise _no_prompt(seq)
    err = None
    for r in cands:
        try:
            return r, _draft_step(r, seq[len(r.prompt_ids):], int(rec.header["lookahead"]))
        except ValueError as e:
            err = err or e
    raise err


# ---------------------------------------------------------------------------- draft
class ReplayDraft:
    """A :class:`~pipesd.models.DraftModel` look-alike that serves a recording (greedy only)."""

    replayed = True

    def __init__(self, rec: Recording) -> None:
        h = rec.header
        self.recording = rec
        self.pair_name = f"{rec.pair_name} (replayed)"
        self.tokenizer = ReplayTokenizer(rec)
        self.vocab_size = int(h["draft_vocab_size"])
        self.wire_topk = int(h["wire_topk"])
        self.eos_token_id = h.get("eos_token_id")
        self.max_new_tokens = int(h["max_new_tokens"])
        self.recorded_prompts = [r.text for r in rec.prompts]
        self._tokens: list[int] = []
        self._fed = _SeqState()  # what a real draft's cache would hold: ``forwards`` counts as it would
        self._forwards = 0

    @classmethod
    def from_file(cls, path: str | Path) -> "ReplayDraft":
        return cls(load_recording(path))

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def forwards(self) -> int:
        """Token-forwards the real draft would have run for the same calls (its LCP cache)."""
        return self._forwards

    def reset(self, prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self._tokens = _checked(prompt_ids, self.vocab_size)

    def truncate(self, length: int) -> None:
        if not (1 <= length <= len(self._tokens)):
            raise ValueError(f"length {length} outside [1, {len(self._tokens)}]")
        del self._tokens[length:]

    def extend(self, ids: Sequence[int]) -> None:
        self._tokens.extend(_checked(ids, self.vocab_size))

    def step(self, params=None, generator: Optional[torch.Generator] = None, want_full_q: bool = False) -> DraftStep:
        """The recorded greedy step after ``tokens`` (appended); sampling is refused."""
        if params is not None and not params.greedy:
            raise ValueError("a replay is greedy only: it recorded the greedy path, not distributions to sample "
                             "from (use temperature 0, or the live pair)")
        if not self._tokens:
            raise ValueError("no sequence: call reset(prompt_ids) first")
        _, (tok, prob, qi, qp) = _locate_draft(self.recording, self._tokens)
        self._forwards += _feed(self._fed, self._tokens)
        self._tokens.append(tok)
        q_ids, q_probs = np.asarray(qi, dtype=np.int32), np.asarray(qp, dtype=np.float32)
        full = None
        if want_full_q:
            full = np.zeros(self.vocab_size, dtype=np.float32)
            full[q_ids.astype(np.int64)] = q_probs
        return DraftStep(tok, prob, q_ids, q_probs, None, full)


def _feed(st: _SeqState, seq: Sequence[int]) -> int:
    """Tokens a real runner would feed for the next-token row of ``seq`` (no tensors)."""
    return _feed_rows(st, seq, len(seq) - 1)


def _feed_rows(st: _SeqState, seq: Sequence[int], want_from: int) -> int:
    n = len(seq)
    f = st.plan(seq, want_from)
    if f >= n:
        return 0
    st.prepare(f)
    st.finish(seq, f, want_from, [None] * (n - max(f, want_from)))
    return n - f


# ---------------------------------------------------------------------------- target
class ReplayTargetSession:
    """A :class:`~pipesd.models.TargetSession` look-alike over one recorded path."""

    def __init__(self, owner: "ReplayTarget", prompt_ids: Sequence[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty")
        self._owner = owner
        self._tokens = _checked(prompt_ids, owner.vocab_size)
        self._rec = owner._locate(self._tokens)
        self._st = _SeqState()

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def _row(self, x: Sequence[int]) -> torch.Tensor:
        """The row after ``prompt + x``: one-hot-like at the path's token when ``x`` is on the
        path, the filler (all zeros) when it is not or lies past an EOS."""
        r, o = self._rec, self._owner
        row = torch.zeros(o.vocab_size, dtype=torch.float32)
        i = _lcp(x, r.target)
        if i < len(x):
            return row  # off the path: past the first mismatch, never read by greedy verification
        if i < len(r.target):
            row[r.target[i]] = 1.0
            return row
        if r.target[-1] == o.eos_token_id:
            return row  # past the EOS: the protocol clips there
        raise ValueError(f"replay target: position {i} of the target's path was not recorded (the recording "
                         f"holds {len(r.target)} target tokens: run with max_new_tokens <= {len(r.target) - 1})")

    def score(self, draft: Sequence[int]) -> torch.Tensor:
        """Rows ``[len(draft) + 1, V]`` (row i after ``tokens + draft[:i]``), see :meth:`_row`."""
        seq = self._tokens + _checked(draft, self._owner.vocab_size)
        p, L = len(self._rec.prompt_ids), len(self._tokens)
        rows = torch.stack([self._row(seq[p:L + i]) for i in range(len(draft) + 1)])
        self._owner._forwards += _feed_rows(self._st, seq, L - 1)
        return rows

    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """Rows ``[len(tokens) + 1, V]`` of a draft tree (row i + 1 after the path to node i)."""
        toks = _checked(tokens, self._owner.vocab_size)
        par = [int(q) for q in parents]
        if len(par) != len(toks):
            raise ValueError(f"{len(toks)} tokens but {len(par)} parents")
        paths: list[list[int]] = []
        for i, q in enumerate(par):
            if not (-1 <= q < i):
                raise ValueError(f"parents[{i}] = {q}: must be in [-1, {i}) (parents before children)")
            paths.append((paths[q] if q >= 0 else []) + [toks[i]])
        row0 = self.score([])
        x0 = self._tokens[len(self._rec.prompt_ids):]
        self._st.prepare(len(self._tokens))
        self._owner._forwards += len(toks)
        return torch.cat([row0] + [self._row(x0 + pth)[None] for pth in paths], 0)

    def commit(self, new_tokens: Sequence[int]) -> None:
        self._tokens.extend(_checked(new_tokens, self._owner.vocab_size))

    def truncate(self, length: int) -> None:
        if not (1 <= length <= len(self._tokens)):
            raise ValueError(f"length {length} outside [1, {len(self._tokens)}]")
        del self._tokens[length:]

    def close(self) -> None:
        self._st.clear()


class ReplayTarget:
    """A :class:`~pipesd.models.TargetModel` look-alike that serves a recording (greedy only)."""

    replayed = True
    greedy_only = True  # the cloud refuses sampling sessions (SessionStore.open)

    def __init__(self, rec: Recording) -> None:
        h = rec.header
        self.recording = rec
        self.pair_name = f"{rec.pair_name} (replayed)"
        self.tokenizer = ReplayTokenizer(rec)
        self.vocab_size = int(h["target_vocab_size"])
        self.eos_token_id = h.get("eos_token_id")
        self.max_new_tokens = int(h["max_new_tokens"])
        self.recorded_prompts = [r.text for r in rec.prompts]
        self._forwards = 0

    @classmethod
    def from_file(cls, path: str | Path) -> "ReplayTarget":
        return cls(load_recording(path))

    @property
    def forwards(self) -> int:
        """Token-forwards the real target would have run for the same calls (its LCP caches)."""
        return self._forwards

    def _locate(self, ids: list[int]) -> PromptRecord:
        for r in _candidates(self.recording, ids):
            rest = ids[len(r.prompt_ids):]
            if rest == r.target[:len(rest)]:
                return r
        if _candidates(self.recording, ids):
            raise ValueError("replay target: the session's prompt continues a recorded prompt with tokens off the "
                             "target's path")
        raise _no_prompt(ids)

    def new_session(self, prompt_ids: Sequence[int]) -> ReplayTargetSession:
        return ReplayTargetSession(self, prompt_ids)

    def score_batch(self, sessions: Sequence[ReplayTargetSession], drafts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        if len(sessions) != len(drafts):
            raise ValueError(f"{len(sessions)} sessions but {len(drafts)} drafts")
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one batch")
        return [s.score(d) for s, d in zip(sessions, drafts)]


# ---------------------------------------------------------------------------- recording
def edge_prompt_ids(tokenizer, text: str) -> list[int]:
    """The ids the edge sends for ``text`` (``EdgeClient._encode``'s rule: no special tokens,
    a BOS prepended where the tokenizer asks for one)."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos) and getattr(tokenizer, "add_bos_token", False):
        ids = [bos] + ids
    if not ids:
        raise ValueError(f"prompt {text[:40]!r} encodes to no tokens")
    return ids


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_bytes(tokenizer, i: int, bdec: dict) -> bytes:
    """The bytes token ``i`` stands for: exact for byte-level BPE, its lone decode otherwise."""
    lone = tokenizer.decode([i])
    piece = None
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        piece = tokenizer.convert_ids_to_tokens(i)
    if isinstance(piece, str) and piece and all(c in bdec for c in piece):
        b = bytes(bdec[c] for c in piece)
        if b.decode("utf-8", errors="replace") == lone:
            return b
    return lone.encode("utf-8")


def record(draft, target, prompts: Sequence[str], max_new_tokens: int, *, lookahead: int = 48,
           pair_name: str = "", draft_spec: str = "", target_spec: str = "",
           progress: Optional[TextIO] = sys.stderr) -> Recording:
    """Run the real pair once per prompt and keep what greedy verification needs.

    Per prompt: its edge token ids; the target's greedy path (``max_new_tokens + 1`` tokens, or
    through its EOS: the extra one is the row the cloud scores past the length limit); the
    draft's greedy step (token, probability, top-``wire_topk`` q) at each of the first
    ``max_new_tokens`` path positions; at each divergence its branch: up to ``lookahead - 1``
    further steps, never past ``max_new_tokens`` nor past a drafted EOS. ``progress``: one line
    per prompt (None: silent).
    """
    from pipesd.fingerprint import tokenizer_fingerprint
    from pipesd.sampling import SamplingParams

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}")
    if not prompts:
        raise ValueError("no prompts to record")
    tok = draft.tokenizer
    if tok is None:
        raise ValueError("the draft has no tokenizer: a recording maps prompt texts to ids with it")
    eos = getattr(tok, "eos_token_id", None)
    greedy = SamplingParams()
    N, used, recs = max_new_tokens, set(), []
    for n, text in enumerate(prompts):
        t0 = time.perf_counter()
        ids = edge_prompt_ids(tok, text)
        s = target.new_session(ids)
        path: list[int] = []
        try:
            while len(path) < N + 1 and (not path or path[-1] != eos):
                path.append(int(torch.argmax(s.score([])[-1])))
                s.commit(path[-1:])
        finally:
            s.close()
        steps, branches = [], {}
        n_draft = min(N, len(path))
        draft.reset(ids)
        for i in range(n_draft):
            st = draft.step(greedy)
            steps.append(_entry(st))
            if st.token != path[i] and st.token != eos:
                b = []
                for _ in range(min(lookahead - 1, N - 1 - i)):
                    e = _entry(draft.step(greedy))
                    b.append(e)
                    if e[0] == eos:
                        break
                branches[i] = b
            draft.truncate(len(ids) + i)
            draft.extend([path[i]])
        rec = PromptRecord(text, ids, path, steps, branches)
        recs.append(rec)
        used.update(ids, path, (e[0] for e in steps), (e[0] for b in branches.values() for e in b))
        if progress is not None:
            print(f"record: prompt {n + 1}/{len(prompts)}: {len(ids)} prompt tokens, {len(path)} target tokens"
                  f"{' (EOS)' if path[-1] == eos else ''}, {len(branches)} divergences, "
                  f"{sum(len(b) for b in branches.values())} branch steps, {time.perf_counter() - t0:.1f} s",
                  file=progress, flush=True)
    bdec = _byte_decoder()
    pieces = {str(i): _token_bytes(tok, i, bdec).hex() for i in sorted(used)}
    header = {"format": FORMAT, "version": VERSION, "greedy_only": True, "pair_name": pair_name or "unnamed pair",
              "draft_spec": draft_spec, "target_spec": target_spec, "max_new_tokens": N, "lookahead": lookahead,
              "wire_topk": int(draft.wire_topk), "draft_vocab_size": int(draft.vocab_size),
              "target_vocab_size": int(target.vocab_size), "eos_token_id": eos,
              "bos_token_id": getattr(tok, "bos_token_id", None), "pad_token_id": getattr(tok, "pad_token_id", None),
              "special_ids": sorted(int(i) for i in getattr(tok, "all_special_ids", []) or []),
              "tokenizer_id": tokenizer_fingerprint(tok), "tokenizer_name": str(getattr(tok, "name_or_path", "")),
              "prompts": len(recs), "pieces": pieces}
    out = Recording(header, recs)
    rt = ReplayTokenizer(out)
    header["text_exact"] = all(rt.decode(r.target, skip_special_tokens=True) ==
                               tok.decode(r.target, skip_special_tokens=True) for r in recs)
    return out


def _entry(st: DraftStep) -> Entry:
    qi = np.asarray(st.q_ids).astype(np.int64).tolist()
    qp = [_f32_in(x) for x in np.asarray(st.q_probs, dtype=np.float32)]
    return (int(st.token), _f32_in(st.prob), tuple(qi), tuple(qp))
