"""Binary frames for the messages in :mod:`pipesd.transport.messages`.

Frame: ``u32 N (big-endian) | u8 type | body``, where ``N`` counts the type byte and the
body. Bodies are a little-endian fixed header (``struct``), then raw ``int32``/``float32``
arrays, then ``u16``-length-prefixed UTF-8 strings. Arrays start at offsets that are
multiples of 4 counted from the type byte, so a reader that receives the ``N`` bytes after
the prefix into a fresh buffer gets aligned arrays.

Why hand-written rather than pickle or msgpack: pickle executes code from the peer; msgpack
is a dependency and copies arrays into Python objects. Here arrays decode zero-copy
(``np.frombuffer`` views of the received buffer, read-only when the buffer is ``bytes``) and
every field is validated in one place before the runtime sees it. Malformed input raises
:class:`ProtocolError` and nothing else; a declared length above ``max_frame_bytes`` is
refused before anything is allocated for it. Layouts and rules: ``docs/wire.md``.
"""
from __future__ import annotations

import struct
from typing import Optional, Union

import numpy as np

from pipesd.transport import messages as M

__all__ = ["ProtocolError", "encode", "encoded_size", "decode", "decode_payload", "decode_frame", "FrameReader",
           "check_length", "validate_tokens", "MAX_FRAME_BYTES", "HEADER", "FRAME_OVERHEAD", "MAX_AUTH_BYTES",
           "MAX_NAME_BYTES", "MAX_MESSAGE_BYTES", "MAX_PROMPT_TOKENS", "MAX_Q_WIDTH", "PROB_SLACK", "Q_SUM_TOL"]

Buffer = Union[bytes, bytearray, memoryview]

MAX_FRAME_BYTES = 8 << 20
"""Default limit on ``N`` (type byte + body)."""
HEADER = struct.Struct(">I")
"""The length prefix."""
FRAME_OVERHEAD = HEADER.size + 1
"""Bytes every frame spends on the prefix and the type byte."""
MAX_AUTH_BYTES = 256
MAX_NAME_BYTES = 256  # client/server names and tokenizer fingerprints
MAX_MESSAGE_BYTES = 4096
MAX_PROMPT_TOKENS = 1 << 20
MAX_Q_WIDTH = 1 << 20
PROB_SLACK = 1e-6
"""Probabilities may exceed 1 by this much (float32 rounding of a normalisation)."""
Q_SUM_TOL = 1e-3
"""A q row must sum to 1 within this."""

# Fixed headers. Field order is the wire order; see docs/wire.md.
_HELLO = struct.Struct("<H")  # version
_HELLO_ACK = struct.Struct("<HIIII")  # version, vocab, max_sessions, max_prompt, max_draft_in_flight
_OPEN = struct.Struct("<IdiddQII")  # sid, temperature, top_k, top_p, min_p, seed, max_new, n
_OPEN_PAD = 3  # 1 + 48 + 3 = 52: the prompt starts 4-aligned
_DRAFT = struct.Struct("<IIIBdII")  # sid, epoch, first_pos, flags, sent_at, n, k
_DRAFT_PAD = 2  # 1 + 29 + 2 = 32
_VERDICT = struct.Struct("<IIIIIiBIIdd")  # sid, epoch, start, end, accepted, correction, flags, vlen, fwd, verify_s, echo
_U32 = struct.Struct("<I")
_ERROR = struct.Struct("<Hq")  # code, session_id
_STR = struct.Struct("<H")

# DraftBatch flags
F_VERIFY, F_BONUS, F_HAS_Q, F_Q_DENSE, F_HINT = 1, 2, 4, 8, 16
_DRAFT_FLAGS = F_VERIFY | F_BONUS | F_HAS_Q | F_Q_DENSE | F_HINT
# Verdict flags
F_REJECTED, F_FINISHED = 1, 2
_VERDICT_FLAGS = F_REJECTED | F_FINISHED

_TYPE_NAMES = {M.T_HELLO: "Hello", M.T_HELLO_ACK: "HelloAck", M.T_OPEN: "OpenSession", M.T_OPENED: "SessionOpened",
               M.T_DRAFT: "DraftBatch", M.T_VERDICT: "Verdict", M.T_CLOSE: "CloseSession", M.T_ERROR: "Error"}


