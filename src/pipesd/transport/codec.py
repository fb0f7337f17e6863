"""Binary frames for the messages in :mod:`pipesd.transport.messages`.

Frame: ``u32 N (big-endian) | u8 type | body``, where ``N`` counts the type byte and the
body. Bodies are a little-endian fixed header, then raw ``int32``/``float32`` arrays, then
``u16``-length-prefixed UTF-8 strings. Arrays start at offsets that are multiples of 4
counted from the type byte, so a reader that receives the ``N`` bytes after the prefix into
a fresh buffer gets aligned arrays.

Every message has one declarative :class:`~pipesd.transport.schema.Schema` in :data:`SCHEMAS`:
its fields in wire order and its cross-field checks, in the schema language of
:mod:`pipesd.transport.schema`. At import each schema is compiled into a straight-line encoder
and decoder (Python source generated from it, like ``dataclasses`` does:
``SCHEMAS[M.DraftBatch].source``) that call the runtime helpers defined here, and the same
schema renders the field tables of ``docs/wire.md`` (:func:`render_wire_doc`; a test keeps
them equal). This module holds the messages' schemas, those helpers, encode/decode and the docs.

Why hand-written rather than pickle or msgpack: pickle executes code from the peer; msgpack
is a dependency and copies arrays into Python objects. Here arrays decode zero-copy
(``np.frombuffer`` views of the received buffer, read-only when the buffer is ``bytes``) and
every field is validated in one place before the runtime sees it. Malformed input raises
:class:`ProtocolError` and nothing else; a declared length above ``max_frame_bytes`` is
refused before anything is allocated for it.
"""
from __future__ import annotations

import re
import struct
from typing import Optional, Union

import numpy as np

from pipesd.transport import messages as M
from pipesd.transport.schema import (Array, Check, Count, Flags, Pad, Scalar, Schema, Str, compile_schema, range_words,
                                     ranged, wire_format)
from pipesd.transport.schema import validate as _validate  # noqa: F401 - codec._validate, for the tests

