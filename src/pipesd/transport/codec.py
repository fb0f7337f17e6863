"""Binary frames for the messages in :mod:`pipesd.transport.messages`.

Frame: ``u32 length (big-endian) | u8 type | body``; ``length`` counts type + body. Bodies are
little-endian fixed headers (``struct``), then raw ``int32``/``float32`` arrays, then
length-prefixed UTF-8 strings. Hand-written rather than pickle (unsafe) or msgpack (a
dependency, and arrays would be copied): arrays decode zero-copy with ``np.frombuffer``, and
every field is validated here before anything else sees it. Malformed input raises
:class:`ProtocolError` and nothing else; a declared length above ``max_frame_bytes`` is
refused before any buffer is allocated. Layouts: ``docs/wire.md``.
"""
from __future__ import annotations

import math
import struct
from typing import Optional

import numpy as np

from pipesd.transport import messages as M

__all__ = ["ProtocolError", "encode", "decode", "decode_frame", "FrameReader", "encoded_size",
           "validate_tokens", "MAX_FRAME_BYTES", "HEADER"]

MAX_FRAME_BYTES = 8 << 20
HEADER = struct.Struct(">I")
MAX_STR = {"auth": 256, "name": 256, "fingerprint": 128, "message": 4096}
MAX_PROMPT = 1 << 20
MAX_Q_WIDTH = 1 << 20

_HELLO = struct.Struct("<H")
_HELLO_ACK = struct.Struct("<HIIII")
_OPEN = struct.Struct("<IfifdQI")  # sid, temperature, top_k, top_p, min_p(as double), seed, max_new
_U32 = struct.Struct("<I")
_DRAFT = struct.Struct("<IIIBdII")  # sid, epoch, first_pos, flags, sent_at, n, k
_VERDICT = struct.Struct("<IIIIIiBIIdd")
_ERROR = struct.Struct("<Hq")
_STR = struct.Struct("<H")

F_VERIFY, F_BONUS, F_HAS_Q = 1, 2, 4
F_REJECTED, F_FINISHED = 1, 2