class ProtocolError(ValueError):
    """A frame or a field that breaks the protocol; ``code`` is one of ``messages.E_*``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep ``code`` through pickling (multiprocessing)
        return (type(self), (self.code, str(self)))


def _bad(msg: str, code: int = M.E_BAD_FRAME) -> ProtocolError:
    return ProtocolError(code, msg)


def _field(msg: str) -> ProtocolError:
    return ProtocolError(M.E_BAD_FIELD, msg)


# ----------------------------------------------------------------------------- encode
def _utf8(s: str, limit: int, what: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, got {type(s).__name__}")
    b = s.encode("utf-8")
    if len(b) > limit:
        raise ValueError(f"{what} is {len(b)} bytes of UTF-8; at most {limit}")
    return b


def _str(b: bytes) -> bytes:
    return _STR.pack(len(b)) + b


def _error_text(text: str) -> bytes:
    """An error message, cut at a character boundary to fit ``MAX_MESSAGE_BYTES`` (always sendable)."""
    b = str(text).encode("utf-8")
    if len(b) > MAX_MESSAGE_BYTES:
        b = b[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return b


def _pack(st: struct.Struct, what: str, *values) -> bytes:
    try:
        return st.pack(*values)
    except (struct.error, TypeError, OverflowError) as e:
        raise ValueError(f"cannot encode {what}: a field is out of range or of the wrong type ({e})") from None


def _i32(a, what: str) -> np.ndarray:
    x = np.asarray(a)
    if x.dtype != np.int32:
        if x.size and not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{what} must be integers, got dtype {x.dtype}")
        x = x.astype("<i4")
    return np.ascontiguousarray(x, "<i4")


def _f32(a, what: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype="<f4"))


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of a contiguous array as a 1-D uint8 view (``len`` = byte count, no copy)."""
    return a.reshape(-1).view(np.uint8)


def _is_dense(qi: np.ndarray) -> bool:
    """Every row of ``qi`` is ``0 .. k-1`` (a full-vocabulary q): the ids need not travel."""
    n, k = qi.shape
    if n == 0:
        return False
    ar = np.arange(k, dtype=qi.dtype)
    if not np.array_equal(qi[0], ar):
        return False
    return n == 1 or (qi.strides[0] == 0) or bool((qi == ar).all())


def _draft_arrays(msg: M.DraftBatch):
    toks = _i32(msg.tokens, "tokens").reshape(-1)
    probs = _f32(msg.probs, "probs").reshape(-1)
    n = len(toks)
    if len(probs) != n:
        raise ValueError(f"DraftBatch: {n} tokens but {len(probs)} probs")
    if (msg.q_ids is None) != (msg.q_probs is None):
        raise ValueError("DraftBatch: q_ids and q_probs go together")
    qi = qp = None
    if msg.q_ids is not None:
        qi, qp = np.asarray(msg.q_ids), np.asarray(msg.q_probs)
        rows = n - 1 if msg.hint else n
        if qi.ndim != 2 or qi.shape != qp.shape or qi.shape[0] != rows or qi.shape[1] < 1:
            raise ValueError(f"DraftBatch: q_ids/q_probs must both be [rows, k] with rows={rows} (n={n}, "
                             f"hint={bool(msg.hint)}), k>=1; got {qi.shape} and {qp.shape}")
    if msg.hint and n < 1:
        raise ValueError("DraftBatch: a hint needs at least one token")
    return toks, probs, qi, qp


