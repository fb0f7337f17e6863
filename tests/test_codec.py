"""Wire codec: round trips of every message (hypothesis), incremental parsing, hostile input."""
from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipesd.transport import codec
from pipesd.transport import messages as M
from pipesd.transport.fuzz_decoder import sample_messages
from pipesd.transport.codec import (FrameReader, ProtocolError, check_token_ids, decode, decode_frame, decode_payload,
                                    encode)

U32 = st.integers(0, 2**32 - 1)
FIN = st.floats(allow_nan=False, allow_infinity=False)
UNIT = st.floats(0.0, 1.0)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def text(limit):
    return st.text(max_size=limit // 4 + 8).filter(lambda s: len(s.encode()) <= limit)


def i32_array(max_n=40):
    return st.lists(st.integers(0, 2**31 - 1), max_size=max_n).map(lambda xs: np.array(xs, dtype=np.int32))


@st.composite
def q_dist(draw, n, dense=False):
    """[n, k] ids and probabilities whose rows sum to 1 (zeros allowed: padding)."""
    k = draw(st.integers(1, 9))
    w = np.array(draw(st.lists(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k), min_size=n, max_size=n)),
                 dtype=np.float64).reshape(n, k)
    w[:, 0] += 1e-3  # no all-zero row
    probs = (w / w.sum(1, keepdims=True)).astype(np.float32)
    if dense:
        return np.broadcast_to(np.arange(k, dtype=np.int32), (n, k)), probs
    ids = np.array(draw(st.lists(st.integers(0, 2**31 - 1), min_size=n * k, max_size=n * k)), np.int32).reshape(n, k)
    return ids, probs


hellos = st.builds(M.Hello, version=st.integers(0, 65535), auth_token=text(codec.MAX_AUTH_BYTES),
                   client_name=text(codec.MAX_NAME_BYTES))
hello_acks = st.builds(M.HelloAck, version=st.integers(0, 65535), server_name=text(codec.MAX_NAME_BYTES),
                       vocab_size=U32, tokenizer_fingerprint=text(codec.MAX_NAME_BYTES), max_sessions=U32,
                       max_prompt_tokens=U32, max_draft_in_flight=U32)
opens = st.builds(M.OpenSession, session_id=U32, prompt_ids=i32_array(), temperature=st.floats(0.0, 1e6),
                  top_k=st.integers(0, 2**31 - 1), top_p=UNIT, min_p=UNIT, seed=st.integers(0, 2**64 - 1),
                  tokenizer_fingerprint=text(codec.MAX_NAME_BYTES), max_new_tokens=U32)
openeds = st.builds(M.SessionOpened, session_id=U32)
closes = st.builds(M.CloseSession, session_id=U32)
streams = st.builds(M.StreamRequest, session_id=U32, epoch=U32, first_pos=U32, budget=st.integers(1, 2**32 - 1),
                    sent_at=FIN)
errors = st.builds(M.Error, code=st.integers(0, 65535), message=text(codec.MAX_MESSAGE_BYTES),
                   session_id=st.integers(-1, 2**63 - 1))


@st.composite
def drafts(draw):
    n = draw(st.integers(0, 12))
    toks = np.array(draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)), np.int32)
    probs = np.array(draw(st.lists(UNIT, min_size=n, max_size=n)), np.float32)
    hint = n > 0 and draw(st.booleans())
    q = draw(st.sampled_from(["none", "topk", "dense"]))
    qi = qp = None
    if q != "none":
        qi, qp = draw(q_dist(n - hint, dense=(q == "dense")))
    return M.DraftBatch(session_id=draw(U32), epoch=draw(U32), first_pos=draw(U32), tokens=toks, probs=probs,
                        verify=draw(st.booleans()), hint=hint, q_ids=qi, q_probs=qp, sent_at=draw(FIN))


@st.composite
def verdicts(draw):
    start = draw(st.integers(0, 2**31))
    length = draw(st.integers(0, 1000))
    rejected = length > 0 and draw(st.booleans())
    acc = draw(st.integers(0, length - 1 if rejected else length))
    token = draw(st.integers(0, 2**31 - 1)) if rejected else draw(st.integers(-1, 2**31 - 1))
    bonus = not rejected and token >= 0 and acc == length
    settled = draw(st.sampled_from([M.SETTLED_NONE, M.SETTLED_KEPT, M.SETTLED_VOID])) if bonus else M.SETTLED_NONE
    return M.Verdict(session_id=draw(U32), epoch=draw(U32), start_pos=start, end_pos=start + length, accepted=acc,
                     token=token, rejected=rejected, verified_len=draw(U32), finished=draw(st.booleans()),
                     settled=settled, target_forwards=draw(U32), verify_s=draw(st.floats(0.0, 1e9)),
                     echo_sent_at=draw(FIN))