class ProtocolError(ValueError):
    """A frame or a field that breaks the protocol; ``code`` is one of ``messages.E_*``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _bad(msg: str, code: int = M.E_BAD_FRAME) -> ProtocolError:
    return ProtocolError(code, msg)


def _pack_str(s: str, limit: int, what: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > limit:
        raise ValueError(f"{what} is {len(b)} bytes; at most {limit}")
    return _STR.pack(len(b)) + b


class _Reader:
    __slots__ = ("buf", "off")

    def __init__(self, buf) -> None:
        self.buf = memoryview(buf)
        self.off = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.off + n > len(self.buf):
            raise _bad("truncated frame body")
        v = self.buf[self.off: self.off + n]
        self.off += n
        return v

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def string(self, limit: int, what: str) -> str:
        (n,) = self.unpack(_STR)
        if n > limit:
            raise _bad(f"{what} is {n} bytes; at most {limit}", M.E_BAD_FIELD)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"{what} is not valid UTF-8", M.E_BAD_FIELD) from None

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if count < 0 or self.off + size > len(self.buf):
            raise _bad(f"{what}: {count} items do not fit the frame")
        return np.frombuffer(self.take(size), dtype=dtype, count=count)

    def end(self) -> None:
        if self.off != len(self.buf):
            raise _bad(f"{len(self.buf) - self.off} unexpected trailing bytes")


def _arr(a, dtype, what: str) -> np.ndarray:
    x = np.ascontiguousarray(a, dtype=dtype)
    return x


# ----------------------------------------------------------------------------- encode
def _body(msg) -> tuple[int, bytes]:
    if isinstance(msg, M.DraftBatch):
        toks = _arr(msg.tokens, "<i4", "tokens").reshape(-1)
        probs = _arr(msg.probs, "<f4", "probs").reshape(-1)
        n = len(toks)
        if len(probs) != n:
            raise ValueError("tokens and probs differ in length")
        flags = (F_VERIFY if msg.verify else 0) | (F_BONUS if msg.bonus else 0)
        parts = []
        k = 0
        if msg.q_ids is not None:
            qi = _arr(msg.q_ids, "<i4", "q_ids")
            qp = _arr(msg.q_probs, "<f4", "q_probs")
            if qi.ndim != 2 or qi.shape != qp.shape or qi.shape[0] != n:
                raise ValueError(f"q_ids/q_probs must both be [n, k] with n={n}")
            k = qi.shape[1]
            flags |= F_HAS_Q
            parts = [qi.tobytes(), qp.tobytes()]
        head = _DRAFT.pack(msg.session_id, msg.epoch, msg.first_pos, flags, float(msg.sent_at), n, k)
        return M.T_DRAFT, b"".join([head, toks.tobytes(), probs.tobytes(), *parts])
    if isinstance(msg, M.Verdict):
        flags = (F_REJECTED if msg.rejected else 0) | (F_FINISHED if msg.finished else 0)
        return M.T_VERDICT, _VERDICT.pack(msg.session_id, msg.epoch, msg.start_pos, msg.end_pos, msg.accepted,
                                          msg.correction, flags, msg.verified_len, msg.target_forwards,
                                          float(msg.verify_s), float(msg.echo_sent_at))
    if isinstance(msg, M.Hello):
        return M.T_HELLO, _HELLO.pack(msg.version) + _pack_str(msg.auth_token, MAX_STR["auth"], "auth_token") + \
            _pack_str(msg.client_name, MAX_STR["name"], "client_name")
    if isinstance(msg, M.HelloAck):
        return M.T_HELLO_ACK, _HELLO_ACK.pack(msg.version, msg.vocab_size, msg.max_sessions, msg.max_prompt_tokens,
                                              msg.max_draft_in_flight) + \
            _pack_str(msg.server_name, MAX_STR["name"], "server_name") + \
            _pack_str(msg.tokenizer_fingerprint, MAX_STR["fingerprint"], "tokenizer_fingerprint")
    if isinstance(msg, M.OpenSession):
        ids = _arr(msg.prompt_ids, "<i4", "prompt_ids").reshape(-1)
        return M.T_OPEN, _OPEN.pack(msg.session_id, msg.temperature, msg.top_k, msg.top_p, msg.min_p, msg.seed,
                                    msg.max_new_tokens) + \
            _pack_str(msg.tokenizer_fingerprint, MAX_STR["fingerprint"], "tokenizer_fingerprint") + \
            _U32.pack(len(ids)) + ids.tobytes()
    if isinstance(msg, M.SessionOpened):
        return M.T_OPENED, _U32.pack(msg.session_id)
    if isinstance(msg, M.CloseSession):
        return M.T_CLOSE, _U32.pack(msg.session_id)
    if isinstance(msg, M.Error):
        return M.T_ERROR, _ERROR.pack(msg.code, msg.session_id) + _pack_str(msg.message[:1000], MAX_STR["message"], "message")
    raise TypeError(f"not a PipeSD message: {type(msg).__name__}")


def encode(msg) -> bytes:
    """The whole frame (length prefix included)."""
    tag, body = _body(msg)
    return HEADER.pack(len(body) + 1) + bytes((tag,)) + body


def encoded_size(msg) -> int:
    """Bytes ``msg`` takes on the wire (for emulation and statistics)."""
    if isinstance(msg, M.DraftBatch):
        n = len(msg.tokens)
        k = 0 if msg.q_ids is None else int(np.shape(msg.q_ids)[1])
        return HEADER.size + 1 + _DRAFT.size + 8 * n + 8 * n * k
    return len(encode(msg))


# ----------------------------------------------------------------------------- decode
def _finite_unit(a: np.ndarray, what: str) -> None:
    if a.size and (not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0 + 1e-6):
        raise _bad(f"{what} must be finite probabilities in [0, 1]", M.E_BAD_FIELD)


def decode(tag: int, body) -> object:
    """Decode one frame body of type ``tag``; raises :class:`ProtocolError` on anything wrong."""
    r = _Reader(body)
    try:
        if tag == M.T_DRAFT:
            sid, epoch, first, flags, sent_at, n, k = r.unpack(_DRAFT)
            if flags & ~(F_VERIFY | F_BONUS | F_HAS_Q):
                raise _bad(f"unknown draft flags {flags:#x}", M.E_BAD_FIELD)
            if not math.isfinite(sent_at):
                raise _bad("sent_at is not finite", M.E_BAD_FIELD)
            toks = r.array("<i4", n, "tokens")
            probs = r.array("<f4", n, "probs")
            _finite_unit(probs, "probs")
            if toks.size and toks.min() < 0:
                raise _bad("negative token id", M.E_BAD_FIELD)
            qi = qp = None
            if flags & F_HAS_Q:
                if not (1 <= k <= MAX_Q_WIDTH) or n * k > MAX_FRAME_BYTES:
                    raise _bad(f"q width {k} out of range", M.E_BAD_FIELD)
                qi = r.array("<i4", n * k, "q_ids").reshape(n, k)
                qp = r.array("<f4", n * k, "q_probs").reshape(n, k)
                _finite_unit(qp, "q_probs")
                if n and (np.abs(qp.sum(1) - 1.0) > 1e-3).any():
                    raise _bad("each q row must sum to 1", M.E_BAD_FIELD)
                if qi.size and qi.min() < 0:
                    raise _bad("negative q id", M.E_BAD_FIELD)
            elif k:
                raise _bad("q width given without q", M.E_BAD_FIELD)
            r.end()
            return M.DraftBatch(sid, epoch, first, toks, probs, bool(flags & F_VERIFY), bool(flags & F_BONUS), qi, qp,
                                sent_at)
        if tag == M.T_VERDICT:
            (sid, epoch, start, end, acc, corr, flags, vlen, fw, vs, echo) = r.unpack(_VERDICT)
            r.end()
            if end < start or acc > end - start or corr < -1 or not math.isfinite(vs) or not math.isfinite(echo):
                raise _bad("inconsistent verdict fields", M.E_BAD_FIELD)
            return M.Verdict(sid, epoch, start, end, acc, corr, bool(flags & F_REJECTED), vlen,
                             bool(flags & F_FINISHED), fw, vs, echo)
        if tag == M.T_HELLO:
            (ver,) = r.unpack(_HELLO)
            tok = r.string(MAX_STR["auth"], "auth_token")
            name = r.string(MAX_STR["name"], "client_name")
            r.end()
            return M.Hello(ver, tok, name)
        if tag == M.T_HELLO_ACK:
            ver, vocab, ms, mp, md = r.unpack(_HELLO_ACK)
            name = r.string(MAX_STR["name"], "server_name")
            fp = r.string(MAX_STR["fingerprint"], "tokenizer_fingerprint")
            r.end()
            return M.HelloAck(ver, name, vocab, fp, ms, mp, md)
        if tag == M.T_OPEN:
            sid, temp, top_k, top_p, min_p, seed, max_new = r.unpack(_OPEN)
            fp = r.string(MAX_STR["fingerprint"], "tokenizer_fingerprint")
            (n,) = r.unpack(_U32)
            if n > MAX_PROMPT:
                raise _bad(f"prompt of {n} tokens; at most {MAX_PROMPT}", M.E_LIMIT)
            ids = r.array("<i4", n, "prompt_ids")
            r.end()
            if not all(math.isfinite(x) for x in (temp, top_p, min_p)):
                raise _bad("sampling parameters must be finite", M.E_BAD_FIELD)
            return M.OpenSession(sid, ids, temp, top_k, top_p, min_p, seed, fp, max_new)
        if tag in (M.T_OPENED, M.T_CLOSE):
            (sid,) = r.unpack(_U32)
            r.end()
            return M.SessionOpened(sid) if tag == M.T_OPENED else M.CloseSession(sid)
        if tag == M.T_ERROR:
            code, sid = r.unpack(_ERROR)
            text = r.string(MAX_STR["message"], "message")
            r.end()
            return M.Error(code, text, sid)
    except struct.error as e:  # pragma: no cover - _Reader.take guards sizes
        raise _bad(f"malformed frame: {e}") from None
    raise _bad(f"unknown message type {tag}")


def decode_frame(buf) -> object:
    """Decode one complete frame (length prefix included)."""
    mv = memoryview(buf)
    if len(mv) < HEADER.size + 1:
        raise _bad("frame shorter than its header")
    (n,) = HEADER.unpack(mv[: HEADER.size])
    if n != len(mv) - HEADER.size:
        raise _bad(f"frame length {n} does not match {len(mv) - HEADER.size} bytes")
    return decode(mv[HEADER.size], mv[HEADER.size + 1:])


def check_length(n: int, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
    if n < 1:
        raise _bad("empty frame")
    if n > max_frame_bytes:
        raise _bad(f"frame of {n} bytes exceeds the limit of {max_frame_bytes}", M.E_LIMIT)


class FrameReader:
    """Incremental parser: ``feed(chunk)`` returns the complete messages so far."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max = max_frame_bytes
        self._buf = bytearray()
        self._need: Optional[int] = None

    def feed(self, chunk: bytes) -> list:
        self._buf += chunk
        out = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    break
                (n,) = HEADER.unpack_from(self._buf)
                check_length(n, self.max)
                self._need = n
                del self._buf[: HEADER.size]
            if len(self._buf) < self._need:
                break
            frame = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._need = None
            out.append(decode(frame[0], memoryview(frame)[1:]))
        return out


def validate_tokens(arr: np.ndarray, vocab_size: int, what: str = "token ids") -> None:
    """Semantic check the server does: ids within the vocabulary."""
    a = np.asarray(arr)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ProtocolError(M.E_BAD_FIELD, f"{what} outside [0, {vocab_size})")