__all__ = ["ProtocolError", "encode", "decode", "decode_payload", "decode_frame", "FrameReader", "check_length",
           "check_token_ids", "SCHEMAS", "Schema", "Scalar", "Count", "Flags", "Pad", "Array", "Str", "Check",
           "schema_markdown", "render_wire_doc", "write_wire_doc", "MAX_FRAME_BYTES", "HEADER", "FRAME_OVERHEAD", "MAX_AUTH_BYTES",
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
MAX_TREE_NODES = 64
"""Nodes of one TreeRequest at most (``E_LIMIT`` over it)."""
PROB_SLACK = 1e-6
"""Probabilities may exceed 1 by this much (float32 rounding of a normalisation)."""
Q_SUM_TOL = 1e-3
"""A q row must sum to 1 within this."""

# DraftBatch flags (2 was the bonus flag up to protocol 2: refused now)
F_VERIFY, F_HAS_Q, F_Q_DENSE, F_HINT = 1, 4, 8, 16
# Verdict flags
F_REJECTED, F_FINISHED = 1, 2


class ProtocolError(ValueError):
    """A frame or a field that breaks the protocol; ``code`` is one of ``messages.E_*``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # keep ``code`` through pickling (multiprocessing)
        return (type(self), (self.code, str(self)))


def _bad(msg: str, code: int = M.E_BAD_FRAME) -> ProtocolError:
    return ProtocolError(code, msg)


def _field(msg: str, code: int = M.E_BAD_FIELD) -> ProtocolError:
    return ProtocolError(code, msg)


# ----------------------------------------------------------------------------- the messages
_WIRE = (  # compiled into SCHEMAS once the helpers below are defined
    Schema(M.Hello, M.T_HELLO, "edge -> cloud, first frame", (
        Scalar("version", "u16", doc="any (the server refuses other than `PROTOCOL_VERSION` with `E_VERSION`)"),
        Str("auth_token", MAX_AUTH_BYTES),
        Str("client_name", MAX_NAME_BYTES),
    )),
    Schema(M.HelloAck, M.T_HELLO_ACK, "cloud -> edge", (
        Scalar("version", "u16", doc="the edge refuses other than its own (`HandshakeError`, `E_VERSION`)"),
        Scalar("vocab_size", "u32"),
        Scalar("max_sessions", "u32"),
        Scalar("max_prompt_tokens", "u32"),
        Scalar("max_draft_in_flight", "u32"),
        Str("server_name", MAX_NAME_BYTES),
        Str("tokenizer_fingerprint", MAX_NAME_BYTES),
    )),
    Schema(M.OpenSession, M.T_OPEN, "edge -> cloud", (
        Scalar("session_id", "u32"),
        Scalar("temperature", "f64", lo=0.0, doc="0 = greedy"),
        Scalar("top_k", "i32", lo=0, doc="0 = off"),
        Scalar("top_p", "f64", lo=0.0, hi=1.0),
        Scalar("min_p", "f64", lo=0.0, hi=1.0),
        Scalar("seed", "u64"),
        Scalar("max_new_tokens", "u32"),
        Count("n", hi=MAX_PROMPT_TOKENS, code=M.E_LIMIT),
        Pad(3),
        Array("prompt_ids", "i32", ("n",), lo=0),
        Str("tokenizer_fingerprint", MAX_NAME_BYTES),
    )),
    Schema(M.SessionOpened, M.T_OPENED, "cloud -> edge", (Scalar("session_id", "u32"),)),
    Schema(M.DraftBatch, M.T_DRAFT, "edge -> cloud", (
        Scalar("session_id", "u32"),
        Scalar("epoch", "u32"),
        Scalar("first_pos", "u32"),
        Flags(((F_VERIFY, "verify"), (F_HAS_Q, "has_q"), (F_Q_DENSE, "dense_q"), (F_HINT, "hint")),
              doc="bit 2 was the bonus flag up to protocol 2"),
        Scalar("sent_at", "f64"),
        Count("n", doc="0 allowed: a verify request without drafts"),
        Count("k", lo=1, hi=MAX_Q_WIDTH, when="has_q", doc="the q width"),
        Pad(2),
        Array("tokens", "i32", ("n",), lo=0),
        Array("probs", "f32", ("n",), prob=True),
        Array("q_ids", "i32", ("n-hint", "k"), lo=0, when="has_q", implicit="dense_q"),
        Array("q_probs", "f32", ("n-hint", "k"), prob=True, rows_sum_to_one=True, when="has_q"),
    )),
    Schema(M.Verdict, M.T_VERDICT, "cloud -> edge", (
        Scalar("session_id", "u32"),
        Scalar("epoch", "u32"),
        Scalar("start_pos", "u32"),
        Scalar("end_pos", "u32"),
        Scalar("accepted", "u32"),
        Scalar("token", "i32", lo=-1, doc="-1: none"),
        Flags(((F_REJECTED, "rejected"), (F_FINISHED, "finished"))),
        Scalar("settled", "u8", hi=M.SETTLED_VOID, doc="0 none (or not yet received), 1 kept, 2 void"),
        Scalar("verified_len", "u32"),
        Scalar("target_forwards", "u32"),
        Scalar("verify_s", "f64", lo=0.0),
        Scalar("echo_sent_at", "f64"),
    ), checks=(
        Check("start_pos + accepted <= end_pos", "the accepted drafts lie in the segment [start_pos, end_pos)"),
        Check("not rejected or (token >= 0 and start_pos + accepted < end_pos)",
              "a rejection carries a correction token and accepts fewer than the segment"),
        Check("not settled or (not rejected and token >= 0 and start_pos + accepted == end_pos)",
              "settled is 0 except after a full acceptance with a bonus token"),
    )),
    Schema(M.CloseSession, M.T_CLOSE, "edge -> cloud", (Scalar("session_id", "u32"),)),
    Schema(M.StreamRequest, M.T_STREAM, "edge -> cloud", (
        Scalar("session_id", "u32"),
        Scalar("epoch", "u32"),
        Scalar("first_pos", "u32"),
        Scalar("budget", "u32", lo=1, doc="tokens to decode at most"),
        Scalar("sent_at", "f64"),
    )),
    Schema(M.TreeRequest, M.T_TREE, "edge -> cloud", (
        Scalar("session_id", "u32"),
        Scalar("epoch", "u32"),
        Scalar("first_pos", "u32", doc="the verified length (nothing pending)"),
        Flags(((F_HAS_Q, "has_q"),)),
        Scalar("sent_at", "f64"),
        Count("n", lo=1, hi=MAX_TREE_NODES, code=M.E_LIMIT, doc="tree nodes"),
        Count("m", lo=1, hi=MAX_TREE_NODES + 1, when="has_q", doc="q rows: one per node with children"),
        Count("k", lo=1, hi=MAX_Q_WIDTH, when="has_q", doc="the q width"),
        Pad(2),
        Array("tokens", "i32", ("n",), lo=0),
        Array("parents", "i32", ("n",), lo=-1, doc="parents[i] in [-1, i): -1 is the last verified token"),
        Array("q_rows", "i32", ("m",), lo=-1, when="has_q", doc="the node each q row belongs to (-1 the root)"),
        Array("q_ids", "i32", ("m", "k"), lo=0, when="has_q"),
        Array("q_probs", "f32", ("m", "k"), prob=True, rows_sum_to_one=True, when="has_q"),
    )),
    Schema(M.TreeVerdict, M.T_TREE_VERDICT, "cloud -> edge", (
        Scalar("session_id", "u32"),
        Scalar("epoch", "u32"),
        Scalar("start_pos", "u32"),
        Scalar("token", "i32", lo=-1, doc="-1: none"),
        Flags(((F_REJECTED, "rejected"), (F_FINISHED, "finished"))),
        Scalar("verified_len", "u32"),
        Scalar("target_forwards", "u32"),
        Scalar("verify_s", "f64", lo=0.0),
        Scalar("echo_sent_at", "f64"),
        Count("a", hi=MAX_TREE_NODES, doc="accepted nodes"),
        Pad(2),
        Array("path", "i32", ("a",), lo=0, doc="the accepted nodes, root to leaf"),
    ), checks=(
        Check("not rejected or token >= 0", "a rejection carries a correction token"),
        Check("verified_len >= start_pos", "the verified length does not shrink"),
    )),
    Schema(M.Error, M.T_ERROR, "either way", (
        Scalar("code", "u16", doc="`E_*` (unknown codes are passed through)"),
        Scalar("session_id", "i64", lo=-1, doc="-1: connection-level; the connection closes after it"),
        Str("message", MAX_MESSAGE_BYTES, cut=True),
    )),
)


# ----------------------------------------------------------------------------- what generated code calls
def _utf8(s: str, limit: int, what: str) -> bytes:
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, got {type(s).__name__}")
    b = s.encode("utf-8")
    if len(b) > limit:
        raise ValueError(f"{what} is {len(b)} bytes of UTF-8; at most {limit}")
    return b


_STR = struct.Struct("<H")


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


def _frame(tag: bytes, parts: list) -> bytes:
    return b"".join([HEADER.pack(1 + sum(map(len, parts))), tag, *parts])


def _is_dense(qi: np.ndarray) -> bool:
    """Every row of ``qi`` is ``0 .. k-1`` (a full-vocabulary q): the ids need not travel."""
    n, k = qi.shape
    if n == 0:
        return False
    ar = np.arange(k, dtype=qi.dtype)
    if not np.array_equal(qi[0], ar):
        return False
    return n == 1 or (qi.strides[0] == 0) or bool((qi == ar).all())


def _arange_rows(rows: int, k: int) -> np.ndarray:
    """The implicit ``[rows, k]`` array of rows ``0 .. k-1``, read-only; built only once the frame
    is known to hold the arrays sent with it (no rows: no ``arange(k)``, or a 40-byte frame
    could cost 4 MiB)."""
    return np.broadcast_to(np.arange(k, dtype=np.int32), (rows, k)) if rows else np.zeros((0, k), np.int32)


def _check_probs(a: np.ndarray, what: str) -> None:
    # NaN fails both comparisons, +-inf fails one: no separate isfinite pass needed.
    if a.size and not (a.min() >= 0.0 and a.max() <= 1.0 + PROB_SLACK):
        raise _field(f"{what} must be finite probabilities in [0, 1]")


def _check_rows(a: np.ndarray, what: str) -> None:
    if a.shape[0] and (np.abs(a.sum(axis=1, dtype=np.float64) - 1.0) > Q_SUM_TOL).any():
        raise _field(f"{what}: every row must sum to 1 (within {Q_SUM_TOL})")


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


# ----------------------------------------------------------------------------- schema -> code
SCHEMAS: dict = {}
"""Message class -> :class:`Schema`, in type-tag order."""
_ENCODERS: dict = {}  # message class -> encode function (whole frame)
_DECODERS: dict = {}  # type tag -> decode function (body -> message)
_TYPE_NAMES: dict = {}
_HELPERS = {"__name__": __name__, "np": np, "_bad": _bad, "_field": _field, "_check_probs": _check_probs,
            "_check_rows": _check_rows, "_arange_rows": _arange_rows, "_i32": _i32, "_f32": _f32, "_raw": _raw,
            "_is_dense": _is_dense, "_utf8": _utf8, "_str": _str, "_error_text": _error_text, "_pack": _pack,
            "_frame": _frame}
"""What the generated code sees (:data:`pipesd.transport.schema.HELPERS`); ``__name__`` makes it
this module's code (tracebacks, the fuzzer's instrumentation)."""

for _s in _WIRE:
    _DECODERS[_s.tag], _ENCODERS[_s.cls] = compile_schema(_s, _HELPERS)
    _TYPE_NAMES[_s.tag] = _s.name
    SCHEMAS[_s.cls] = _s
del _s


# ----------------------------------------------------------------------------- encode / decode
def encode(msg: M.Message) -> bytes:
    """The whole frame of ``msg``, length prefix included.

    Raises ``ValueError``/``TypeError`` for a message that cannot be represented (a field out
    of its wire range, a string over its limit, mismatched array shapes). Error messages over
    ``MAX_MESSAGE_BYTES`` are cut rather than refused.
    """
    enc = _ENCODERS.get(type(msg))
    if enc is None:
        raise TypeError(f"not a PipeSD message: {type(msg).__name__}")
    return enc(msg)


def decode(frame_body: Buffer, type_tag: int) -> M.Message:
    """Decode the body (after the type byte) of a frame of type ``type_tag``.

    Arrays in the result are views of ``frame_body`` (no copy). Raises :class:`ProtocolError`
    on anything malformed, and nothing else.
    """
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


def check_token_ids(arr, vocab_size: int, what: str) -> None:
    """The server's vocabulary check: every id of ``arr`` in ``[0, vocab_size)``, else
    ``ProtocolError(E_BAD_FIELD, f"{what} outside [0, {vocab_size})")``. Empty passes."""
    a = np.asarray(arr)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ProtocolError(M.E_BAD_FIELD, f"{what} outside [0, {vocab_size})")


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


# ----------------------------------------------------------------------------- docs/wire.md
def _wire_type(f) -> str:
    if isinstance(f, Scalar):
        return f.wire
    if isinstance(f, (Count, Flags)):
        return "u32" if isinstance(f, Count) else "u8"
    if isinstance(f, Pad):
        return f"{f.size} x pad"
    if isinstance(f, Array):
        return f"{f.dtype}[{', '.join(f.shape)}]"
    return "str"


def _rule(f) -> str:
    """The rule column of ``f``'s row."""
    words = []
    if isinstance(f, Scalar):
        words = (["finite"] if f.wire == "f64" else []) + ([range_words(f.lo, f.hi)] if ranged(f) else [])
    elif isinstance(f, Count):
        rng = range_words(f.lo, f.hi) if ranged(f) else ""
        code = " (`E_LIMIT`)" if rng and f.code == M.E_LIMIT else ""
        words = [f"{rng} with {f.when}, else 0" if f.when else rng + code]
    elif isinstance(f, Flags):
        words = [", ".join(f"{bit} {name}" for bit, name in f.bits) + "; other bits refused"]
    elif isinstance(f, Pad):
        words = ["zero"]
    elif isinstance(f, Array):
        words = ["; ".join(w for w in (f.lo is not None and f">= {f.lo}", f.prob and "finite, in [0, 1]",
                                         f.rows_sum_to_one and f"each row sums to 1 within {Q_SUM_TOL:g}",
                                         f.when and f"only with {f.when}",
                                         f.implicit and f"not sent with {f.implicit} (decodes as rows 0..k-1)") if w)]
    elif isinstance(f, Str):
        words = [f"<= {f.limit} bytes of UTF-8"] + (["longer text is cut at a character boundary"] if f.cut else [])
    return "; ".join(w for w in [", ".join(w for w in words if w), getattr(f, "doc", "")] if w)