@st.composite
def trees(draw):
    n = draw(st.integers(1, codec.MAX_TREE_NODES))
    toks = np.array(draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)), np.int32)
    par = np.array([draw(st.integers(-1, i - 1)) for i in range(n)], np.int32)
    rows = qi = qp = None
    if draw(st.booleans()):
        rows = np.array(sorted({int(p) for p in par}), np.int32)
        qi, qp = draw(q_dist(len(rows)))
    return M.TreeRequest(session_id=draw(U32), epoch=draw(U32), first_pos=draw(U32), tokens=toks, parents=par,
                         q_rows=rows, q_ids=qi, q_probs=qp, sent_at=draw(FIN))


@st.composite
def tree_verdicts(draw):
    rejected = draw(st.booleans())
    token = draw(st.integers(0, 2**31 - 1)) if rejected else draw(st.integers(-1, 2**31 - 1))
    start = draw(st.integers(0, 2**31))
    return M.TreeVerdict(session_id=draw(U32), epoch=draw(U32), start_pos=start,
                         path=draw(i32_array(16)),
                         token=token, rejected=rejected, verified_len=start + draw(st.integers(0, 100)),
                         finished=draw(st.booleans()), target_forwards=draw(U32), verify_s=draw(st.floats(0.0, 1e9)),
                         echo_sent_at=draw(FIN))


any_message = st.one_of(hellos, hello_acks, opens, openeds, drafts(), verdicts(), closes, streams, trees(),
                        tree_verdicts(), errors)


def assert_same(a, b):
    assert type(a) is type(b)
    for k, v in a.__dict__.items():
        w = b.__dict__[k]
        if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
            assert v is not None and w is not None, k
            np.testing.assert_array_equal(np.asarray(v), np.asarray(w), err_msg=k)
        else:
            assert v == w, k


def fixed_samples():
    return sample_messages()  # one of every type, the q, hint and empty DraftBatch variants, two Verdicts


def sample(cls, i=0):
    return [m for m in fixed_samples() if type(m) is cls][i]