def _body(msg) -> tuple[int, list]:
    """``(type tag, list of byte chunks)`` of the body of ``msg``."""
    if isinstance(msg, M.DraftBatch):
        toks, probs, qi, qp = _draft_arrays(msg)
        n = len(toks)
        flags = (F_VERIFY if msg.verify else 0) | (F_BONUS if msg.bonus else 0) | (F_HINT if msg.hint else 0)
        k = 0
        parts = [toks, probs]
        if qi is not None:
            k = qi.shape[1]
            flags |= F_HAS_Q
            if _is_dense(qi):
                flags |= F_Q_DENSE
            else:
                parts.append(_i32(qi, "q_ids"))
            parts.append(_f32(qp, "q_probs"))
        head = _pack(_DRAFT, "DraftBatch", msg.session_id, msg.epoch, msg.first_pos, flags, float(msg.sent_at), n, k)
        return M.T_DRAFT, [head, b"\0" * _DRAFT_PAD, *(_raw(p) for p in parts)]
    if isinstance(msg, M.Verdict):
        flags = (F_REJECTED if msg.rejected else 0) | (F_FINISHED if msg.finished else 0)
        return M.T_VERDICT, [_pack(_VERDICT, "Verdict", msg.session_id, msg.epoch, msg.start_pos, msg.end_pos,
                                   msg.accepted, msg.correction, flags, msg.verified_len, msg.target_forwards,
                                   float(msg.verify_s), float(msg.echo_sent_at))]
    if isinstance(msg, M.Hello):
        return M.T_HELLO, [_pack(_HELLO, "Hello", msg.version), _str(_utf8(msg.auth_token, MAX_AUTH_BYTES, "auth_token")),
                           _str(_utf8(msg.client_name, MAX_NAME_BYTES, "client_name"))]
    if isinstance(msg, M.HelloAck):
        return M.T_HELLO_ACK, [_pack(_HELLO_ACK, "HelloAck", msg.version, msg.vocab_size, msg.max_sessions,
                                     msg.max_prompt_tokens, msg.max_draft_in_flight),
                               _str(_utf8(msg.server_name, MAX_NAME_BYTES, "server_name")),
                               _str(_utf8(msg.tokenizer_fingerprint, MAX_NAME_BYTES, "tokenizer_fingerprint"))]
    if isinstance(msg, M.OpenSession):
        ids = _i32(msg.prompt_ids, "prompt_ids").reshape(-1)
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"OpenSession: prompt of {len(ids)} tokens; at most {MAX_PROMPT_TOKENS}")
        head = _pack(_OPEN, "OpenSession", msg.session_id, float(msg.temperature), msg.top_k, float(msg.top_p),
                     float(msg.min_p), msg.seed, msg.max_new_tokens, len(ids))
        return M.T_OPEN, [head, b"\0" * _OPEN_PAD, _raw(ids),
                          _str(_utf8(msg.tokenizer_fingerprint, MAX_NAME_BYTES, "tokenizer_fingerprint"))]
    if isinstance(msg, M.SessionOpened):
        return M.T_OPENED, [_pack(_U32, "SessionOpened", msg.session_id)]
    if isinstance(msg, M.CloseSession):
        return M.T_CLOSE, [_pack(_U32, "CloseSession", msg.session_id)]
    if isinstance(msg, M.Error):
        return M.T_ERROR, [_pack(_ERROR, "Error", msg.code, msg.session_id), _str(_error_text(msg.message))]
    raise TypeError(f"not a PipeSD message: {type(msg).__name__}")


def encode(msg: M.Message) -> bytes:
    """The whole frame of ``msg``, length prefix included.

    Raises ``ValueError``/``TypeError`` for a message that cannot be represented (a field out
    of its wire range, a string over its limit, mismatched array shapes). Error messages over
    ``MAX_MESSAGE_BYTES`` are cut rather than refused.
    """
    tag, parts = _body(msg)
    n = 1 + sum(len(p) for p in parts)
    return b"".join([HEADER.pack(n), bytes((tag,)), *parts])


def encoded_size(msg: M.Message) -> int:
    """Bytes ``msg`` takes on the wire (frame included), computed without encoding arrays."""
    if isinstance(msg, M.DraftBatch):
        n = int(np.size(msg.tokens))
        size = FRAME_OVERHEAD + _DRAFT.size + _DRAFT_PAD + 8 * n
        if msg.q_ids is not None:
            qi = np.asarray(msg.q_ids)
            size += (4 if _is_dense(qi) else 8) * int(qi.size)
        return size
    if isinstance(msg, M.Verdict):
        return FRAME_OVERHEAD + _VERDICT.size
    if isinstance(msg, (M.SessionOpened, M.CloseSession)):
        return FRAME_OVERHEAD + _U32.size
    if isinstance(msg, M.OpenSession):
        return (FRAME_OVERHEAD + _OPEN.size + _OPEN_PAD + 4 * int(np.size(msg.prompt_ids)) + _STR.size
                + len(msg.tokenizer_fingerprint.encode("utf-8")))
    if isinstance(msg, M.Error):
        return FRAME_OVERHEAD + _ERROR.size + _STR.size + len(_error_text(msg.message))
    if isinstance(msg, M.Hello):
        return FRAME_OVERHEAD + _HELLO.size + 2 * _STR.size + len(msg.auth_token.encode()) + len(msg.client_name.encode())
    if isinstance(msg, M.HelloAck):
        return (FRAME_OVERHEAD + _HELLO_ACK.size + 2 * _STR.size + len(msg.server_name.encode())
                + len(msg.tokenizer_fingerprint.encode()))
    raise TypeError(f"not a PipeSD message: {type(msg).__name__}")