def _size(f) -> tuple[int, str, int]:
    """``(constant bytes, variable term, its coefficient)`` that ``f`` takes on the wire."""
    if isinstance(f, Array):
        dims = [f"({d})" if "-" in d and len(f.shape) > 1 else d for d in f.shape]
        return 0, "".join(dims), 4
    if isinstance(f, Str):
        return _STR.size, f"len({f.name})", 1
    return struct.calcsize("<" + wire_format(f, True)), "", 0


def _sum(const: int, terms: dict) -> str:
    return "+".join([str(const)] * bool(const or not terms) + [f"{c if c > 1 else ''}{t}" for t, c in terms.items()])


def schema_markdown(s: Schema) -> str:
    """The ``docs/wire.md`` section of one message: heading, field table, size, cross-field rules."""
    rows = [f"### {s.tag} {s.name} ({s.sender})", "", "| offset | type | field | rule |", "|---|---|---|---|"]
    const, terms, extra, known = 0, {}, [], True
    for f in s.fields:
        name = "" if isinstance(f, Pad) else f.name
        rows.append(f"| {_sum(const, terms) if known else '...'} | {_wire_type(f)} | {name} | {_rule(f)} |")
        c, term, coef = _size(f)
        conditional = isinstance(f, Array) and (f.when or f.implicit)
        if conditional:
            cond = ", ".join(x for x in (f.when and f"with {f.when}", f.implicit and f"not with {f.implicit}") if x)
            extra.append(f"`{coef}{term}` for {f.name} ({cond})")
            known = False
        else:
            const += c
            if term:
                terms[term] = terms.get(term, 0) + coef
    body = f"Body `{_sum(const, terms)}` bytes" if terms else f"Body {const} bytes (frame {const + FRAME_OVERHEAD})"
    rows += ["", body + (", plus " + " and ".join(extra) if extra else "") + "."]
    if s.checks:
        rows += ["", "Checked across fields:", ""] + [f"- `{c.expr}`: {c.text}." for c in s.checks]
    return "\n".join(rows)