# --------------------------------------------------------------------------- round trips
@SETTINGS
@given(msg=any_message)
def test_round_trip_every_message_type(msg):
    frame = encode(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert_same(msg, decode_frame(frame))
    assert_same(msg, decode(frame[5:], frame[4]))
    assert_same(msg, decode_payload(frame[4:]))


@pytest.mark.parametrize("msg", fixed_samples(), ids=lambda m: type(m).__name__)
def test_round_trip_fixed(msg):
    assert_same(msg, decode_frame(encode(msg)))


def test_frame_header_and_type_tags():
    tags = {M.Hello: M.T_HELLO, M.HelloAck: M.T_HELLO_ACK, M.OpenSession: M.T_OPEN, M.SessionOpened: M.T_OPENED,
            M.DraftBatch: M.T_DRAFT, M.Verdict: M.T_VERDICT, M.CloseSession: M.T_CLOSE, M.Error: M.T_ERROR,
            M.StreamRequest: M.T_STREAM, M.TreeRequest: M.T_TREE, M.TreeVerdict: M.T_TREE_VERDICT}
    assert {type(m) for m in fixed_samples()} == set(tags) == set(codec.SCHEMAS)
    for msg in fixed_samples():
        assert encode(msg)[4] == tags[type(msg)] == codec.SCHEMAS[type(msg)].tag
    assert encode(M.SessionOpened(session_id=7)) == b"\x00\x00\x00\x05\x04\x07\x00\x00\x00"
    assert len(encode(sample(M.Verdict))) == codec.FRAME_OVERHEAD + 50  # Verdict: fixed size


def test_messages_are_keyword_only():
    with pytest.raises(TypeError):
        M.SessionOpened(7)
    with pytest.raises(TypeError):
        M.Verdict(3, 2, 17, 22, 3, 99, True, 21)


def test_dense_q_halves_the_bytes_and_decodes_as_arange():
    n, V = 3, 1000
    p = np.full((n, V), 1.0 / V, np.float32)
    base = dict(session_id=1, epoch=0, first_pos=0, tokens=np.arange(n, dtype=np.int32), probs=np.ones(n, np.float32))
    dense = M.DraftBatch(**base, q_ids=np.broadcast_to(np.arange(V, dtype=np.int32), (n, V)), q_probs=p)
    explicit = M.DraftBatch(**base, q_ids=np.tile(np.arange(V, dtype=np.int32)[::-1], (n, 1)), q_probs=p)
    assert len(encode(dense)) == codec.FRAME_OVERHEAD + 32 - 1 + 8 * n + 4 * n * V
    assert len(encode(explicit)) == codec.FRAME_OVERHEAD + 32 - 1 + 8 * n + 8 * n * V
    got = decode_frame(encode(dense))
    np.testing.assert_array_equal(got.q_ids, np.broadcast_to(np.arange(V), (n, V)))
    assert got.q_ids.dtype == np.int32


def test_arrays_are_aligned_zero_copy_views():
    msg = sample(M.DraftBatch)  # with a top-k q
    payload = bytearray(encode(msg)[4:])  # what a reader holds: type byte + body, fresh buffer
    got = decode_payload(payload)
    for a in (got.tokens, got.probs, got.q_ids, got.q_probs):
        assert a.ctypes.data % 4 == 0
    payload[32] = 42  # first token, little-endian low byte (type byte + 31-byte header)
    assert got.tokens[0] == 42  # a view of the buffer, not a copy
    op = decode_payload(bytearray(encode(sample(M.OpenSession))[4:]))
    assert op.prompt_ids.ctypes.data % 4 == 0


@SETTINGS
@given(msgs=st.lists(any_message, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 5000), max_size=12))
def test_frame_reader_random_chunking(msgs, cuts):
    blob = b"".join(encode(m) for m in msgs)
    bounds = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
    r, out = FrameReader(), []
    for a, b in zip(bounds, bounds[1:]):
        out += r.feed(blob[a:b])
    assert r.buffered == 0
    assert len(out) == len(msgs)
    for a, b in zip(msgs, out):
        assert_same(a, b)


def test_frame_reader_byte_by_byte_and_partial():
    msgs = fixed_samples()
    blob = b"".join(encode(m) for m in msgs)
    r, out = FrameReader(), []
    for i in range(len(blob) - 3):
        out += r.feed(blob[i: i + 1])
    assert len(out) == len(msgs) - 1 and r.buffered == len(encode(msgs[-1])) - 3
    out += r.feed(memoryview(blob)[len(blob) - 3:])
    assert len(out) == len(msgs)


def test_frame_reader_returns_good_messages_before_a_bad_frame_then_raises():
    good = encode(M.SessionOpened(session_id=1)) + encode(M.CloseSession(session_id=2))
    bad = b"\x00\x00\x00\x02\x63\x00"  # unknown type 0x63
    r = FrameReader()
    out = r.feed(good + bad)
    assert [type(m) for m in out] == [M.SessionOpened, M.CloseSession]
    with pytest.raises(ProtocolError, match="unknown message type"):
        r.feed(b"")
    with pytest.raises(ProtocolError):  # stays broken: the stream is out of sync
        r.feed(encode(M.SessionOpened(session_id=3)))


# --------------------------------------------------------------------------- hostile input
def only_protocol_errors(fn, *args):
    try:
        fn(*args)
    except ProtocolError as e:
        assert e.code in (M.E_BAD_FRAME, M.E_BAD_FIELD, M.E_LIMIT), e.code
        return e
    return None


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400), chunk=st.integers(1, 64))
def test_random_bytes_only_raise_protocol_errors(data, chunk):
    r = FrameReader(max_frame_bytes=1 << 16)

    def feed_all():
        for i in range(0, len(data), chunk):
            r.feed(data[i: i + chunk])

    only_protocol_errors(feed_all)
    only_protocol_errors(decode_frame, data)


@settings(max_examples=500, deadline=None)
@given(tag=st.integers(0, 255), body=st.binary(max_size=300))
def test_random_bodies_for_every_tag(tag, body):
    only_protocol_errors(decode, body, tag)