# ----------------------------------------------------------------------------- decode
class _Reader:
    """Cursor over a frame body; every read is bounds-checked before anything is allocated."""

    __slots__ = ("buf", "off", "what")

    def __init__(self, buf: Buffer, what: str) -> None:
        self.buf = buf if isinstance(buf, memoryview) else memoryview(buf)
        if self.buf.ndim != 1 or self.buf.itemsize != 1:
            self.buf = self.buf.cast("B")
        self.off = 0
        self.what = what

    def take(self, n: int, field: str) -> memoryview:
        if n < 0 or self.off + n > len(self.buf):
            raise _bad(f"{self.what}: truncated body ({field} needs {n} bytes, "
                       f"{len(self.buf) - self.off} left)")
        v = self.buf[self.off: self.off + n]
        self.off += n
        return v

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size, "header"))

    def pad(self, n: int) -> None:
        if any(self.take(n, "padding")):
            raise _bad(f"{self.what}: non-zero padding")

    def string(self, limit: int, field: str) -> str:
        (n,) = self.unpack(_STR)
        if n > limit:
            raise _field(f"{self.what}: {field} is {n} bytes; at most {limit}")
        try:
            return str(self.take(n, field), "utf-8")
        except UnicodeDecodeError:
            raise _field(f"{self.what}: {field} is not valid UTF-8") from None

    def array(self, dtype: str, count: int, field: str) -> np.ndarray:
        size = 4 * count  # every wire array is int32 or float32
        if count < 0 or self.off + size > len(self.buf):
            raise _bad(f"{self.what}: {field} of {count} items does not fit the frame "
                       f"({len(self.buf) - self.off} bytes left)")
        return np.frombuffer(self.take(size, field), dtype=dtype, count=count)

    def end(self) -> None:
        if self.off != len(self.buf):
            raise _bad(f"{self.what}: {len(self.buf) - self.off} unexpected trailing bytes")


def _check_probs(a: np.ndarray, what: str) -> None:
    # NaN fails both comparisons, +-inf fails one: no separate isfinite pass needed.
    if a.size and not (a.min() >= 0.0 and a.max() <= 1.0 + PROB_SLACK):
        raise _field(f"{what} must be finite probabilities in [0, 1]")


def _check_finite(what: str, *values: float) -> None:
    for v in values:
        if not (v - v == 0.0):  # False for NaN and +-inf
            raise _field(f"{what} must be finite")


def _decode_draft(r: _Reader) -> M.DraftBatch:
    sid, epoch, first, flags, sent_at, n, k = r.unpack(_DRAFT)
    r.pad(_DRAFT_PAD)
    if flags & ~_DRAFT_FLAGS:
        raise _field(f"DraftBatch: unknown flags {flags:#x}")
    _check_finite("DraftBatch: sent_at", sent_at)
    toks = r.array("<i4", n, "tokens")
    probs = r.array("<f4", n, "probs")
    if n and toks.min() < 0:
        raise _field("DraftBatch: negative token id")
    _check_probs(probs, "DraftBatch: probs")
    qi = qp = None
    hint = bool(flags & F_HINT)
    if hint and n < 1:
        raise _field("DraftBatch: a hint needs at least one token")
    rows = n - 1 if hint else n  # the hint token carries no q
    if flags & F_HAS_Q:
        if not 1 <= k <= MAX_Q_WIDTH:
            raise _field(f"DraftBatch: q width {k} outside [1, {MAX_Q_WIDTH}]")
        count = rows * k
        if not flags & F_Q_DENSE:
            qi = r.array("<i4", count, "q_ids").reshape(rows, k)
        qp = r.array("<f4", count, "q_probs").reshape(rows, k)
        if flags & F_Q_DENSE:  # allocated only now that the frame is known to hold rows*k probs
            # (no rows: no arange(k) then, or a 40-byte frame could cost 4 MiB)
            qi = np.broadcast_to(np.arange(k, dtype=np.int32), (rows, k)) if rows else np.zeros((0, k), np.int32)
        elif count and qi.min() < 0:
            raise _field("DraftBatch: negative q id")
        _check_probs(qp, "DraftBatch: q_probs")
        if rows and (np.abs(qp.sum(axis=1, dtype=np.float64) - 1.0) > Q_SUM_TOL).any():
            raise _field(f"DraftBatch: every q row must sum to 1 (within {Q_SUM_TOL})")
    elif k or flags & F_Q_DENSE:
        raise _field("DraftBatch: q width or dense flag given without q")
    r.end()
    return M.DraftBatch(sid, epoch, first, toks, probs, bool(flags & F_VERIFY), bool(flags & F_BONUS), qi, qp, sent_at,
                        hint)


