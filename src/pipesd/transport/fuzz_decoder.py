"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer), on demand.

    python -m pipesd.transport.fuzz_decoder                      # until stopped (Ctrl-C)
    python -m pipesd.transport.fuzz_decoder -runs=2000           # a bounded run (CI)
    python -m pipesd.transport.fuzz_decoder -max_total_time=300 corpus/

Needs ``atheris`` (``pip install 'pipesd[fuzz]'``). Without a corpus directory it starts from
one encoded frame of every message type (written to a temporary directory). Other arguments
are libFuzzer's (``-help=1``). On a failure it writes ``crash-<hash>`` with the input and
exits non-zero; replay it with ``python -m pipesd.transport.fuzz_decoder crash-<hash>``.

Properties checked on every input (the codec's contract, ``docs/wire.md``):

1. ``FrameReader.feed`` (the input as a byte stream, in two chunks), ``decode_frame`` and
   ``decode(body, tag)`` (first byte as the type tag) raise :class:`ProtocolError` and nothing
   else: no ``IndexError``, ``struct.error``, ``MemoryError``, numpy errors.
2. Whatever decodes re-encodes, and the re-encoding decodes to a message with the same
   encoding (the decoder accepts nothing the encoder cannot write).
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

try:
    import atheris
except ImportError:  # pragma: no cover - the fuzz extra is optional
    atheris = None

from pipesd.transport import codec
from pipesd.transport import messages as M

__all__ = ["check_input", "sample_messages", "seed_frames", "main"]


def sample_messages() -> list:
    """One valid message of every type (and the q and hint variants of DraftBatch, a rejection
    and a settled bonus Verdict)."""
    qi = np.array([[4, 9, 2], [1, 0, 3]], np.int32)
    qp = np.array([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], np.float32)
    toks, probs = np.array([5, 6], np.int32), np.array([0.5, 1.0], np.float32)
    draft = dict(session_id=3, epoch=2, first_pos=17, tokens=toks, probs=probs)
    return [
        M.Hello(version=1, auth_token="sekrit", client_name="edge-1"),
        M.HelloAck(version=1, server_name="cloud", vocab_size=4096, tokenizer_fingerprint="abcd", max_sessions=8,
                   max_prompt_tokens=4096, max_draft_in_flight=256),
        M.OpenSession(session_id=3, prompt_ids=np.array([1, 2, 3], np.int32), temperature=0.7, top_k=40, top_p=0.9,
                      min_p=0.05, seed=12345, tokenizer_fingerprint="abcd", max_new_tokens=64),
        M.SessionOpened(session_id=3),
        M.DraftBatch(**draft, verify=True, q_ids=qi, q_probs=qp, sent_at=1.5),
        M.DraftBatch(**draft, q_ids=np.tile(np.arange(5, dtype=np.int32), (2, 1)),
                     q_probs=np.full((2, 5), 0.2, np.float32)),
        M.DraftBatch(**draft, verify=True, hint=True, q_ids=qi[:1], q_probs=qp[:1]),
        M.DraftBatch(session_id=3, epoch=0, first_pos=0, tokens=np.zeros(0, np.int32), probs=np.zeros(0, np.float32),
                     verify=True),
        M.Verdict(session_id=3, epoch=2, start_pos=17, end_pos=22, accepted=3, token=99, rejected=True,
                  verified_len=21, target_forwards=5, verify_s=0.012, echo_sent_at=1.5),
        M.Verdict(session_id=3, epoch=2, start_pos=17, end_pos=17, accepted=0, token=7, rejected=False,
                  verified_len=18, finished=True, settled=M.SETTLED_VOID, target_forwards=1),
        M.CloseSession(session_id=3),
        M.StreamRequest(session_id=3, epoch=1, first_pos=5, budget=64, sent_at=2.5),
        M.TreeRequest(session_id=3, epoch=1, first_pos=5, tokens=np.array([4, 9, 1], np.int32),
                      parents=np.array([-1, -1, 0], np.int32), q_rows=np.array([-1, 0], np.int32), q_ids=qi,
                      q_probs=qp, sent_at=2.5),
        M.TreeRequest(session_id=3, epoch=1, first_pos=5, tokens=toks, parents=np.array([-1, 0], np.int32)),
        M.TreeVerdict(session_id=3, epoch=1, start_pos=5, path=np.array([0, 2], np.int32), token=7, rejected=False,
                      verified_len=8, target_forwards=4, verify_s=0.01, echo_sent_at=2.5),
        M.Error(code=M.E_AUTH, message="nope", session_id=-1),
    ]


def seed_frames() -> list[bytes]:
    """The frames of :func:`sample_messages`."""
    return [codec.encode(m) for m in sample_messages()]


def _expect_protocol_error(fn, *args):
    """``fn(*args)``, or None when it raised ProtocolError; anything else propagates (a finding)."""
    try:
        return fn(*args)
    except codec.ProtocolError:
        return None


def _round_trip(msg) -> None:
    try:
        frame = codec.encode(msg)
    except (ValueError, TypeError) as e:
        raise AssertionError(f"decoded {msg!r} but cannot re-encode it: {e}") from None
    again = codec.decode_frame(frame)  # must not raise: the encoder wrote it
    if codec.encode(again) != frame:
        raise AssertionError(f"round trip changed the message: {msg!r} -> {again!r}")


def check_input(data: bytes) -> None:
    """Check the properties above on one input; raises ``AssertionError`` (or the stray error)."""
    if not data:
        return
    reader = codec.FrameReader(max_frame_bytes=1 << 16)
    cut = data[0] % (len(data) + 1)
    msgs = _expect_protocol_error(lambda: reader.feed(data[:cut]) + reader.feed(data[cut:])) or []
    whole = _expect_protocol_error(codec.decode_frame, data)
    body = _expect_protocol_error(codec.decode, data[1:], data[0])
    for m in [*msgs, whole, body]:
        if m is not None:
            _round_trip(m)


def _instrument_codec() -> None:
    """Coverage for the codec's own code, the encoders and decoders generated from its schemas
    included. ``atheris.instrument_imports`` cannot do it: running ``-m
    pipesd.transport.fuzz_decoder`` imports the package, hence the codec, first."""
    import inspect

    seen = set()
    funcs = [*vars(codec).values(), *codec._DECODERS.values(), *codec._ENCODERS.values()]
    for cls in (codec._Reader, codec.FrameReader):
        funcs += list(vars(cls).values())
    for f in funcs:
        f = getattr(f, "fget", f)
        if inspect.isfunction(f) and f.__module__ == codec.__name__ and id(f) not in seen:
            seen.add(id(f))
            atheris.instrument_func(f)


def main(argv: list[str] | None = None) -> None:
    if atheris is None:
        raise SystemExit("pipesd: the fuzz target needs atheris: pip install 'pipesd[fuzz]' (or pip install atheris)")
    argv = list(sys.argv if argv is None else argv)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus given: start from the seed frames
        seeds = tempfile.mkdtemp(prefix="pipesd-fuzz-")
        for i, frame in enumerate(seed_frames()):
            with open(os.path.join(seeds, f"seed-{i}"), "wb") as f:
                f.write(frame)
        argv.append(seeds)
    np.seterr(all="ignore")  # NaN in a probability array is the decoder's to refuse, not numpy's to warn about
    _instrument_codec()
    atheris.Setup(argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