@settings(max_examples=600, deadline=None)
@given(idx=st.integers(0, len(fixed_samples()) - 1),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(0, 10_000), extra=st.binary(min_size=1, max_size=9))
def test_mutated_truncated_and_extended_frames(idx, edits, cut, extra):
    frame = bytearray(encode(fixed_samples()[idx]))
    mutated = bytearray(frame)
    for pos, val in edits:
        mutated[pos % len(frame)] = val
    only_protocol_errors(decode_frame, bytes(mutated))
    only_protocol_errors(FrameReader().feed, bytes(mutated))
    # truncated: the frame is refused (decode_frame) or incomplete (FrameReader)
    assert only_protocol_errors(decode_frame, bytes(frame[: cut % len(frame)])) is not None
    r = FrameReader()
    assert r.feed(bytes(frame[: cut % len(frame)])) == []
    # extended body with a consistent length: trailing bytes are refused
    ext = bytearray(frame) + extra
    ext[:4] = struct.pack(">I", len(ext) - 4)
    assert only_protocol_errors(decode_frame, bytes(ext)) is not None


@pytest.mark.parametrize("length", [2**32 - 1, 2**31, (8 << 20) + 1])
def test_huge_declared_length_refused_before_allocation(length):
    tracemalloc.start()
    try:
        r = FrameReader()
        with pytest.raises(ProtocolError) as e:
            r.feed(struct.pack(">I", length) + b"\x05")
        assert e.value.code == M.E_LIMIT
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("field", ["n", "k", "both"])
def test_huge_array_counts_refused_without_allocation(field):
    n, k = (2**32 - 1, 0) if field == "n" else ((1, 2**20) if field == "k" else (2**32 - 1, 2**20))
    flags = codec.F_HAS_Q | codec.F_Q_DENSE if field != "n" else 0
    body = codec.SCHEMAS[M.DraftBatch].head.pack(1, 0, 0, flags, 0.0, n, k) + b"\0" * 64  # padding included
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode(body, M.T_DRAFT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_zero_length_and_short_frames():
    with pytest.raises(ProtocolError, match="empty"):
        FrameReader().feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        decode_frame(b"\x00\x00\x00")
    with pytest.raises(ProtocolError):
        decode_payload(b"")


# --------------------------------------------------------------------------- validation rules
def _draft_frame(tokens=(1, 2), probs=(0.5, 0.5), q=True, qp=None, flags_or=0):
    qi = np.array([[1, 2], [3, 4]], np.int32)
    qp = np.array([[0.5, 0.5], [0.9, 0.1]], np.float32) if qp is None else np.asarray(qp, np.float32)
    msg = M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.asarray(tokens, np.int32),
                       probs=np.asarray(probs, np.float32), verify=True, q_ids=qi if q else None,
                       q_probs=qp if q else None)
    f = bytearray(encode(msg))
    f[5 + 12] |= flags_or
    return bytes(f)


def _with_array_value(frame: bytes, offset: int, fmt: str, value) -> bytes:
    f = bytearray(frame)
    struct.pack_into(fmt, f, offset, value)
    return bytes(f)


TOK0 = 4 + 1 + 31  # first token in a draft frame
PROB0 = TOK0 + 8  # first prob (n=2)
QID0 = PROB0 + 8
QP0 = QID0 + 16


@pytest.mark.parametrize("case,frame,code", [
    ("nan prob", lambda: _with_array_value(_draft_frame(), PROB0, "<f", float("nan")), M.E_BAD_FIELD),
    ("inf prob", lambda: _with_array_value(_draft_frame(), PROB0, "<f", float("inf")), M.E_BAD_FIELD),
    ("negative prob", lambda: _draft_frame(probs=(-0.1, 0.5)), M.E_BAD_FIELD),
    ("prob above 1", lambda: _draft_frame(probs=(1.01, 0.5)), M.E_BAD_FIELD),
    ("negative token", lambda: _draft_frame(tokens=(-4, 1)), M.E_BAD_FIELD),
    ("q row sum", lambda: _draft_frame(qp=[[0.5, 0.5], [0.9, 0.9]]), M.E_BAD_FIELD),
    ("q row sum low", lambda: _draft_frame(qp=[[0.5, 0.49], [0.9, 0.1]]), M.E_BAD_FIELD),
    ("negative q prob", lambda: _draft_frame(qp=[[1.5, -0.5], [0.9, 0.1]]), M.E_BAD_FIELD),
    ("nan q prob", lambda: _with_array_value(_draft_frame(), QP0, "<f", float("nan")), M.E_BAD_FIELD),
    ("negative q id", lambda: _with_array_value(_draft_frame(), QID0, "<i", -1), M.E_BAD_FIELD),
    ("unknown draft flag", lambda: _draft_frame(flags_or=0x80), M.E_BAD_FIELD),
    ("bonus flag (protocol 2)", lambda: _draft_frame(flags_or=2), M.E_BAD_FIELD),
    ("dense flag without q", lambda: _draft_frame(q=False, flags_or=codec.F_Q_DENSE), M.E_BAD_FIELD),
    ("q width without q", lambda: _with_array_value(_draft_frame(q=False), 5 + 25, "<I", 3), M.E_BAD_FIELD),
    ("nan sent_at", lambda: _with_array_value(_draft_frame(), 5 + 13, "<d", float("nan")), M.E_BAD_FIELD),
    ("non-zero padding", lambda: _with_array_value(_draft_frame(), 5 + 29, "<B", 1), M.E_BAD_FRAME),
])
def test_field_rules(case, frame, code):
    with pytest.raises(ProtocolError) as e:
        decode_frame(frame())
    assert e.value.code == code, case