def _decode_verdict(r: _Reader) -> M.Verdict:
    sid, epoch, start, end, acc, corr, flags, vlen, fwd, verify_s, echo = r.unpack(_VERDICT)
    r.end()
    if flags & ~_VERDICT_FLAGS:
        raise _field(f"Verdict: unknown flags {flags:#x}")
    _check_finite("Verdict: verify_s and echo_sent_at", verify_s, echo)
    rejected = bool(flags & F_REJECTED)
    if end < start or acc > end - start:
        raise _field(f"Verdict: accepted {acc} does not fit the segment [{start}, {end})")
    if corr < -1:
        raise _field(f"Verdict: correction {corr} (must be a token id or -1)")
    if rejected and (corr < 0 or acc == end - start):
        raise _field("Verdict: a rejection needs a correction token and fewer accepted than the segment")
    if verify_s < 0:
        raise _field("Verdict: negative verify_s")
    return M.Verdict(sid, epoch, start, end, acc, corr, rejected, vlen, bool(flags & F_FINISHED), fwd, verify_s, echo)


def _decode_open(r: _Reader) -> M.OpenSession:
    sid, temp, top_k, top_p, min_p, seed, max_new, n = r.unpack(_OPEN)
    r.pad(_OPEN_PAD)
    if n > MAX_PROMPT_TOKENS:
        raise _bad(f"OpenSession: prompt of {n} tokens; at most {MAX_PROMPT_TOKENS}", M.E_LIMIT)
    ids = r.array("<i4", n, "prompt_ids")
    fp = r.string(MAX_NAME_BYTES, "tokenizer_fingerprint")
    r.end()
    _check_finite("OpenSession: temperature, top_p and min_p", temp, top_p, min_p)
    if temp < 0 or top_k < 0 or not 0.0 <= top_p <= 1.0 or not 0.0 <= min_p <= 1.0:
        raise _field(f"OpenSession: sampling parameters out of range (temperature {temp} >= 0, top_k {top_k} >= 0, "
                     f"top_p {top_p} and min_p {min_p} in [0, 1])")
    if n and ids.min() < 0:
        raise _field("OpenSession: negative prompt token id")
    return M.OpenSession(sid, ids, temp, top_k, top_p, min_p, seed, fp, max_new)


def _decode_hello(r: _Reader) -> M.Hello:
    (ver,) = r.unpack(_HELLO)
    tok = r.string(MAX_AUTH_BYTES, "auth_token")
    name = r.string(MAX_NAME_BYTES, "client_name")
    r.end()
    return M.Hello(ver, tok, name)


def _decode_hello_ack(r: _Reader) -> M.HelloAck:
    ver, vocab, max_sessions, max_prompt, max_draft = r.unpack(_HELLO_ACK)
    name = r.string(MAX_NAME_BYTES, "server_name")
    fp = r.string(MAX_NAME_BYTES, "tokenizer_fingerprint")
    r.end()
    return M.HelloAck(ver, name, vocab, fp, max_sessions, max_prompt, max_draft)


def _decode_sid(cls):
    def dec(r: _Reader):
        (sid,) = r.unpack(_U32)
        r.end()
        return cls(sid)
    return dec


def _decode_error(r: _Reader) -> M.Error:
    code, sid = r.unpack(_ERROR)
    text = r.string(MAX_MESSAGE_BYTES, "message")
    r.end()
    if sid < -1:
        raise _field(f"Error: session_id {sid} (must be >= -1)")
    return M.Error(code, text, sid)