_WIRE_BLOCK = re.compile(r"<!-- wire:(\w+)[^\n]*-->\n.*?<!-- /wire:\1 -->", re.S)


def render_wire_doc(text: str) -> str:
    """``text`` (``docs/wire.md``) with every ``<!-- wire:Name -->`` ... ``<!-- /wire:Name -->``
    block replaced by :func:`schema_markdown` of that message. Raises ``ValueError`` when a
    block names no message or a message has no block."""
    by_name = {s.name: s for s in SCHEMAS.values()}
    found = []

    def block(m: re.Match) -> str:
        s = by_name.get(m.group(1))
        if s is None:
            raise ValueError(f"a wire block names {m.group(1)!r}, which is not a message")
        found.append(s.name)
        return (f"<!-- wire:{s.name} (generated from pipesd.transport.codec.SCHEMAS by codec.write_wire_doc(); "
                f"do not edit) -->\n{schema_markdown(s)}\n<!-- /wire:{s.name} -->")

    out = _WIRE_BLOCK.sub(block, text)
    missing = [n for n in by_name if n not in found]
    if missing:
        raise ValueError(f"no wire block for {', '.join(missing)}: add `<!-- wire:Name -->\\n<!-- /wire:Name -->`")
    return out


def write_wire_doc(path: str = "docs/wire.md") -> bool:
    """Regenerate the message tables of ``path`` from the schemas; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = render_wire_doc(text)
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