def _hello_frame(token: bytes) -> bytes:
    body = codec.SCHEMAS[M.Hello].head.pack(1) + struct.pack("<H", len(token)) + token + b"\x00\x00"
    return struct.pack(">I", len(body) + 1) + bytes([M.T_HELLO]) + body


def test_string_rules():
    assert decode_frame(_hello_frame(b"a" * 256)).auth_token == "a" * 256
    with pytest.raises(ProtocolError, match="at most 256") as e:
        decode_frame(_hello_frame(b"a" * 257))
    assert e.value.code == M.E_BAD_FIELD
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_frame(_hello_frame(b"\xff\xfe"))


def _open_frame(**kw):
    base = dict(session_id=1, prompt_ids=np.array([1, 2], np.int32), temperature=0.5, top_k=0, top_p=1.0, min_p=0.0)
    base.update(kw)
    return encode(M.OpenSession(**base))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=float("inf")), dict(top_k=-1),
                                dict(top_p=1.5), dict(top_p=float("nan")), dict(min_p=-0.1),
                                dict(prompt_ids=np.array([-3], np.int32))])
def test_open_session_rules(kw):
    with pytest.raises(ProtocolError) as e:
        decode_frame(_open_frame(**kw))
    assert e.value.code == M.E_BAD_FIELD


def test_prompt_length_limit():
    body = codec.SCHEMAS[M.OpenSession].head.pack(1, 0.0, 0, 1.0, 0.0, 0, 1, (1 << 20) + 1)
    with pytest.raises(ProtocolError) as e:
        decode(body, M.T_OPEN)
    assert e.value.code == M.E_LIMIT


@pytest.mark.parametrize("fields", [
    dict(start_pos=10, end_pos=5),  # end before start
    dict(accepted=6),  # more accepted than the segment
    dict(token=-2),
    dict(rejected=True, token=-1),  # rejection without a correction
    dict(rejected=True, accepted=5),  # rejection with everything accepted
    dict(settled=3),  # unknown settled code
    dict(settled=M.SETTLED_KEPT),  # settled without a full acceptance
    dict(settled=M.SETTLED_KEPT, accepted=5, token=-1),  # settled without a bonus
    dict(settled=M.SETTLED_VOID, accepted=4, rejected=True),  # settled after a rejection
    dict(verify_s=-1.0),
    dict(echo_sent_at=float("nan")),
])
def test_verdict_rules(fields):
    base = dict(session_id=1, epoch=0, start_pos=0, end_pos=5, accepted=2, token=3, rejected=False,
                verified_len=3)
    base.update(fields)
    with pytest.raises(ProtocolError) as e:
        decode_frame(encode(M.Verdict(**base)))
    assert e.value.code == M.E_BAD_FIELD