_DECODERS = {M.T_HELLO: _decode_hello, M.T_HELLO_ACK: _decode_hello_ack, M.T_OPEN: _decode_open,
             M.T_OPENED: _decode_sid(M.SessionOpened), M.T_DRAFT: _decode_draft, M.T_VERDICT: _decode_verdict,
             M.T_CLOSE: _decode_sid(M.CloseSession), M.T_ERROR: _decode_error}


def decode(frame_body: Buffer, type_tag: int) -> M.Message:
    """Decode the body (after the type byte) of a frame of type ``type_tag``.

    Arrays in the result are views of ``frame_body`` (no copy). Raises :class:`ProtocolError`
    on anything malformed, and nothing else. ``decode(type_tag, frame_body)`` (the older
    argument order) is accepted too.
    """
    if isinstance(frame_body, int) and not isinstance(type_tag, int):
        frame_body, type_tag = type_tag, frame_body
    dec = _DECODERS.get(type_tag)
    if dec is None:
        raise _bad(f"unknown message type {type_tag!r}")
    try:
        return dec(_Reader(frame_body, _TYPE_NAMES[type_tag]))
    except ProtocolError:
        raise
    except (struct.error, ValueError, TypeError, OverflowError, MemoryError) as e:  # pragma: no cover - guarded above
        raise _bad(f"malformed {_TYPE_NAMES[type_tag]} frame: {e}") from None


def decode_payload(payload: Buffer) -> M.Message:
    """Decode what follows the length prefix: the type byte and the body."""
    mv = payload if isinstance(payload, memoryview) else memoryview(payload)
    if len(mv) < 1:
        raise _bad("empty frame")
    return decode(mv[1:], mv[0])


def decode_frame(buf: Buffer) -> M.Message:
    """Decode one complete frame (length prefix included, nothing after it)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if len(mv) < FRAME_OVERHEAD:
        raise _bad(f"frame of {len(mv)} bytes is shorter than its {FRAME_OVERHEAD}-byte header")
    (n,) = HEADER.unpack(mv[: HEADER.size])
    if n != len(mv) - HEADER.size:
        raise _bad(f"frame length field says {n} bytes, {len(mv) - HEADER.size} follow")
    return decode_payload(mv[HEADER.size:])


def check_length(n: int, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
    """Check a declared frame length ``N`` before reading (or allocating) the frame."""
    if n < 1:
        raise _bad("empty frame (length 0)")
    if n > max_frame_bytes:
        raise _bad(f"frame of {n} bytes exceeds the limit of {max_frame_bytes}", M.E_LIMIT)


class FrameReader:
    """Incremental parser for a byte stream cut into arbitrary chunks.

    ``feed(chunk)`` returns the messages completed by ``chunk`` (possibly none). A declared
    length above ``max_frame_bytes`` raises at once, before the frame is buffered. After a
    :class:`ProtocolError` the stream is out of sync and every later ``feed`` raises it again;
    messages completed before the bad frame in the same chunk are returned first.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be >= 1, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._error: Optional[ProtocolError] = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, chunk: Buffer) -> list:
        """Add ``chunk``; return the complete messages, in order."""
        if self._error is not None:
            raise ProtocolError(self._error.code, str(self._error))
        self._buf += chunk
        out: list = []
        pos = 0
        buf = self._buf
        try:
            while len(buf) - pos >= HEADER.size:
                (n,) = HEADER.unpack_from(buf, pos)
                check_length(n, self.max_frame_bytes)
                start = pos + HEADER.size
                if len(buf) - start < n:
                    break
                payload = buf[start: start + n]  # one copy: the message's arrays are views of it
                pos = start + n
                out.append(decode_payload(payload))
        except ProtocolError as e:
            self._error = e
            del buf[:]
            if not out:
                raise
        else:
            del buf[:pos]
        return out


def validate_tokens(arr, vocab_size: int, what: str = "token ids") -> None:
    """The server's semantic check: every id in ``[0, vocab_size)`` (``ProtocolError`` E_BAD_FIELD)."""
    a = np.asarray(arr)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ProtocolError(M.E_BAD_FIELD, f"{what} outside [0, {vocab_size})")