def test_error_session_id_and_message_cut_at_a_character_boundary():
    long = "€" * 5000  # 3 bytes each
    got = decode_frame(encode(M.Error(code=M.E_INTERNAL, message=long, session_id=4)))
    assert got.message == "€" * (codec.MAX_MESSAGE_BYTES // 3) and got.session_id == 4
    body = codec.SCHEMAS[M.Error].head.pack(1, -2) + b"\x00\x00"
    with pytest.raises(ProtocolError):
        decode(body, M.T_ERROR)


_DRAFT0 = dict(session_id=1, epoch=0, first_pos=0)


@pytest.mark.parametrize("msg,exc", [
    (M.SessionOpened(session_id=-1), ValueError),
    (M.SessionOpened(session_id=2**32), ValueError),
    (M.Hello(version=1, auth_token="x" * 257), ValueError),
    (M.HelloAck(version=1, server_name="s" * 300, vocab_size=1, tokenizer_fingerprint="", max_sessions=1,
                max_prompt_tokens=1, max_draft_in_flight=1), ValueError),
    (M.DraftBatch(**_DRAFT0, tokens=np.array([1, 2], np.int32), probs=np.array([0.5], np.float32)), ValueError),
    (M.DraftBatch(**_DRAFT0, tokens=np.array([1], np.int32), probs=np.array([0.5], np.float32),
                  q_ids=np.array([[1]], np.int32)), ValueError),
    (M.DraftBatch(**_DRAFT0, tokens=np.array([1], np.int32), probs=np.array([0.5], np.float32),
                  q_ids=np.array([[1]], np.int32), q_probs=np.array([1.0], np.float32)), ValueError),  # q_probs 1-D
    (M.DraftBatch(**_DRAFT0, tokens=np.array([1.5]), probs=np.array([0.5], np.float32)), TypeError),
    (M.DraftBatch(**_DRAFT0, tokens=np.zeros(0, np.int32), probs=np.zeros(0, np.float32), hint=True), ValueError),
    (M.OpenSession(session_id=1, prompt_ids=np.zeros(codec.MAX_PROMPT_TOKENS + 1, np.int32)), ValueError),
    (M.Verdict(session_id=1, epoch=0, start_pos=0, end_pos=1, accepted=1, token=-1, rejected=False,
               verified_len=-5), ValueError),
    ("not a message", TypeError),
])
def test_encode_refuses_unrepresentable_messages(msg, exc):
    with pytest.raises(exc):
        encode(msg)


def test_check_token_ids():
    check_token_ids(np.array([0, 5, 9]), 10, "draft token ids")
    check_token_ids(np.zeros(0, np.int32), 10, "draft token ids")
    for bad in ([10], [-1], [3, 11]):
        with pytest.raises(ProtocolError) as e:
            check_token_ids(np.array(bad), 10, "draft token ids")
        assert e.value.code == M.E_BAD_FIELD and str(e.value) == "draft token ids outside [0, 10)"


# --------------------------------------------------------------------------- schema and docs
WIRE_MD = Path(__file__).resolve().parents[1] / "docs" / "wire.md"


def test_wire_doc_tables_match_the_schema():
    text = WIRE_MD.read_text(encoding="utf-8")
    assert codec.render_wire_doc(text) == text, (
        "docs/wire.md's message tables differ from codec.SCHEMAS; regenerate them with "
        "python -c 'from pipesd.transport import codec; codec.write_wire_doc(\"docs/wire.md\")'")


def test_wire_doc_needs_a_block_per_message_and_follows_the_schema(monkeypatch):
    text = WIRE_MD.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="no wire block for Verdict"):
        codec.render_wire_doc(text.replace("<!-- wire:Verdict", "<!-- gone:Verdict"))
    s = codec.SCHEMAS[M.Verdict]
    monkeypatch.setattr(s, "fields", s.fields[:-1])  # a schema change shows in the rendered doc
    assert codec.render_wire_doc(text) != text
    assert "| 0 | u32 | session_id |" in codec.schema_markdown(s)


def test_schema_covers_every_dataclass_field():
    for cls, s in codec.SCHEMAS.items():
        named = {f.name for f in s.fields if hasattr(f, "name")}
        named |= {n for f in s.fields if isinstance(f, codec.Flags) for _, n in f.bits}
        assert {f.name for f in dataclasses.fields(cls)} <= named, cls.__name__
        assert s.tag in (M.T_HELLO, M.T_HELLO_ACK, M.T_OPEN, M.T_OPENED, M.T_DRAFT, M.T_VERDICT, M.T_CLOSE, M.T_ERROR,
                         M.T_STREAM, M.T_TREE, M.T_TREE_VERDICT)
    bad = codec.Schema(M.SessionOpened, 99, "nobody", (codec.Scalar("sid", "u32"),))
    with pytest.raises(TypeError, match="do not cover"):
        codec._validate(bad)


def test_protocol_error_is_a_value_error_and_pickles():
    import pickle

    e = ProtocolError(M.E_AUTH, "nope")
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.code == M.E_AUTH and str(e2) == "nope"
