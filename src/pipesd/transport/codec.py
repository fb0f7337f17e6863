"""Binary frames for the messages in :mod:`pipesd.transport.messages`.

Frame: ``u32 N (big-endian) | u8 type | body``, where ``N`` counts the type byte and the
body. Bodies are a little-endian fixed header, then raw ``int32``/``float32`` arrays, then
``u16``-length-prefixed UTF-8 strings. Arrays start at offsets that are multiples of 4
counted from the type byte, so a reader that receives the ``N`` bytes after the prefix into
a fresh buffer gets aligned arrays.

Every message has one declarative :class:`Schema` in :data:`SCHEMAS`: its fields in wire
order (:class:`Scalar`, :class:`Count`, :class:`Flags`, :class:`Pad`, :class:`Array`,
:class:`Str`, each with its limits) and its cross-field ``checks``. At import each schema is
compiled into a straight-line encoder and decoder (Python source generated from it, like
``dataclasses`` does: ``SCHEMAS[M.DraftBatch].source``), and the same schema renders the
field tables of ``docs/wire.md`` (:func:`render_wire_doc`; a test keeps them equal).

Why hand-written rather than pickle or msgpack: pickle executes code from the peer; msgpack
is a dependency and copies arrays into Python objects. Here arrays decode zero-copy
(``np.frombuffer`` views of the received buffer, read-only when the buffer is ``bytes``) and
every field is validated in one place before the runtime sees it. Malformed input raises
:class:`ProtocolError` and nothing else; a declared length above ``max_frame_bytes`` is
refused before anything is allocated for it.
"""
from __future__ import annotations

import ast
import dataclasses
import linecache
import re
import struct
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from pipesd.transport import messages as M

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


# ----------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class Scalar:
    """A number of the message. ``wire``: ``u8 u16 u32 u64 i32 i64 f64``; an ``f64`` must be
    finite. ``lo``/``hi`` (inclusive) are checked on receipt; the encoder refuses only what
    the wire type cannot hold."""

    name: str
    wire: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    doc: str = ""


@dataclass(frozen=True)
class Count:
    """A ``u32`` that is not in the message: an array dimension, named in an :class:`Array`'s
    ``shape``. With ``when`` (a flag) it is within ``[lo, hi]`` with that flag and 0 without;
    ``code`` is the error for one out of range (``E_LIMIT`` for a limit on work)."""

    name: str
    lo: Optional[int] = None
    hi: Optional[int] = None
    when: str = ""
    code: int = M.E_BAD_FIELD
    doc: str = ""


@dataclass(frozen=True)
class Flags:
    """A ``u8`` of bits, ``(bit, name)``: a ``bool`` of the message, or a flag the codec
    derives (``Array.when``/``Array.implicit``). Unknown bits are refused."""

    bits: tuple
    name: str = "flags"
    doc: str = ""


@dataclass(frozen=True)
class Pad:
    """``size`` zero bytes (refused otherwise): the next array starts 4-aligned."""

    size: int


@dataclass(frozen=True)
class Array:
    """Raw little-endian ``i32``/``f32`` (``dtype``) of ``shape``: :class:`Count` names, or
    ``"count-flag"`` (one fewer with that flag; the flag needs ``count >= 1``). Decodes as a
    view of the frame. ``when``: present exactly with that flag (the encoder sets it when the
    array is not None; arrays with the same ``when`` go together). ``implicit``: with that
    flag the array is not sent and decodes as rows ``0 .. k-1`` (the encoder sets it when every
    row is so). Rules on receipt: ``lo`` (every element), ``prob`` (finite, in [0, 1]),
    ``rows_sum_to_one`` (within ``Q_SUM_TOL``)."""

    name: str
    dtype: str
    shape: tuple
    lo: Optional[int] = None
    prob: bool = False
    rows_sum_to_one: bool = False
    when: str = ""
    implicit: str = ""
    doc: str = ""


@dataclass(frozen=True)
class Str:
    """``u16 L`` + ``L`` bytes of UTF-8, ``L <= limit``. ``cut``: the encoder cuts a longer
    text at a character boundary instead of refusing it."""

    name: str
    limit: int
    cut: bool = False
    doc: str = ""



@dataclass(frozen=True)
class Check:
    """A rule across fields, checked on receipt: ``expr`` (Python over the field names) must
    hold; ``text`` says it in words (the error message and ``docs/wire.md``)."""

    expr: str
    text: str


@dataclass(eq=False)
class Schema:
    """One message on the wire: its class, type tag, sender and fields in wire order."""

    cls: type
    tag: int
    sender: str
    fields: tuple
    checks: tuple = ()
    head: struct.Struct = dataclasses.field(init=False)
    """The fixed fields (numbers, counts, flags; padding included, packed as zeros)."""
    source: str = dataclasses.field(init=False, repr=False)
    """The generated encoder and decoder."""

    @property
    def name(self) -> str:
        return self.cls.__name__


# ----------------------------------------------------------------------------- the messages
_WIRE = (  # compiled into SCHEMAS once the compiler below is defined
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
_DTYPE = {"i32": "<i4", "f32": "<f4"}
_SCALAR = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "i64": "q", "f64": "d"}
_FIXED = (Scalar, Count, Flags, Pad)
SCHEMAS: dict = {}
"""Message class -> :class:`Schema`, in type-tag order."""
_ENCODERS: dict = {}  # message class -> encode function (whole frame)
_DECODERS: dict = {}  # type tag -> decode function (body -> message)
_TYPE_NAMES: dict = {}


def _split(s: Schema) -> tuple[list, list]:
    fixed = [f for f in s.fields if isinstance(f, _FIXED)]
    return fixed, list(s.fields[len(fixed):])


def _dim(d: str) -> tuple[str, str]:
    """``"n"`` -> ``("n", "")``; ``"n-hint"`` -> ``("n", "hint")``."""
    count, _, flag = d.partition("-")
    return count, flag


def _dim_expr(d: str) -> str:
    count, flag = _dim(d)
    return f"({count} - {flag})" if flag else count


def _sent(a: Array) -> str:
    """The condition under which array ``a`` is on the wire ("" when always)."""
    return " and ".join(c for c in (a.when, a.implicit and f"not {a.implicit}") if c)


def _ranged(f) -> bool:
    return f.lo is not None or f.hi is not None


def _bad_range(var: str, lo, hi) -> str:
    """A condition true when ``var`` is outside ``[lo, hi]`` (None: unbounded)."""
    if lo is not None and hi is not None:
        return f"not {lo!r} <= {var} <= {hi!r}"
    return f"{var} < {lo!r}" if lo is not None else f"{var} > {hi!r}"


def _range_words(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{_num(lo)}, {_num(hi)}]"
    return f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}"


def _num(x) -> str:
    """2^20 rather than 1048576 (docs and messages)."""
    if isinstance(x, int) and x >= 1024 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:g}"


def _validate(s: Schema) -> None:
    """The schema against its dataclass and itself (a mistake here is a bug: raise at import)."""
    fixed, rest = _split(s)
    if any(isinstance(f, _FIXED) for f in rest):
        raise TypeError(f"{s.name}: numbers, counts, flags and padding come before arrays and strings")
    bits = [name for f in fixed if isinstance(f, Flags) for _, name in f.bits]
    own = {f.name for f in s.fields if isinstance(f, (Scalar, Array, Str))}
    fields = {f.name for f in dataclasses.fields(s.cls)}
    derived = set(bits) - fields
    if own | (set(bits) & fields) != fields:
        raise TypeError(f"{s.name}: the schema's fields {sorted(own | set(bits))} do not cover the dataclass's "
                        f"{sorted(fields)}")
    counts = {f.name: f for f in fixed if isinstance(f, Count)}
    arrays = [f for f in rest if isinstance(f, Array)]
    used = {c for a in arrays for c in (a.when, a.implicit) if c} | {c.when for c in counts.values() if c.when}
    if used - set(bits) or derived - used:
        raise TypeError(f"{s.name}: flags {sorted(used ^ derived)} are neither fields nor used by arrays")
    defined: set = set()
    for a in arrays:
        for d in a.shape:
            c, flag = _dim(d)
            if c not in counts or (flag and flag not in bits):
                raise TypeError(f"{s.name}.{a.name}: shape {a.shape} names an unknown count or flag")
            if c not in defined and counts[c].when != a.when:
                raise TypeError(f"{s.name}.{a.name}: count {c} is first given by an array with a different `when`")
            defined.add(c)
    if set(counts) - defined:
        raise TypeError(f"{s.name}: counts {sorted(set(counts) - defined)} size no array")
    for c in s.checks:  # a misspelt name would be a NameError on receipt, not a ProtocolError
        free = {x.id for x in ast.walk(ast.parse(c.expr, mode="eval")) if isinstance(x, ast.Name)}
        if free - fields - set(bits) - set(counts):
            raise TypeError(f"{s.name}: check {c.expr!r} names {sorted(free - fields - set(bits) - set(counts))}")
    off, after_str = 1 + struct.calcsize("<" + "".join(_fmt(f, True) for f in fixed)), False
    for f in rest:
        if isinstance(f, Array) and (off % 4 or after_str):
            raise TypeError(f"{s.name}.{f.name}: the array would not start 4-aligned (pad the header)")
        after_str |= isinstance(f, Str)


def _fmt(f, pack: bool) -> str:
    if isinstance(f, Scalar):
        return _SCALAR[f.wire]
    if isinstance(f, Count):
        return "I"
    if isinstance(f, Flags):
        return "B"
    return f"{f.size}x" if pack else f"{f.size}s"


class _Src:
    """Lines of generated Python."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def raise_(self, indent: int, err: str, text: str, *args: str, code: int = 0) -> None:
        """``raise err(text % args)``: ``text`` a constant, ``args`` expressions."""
        msg = repr(text) + (f" % ({', '.join(args)},)" if args else "")
        self(indent, f"raise {err}({msg}{f', {code}' if code not in (0, M.E_BAD_FIELD) else ''})")

    def raise_if(self, indent: int, cond: str, err: str, text: str, *args: str, code: int = 0) -> None:
        self(indent, f"if {cond}:")
        self.raise_(indent + 1, err, text, *args, code=code)


def _decoder_source(s: Schema) -> str:
    N = s.name
    fixed, rest = _split(s)
    src = _Src()
    src(0, f"def decode_{N}(r):")
    names = [f"_pad{i}" if isinstance(f, Pad) else f.name for i, f in enumerate(fixed)]
    src(1, f"{', '.join(names)}{',' if len(names) == 1 else ''} = r.unpack(_unpack)")
    for name, f in zip(names, fixed):
        if isinstance(f, Pad):
            src.raise_if(1, f"{name} != {bytes(f.size)!r}", "_bad", f"{N}: non-zero padding")
    for f in fixed:
        if isinstance(f, Flags):
            mask = sum(bit for bit, _ in f.bits)
            src.raise_if(1, f"{f.name} & {~mask & 0xFF:#x}", "_field", f"{N}: unknown flags %#x", f.name)
            for bit, name in f.bits:
                src(1, f"{name} = bool({f.name} & {bit})")
    for f in fixed:
        if isinstance(f, Scalar):
            if f.wire == "f64":
                src.raise_if(1, f"not ({f.name} - {f.name} == 0.0)", "_field", f"{N}: {f.name} must be finite")
            if _ranged(f):
                src.raise_if(1, _bad_range(f.name, f.lo, f.hi), "_field",
                             f"{N}: {f.name} %r must be {_range_words(f.lo, f.hi)}", f.name)
        elif isinstance(f, Count):
            cond = _bad_range(f.name, f.lo, f.hi) if _ranged(f) else ""
            if f.when:
                src(1, f"if {f.when}:")
                if cond:
                    src.raise_if(2, cond, "_field", f"{N}: {f.name} %d must be {_range_words(f.lo, f.hi)}",
                                 f.name, code=f.code)
                else:
                    src(2, "pass")
                src(1, f"elif {f.name}:")
                src.raise_(2, "_field", f"{N}: {f.name} %d without flag {f.when} (must be 0)", f.name)
            elif cond:
                src.raise_if(1, cond, "_field", f"{N}: {f.name} %d must be {_range_words(f.lo, f.hi)}", f.name,
                             code=f.code)
    arrays = [f for f in rest if isinstance(f, Array)]
    for flag, when in dict.fromkeys((a.implicit, a.when) for a in arrays if a.implicit):
        src.raise_if(1, f"{flag} and not {when}", "_field", f"{N}: flag {flag} without flag {when}")
    for count, flag in dict.fromkeys(_dim(d) for a in arrays for d in a.shape if _dim(d)[1]):
        src.raise_if(1, f"{flag} and not {count}", "_field", f"{N}: with flag {flag}, {count} must be >= 1")
    for f in rest:
        if isinstance(f, Str):
            src(1, f"{f.name} = r.string({f.limit}, {f.name!r})")
            continue
        ind, dims = 1, [_dim_expr(d) for d in f.shape]
        cond = _sent(f)
        if cond:
            src(1, f"{f.name} = None")
            src(1, f"if {cond}:")
            ind = 2
        shape = f".reshape({', '.join(dims)})" if len(dims) > 1 else ""
        src(ind, f"{f.name} = r.array({_DTYPE[f.dtype]!r}, {' * '.join(dims)}, {f.name!r}){shape}")
        if f.lo is not None:
            src.raise_if(ind, f"{f.name}.size and {f.name}.min() < {f.lo!r}", "_field",
                         f"{N}: {f.name} must be >= {f.lo}")
        if f.prob:
            src(ind, f"_check_probs({f.name}, {N + ': ' + f.name!r})")
        if f.rows_sum_to_one:
            src(ind, f"_check_rows({f.name}, {N + ': ' + f.name!r})")
    src(1, "r.end()")
    for f in arrays:
        if f.implicit:
            src(1, f"if {f.implicit}:")
            src(2, f"{f.name} = _arange_rows({', '.join(_dim_expr(d) for d in f.shape)})")
    for c in s.checks:
        src.raise_if(1, f"not ({c.expr})", "_field", f"{N}: breaks `{c.expr}` ({c.text})")
    src(1, f"return _cls({', '.join(f'{x.name}={x.name}' for x in dataclasses.fields(s.cls))})")
    return "\n".join(src.lines) + "\n"


def _encoder_source(s: Schema) -> str:
    N = s.name
    fixed, rest = _split(s)
    fields = {f.name for f in dataclasses.fields(s.cls)}
    counts = {f.name: f for f in fixed if isinstance(f, Count)}
    src = _Src()
    src(0, f"def encode_{N}(msg):")
    flags = [(bit, name) for f in fixed if isinstance(f, Flags) for bit, name in f.bits]
    implicit = {f.implicit for f in rest if isinstance(f, Array)}
    for _, name in flags:
        if name in fields or name in implicit:
            src(1, f"{name} = bool(msg.{name})" if name in fields else f"{name} = False")
    for c in counts.values():
        if c.when:
            src(1, f"{c.name} = 0")
    known: set = set()
    seen: set = set()

    def define(ind: int, count: str, value: str) -> None:
        known.add(count)
        src(ind, f"{count} = {value}")
        c = counts[count]
        if _ranged(c):
            src.raise_if(ind, _bad_range(count, c.lo, c.hi), "ValueError",
                         f"{N}: {count} %d must be {_range_words(c.lo, c.hi)}", count)
        for a in rest:  # a flag that takes one off this count needs it >= 1
            for d in getattr(a, "shape", ()):
                cnt, flag = _dim(d)
                if cnt == count and flag and (count, flag) not in seen:
                    seen.add((count, flag))
                    src.raise_if(ind, f"{flag} and not {count}", "ValueError",
                                 f"{N}: with flag {flag}, {count} must be >= 1")

    groups: dict = {}
    parts = []
    for f in rest:
        if isinstance(f, Str):
            text = f"_error_text(msg.{f.name})" if f.cut else f"_utf8(msg.{f.name}, {f.limit}, {f.name!r})"
            parts.append(("", f"_str({text})"))
            continue
        ind = 1
        if f.when:
            if f.when not in groups:
                groups[f.when] = f.name
                src(1, f"{f.when} = msg.{f.name} is not None")
            else:
                src.raise_if(1, f"(msg.{f.name} is not None) != {f.when}", "ValueError",
                             f"{N}: {groups[f.when]} and {f.name} go together")
            src(1, f"{f.name} = None")
            src(1, f"if {f.when}:")
            ind = 2
        conv = "_i32" if f.dtype == "i32" else "_f32"
        if len(f.shape) == 1:
            src(ind, f"{f.name} = {conv}(msg.{f.name}, {f.name!r}).reshape(-1)")
            d = f.shape[0]
            if _dim(d)[0] in known:
                src.raise_if(ind, f"len({f.name}) != {_dim_expr(d)}", "ValueError",
                             f"{N}: {f.name} has %d entries; {d} is %d", f"len({f.name})", _dim_expr(d))
            else:
                define(ind, _dim(d)[0], f"len({f.name})")
        else:
            src(ind, f"{f.name} = np.asarray(msg.{f.name})" if f.implicit else
                f"{f.name} = {conv}(msg.{f.name}, {f.name!r})")
            checks = [f"{f.name}.ndim != {len(f.shape)}"] + [
                f"{f.name}.shape[{i}] != {_dim_expr(d)}" for i, d in enumerate(f.shape) if _dim(d)[0] in known]
            want = ", ".join(f"{d}=%d" for d in f.shape if _dim(d)[0] in known)
            src.raise_if(ind, " or ".join(checks), "ValueError",
                         f"{N}: {f.name} must have shape [{', '.join(f.shape)}] ({want}); got %s",
                         *[_dim_expr(d) for d in f.shape if _dim(d)[0] in known], f"{f.name}.shape")
            for i, d in enumerate(f.shape):
                if _dim(d)[0] not in known:
                    define(ind, _dim(d)[0], f"{f.name}.shape[{i}]")
            if f.implicit:
                src(ind, f"{f.implicit} = _is_dense({f.name})")
                src(ind, f"if not {f.implicit}:")
                src(ind + 1, f"{f.name} = _i32({f.name}, {f.name!r})")
        parts.append((_sent(f), f"_raw({f.name})"))
    values = []
    for f in fixed:
        if isinstance(f, Scalar):
            values.append(f"float(msg.{f.name})" if f.wire == "f64" else f"msg.{f.name}")
        elif isinstance(f, Count):
            values.append(f.name)
        elif isinstance(f, Flags):
            values.append(f"({' | '.join(f'({bit} if {name} else 0)' for bit, name in f.bits)})")
    head = f"_pack(_head, {N!r}, {', '.join(values)})"
    lead = 0  # the parts before the first conditional one go in the list's display
    while lead < len(parts) and not parts[lead][0]:
        lead += 1
    listed = ", ".join([head] + [p for _, p in parts[:lead]])
    if lead == len(parts):
        src(1, f"return _frame(_tag, [{listed}])")
    else:
        src(1, f"parts = [{listed}]")
        for cond, p in parts[lead:]:
            if cond:
                src(1, f"if {cond}:")
            src(2 if cond else 1, f"parts.append({p})")
        src(1, "return _frame(_tag, parts)")
    return "\n".join(src.lines) + "\n"


def _compile(s: Schema) -> None:
    _validate(s)
    fixed, _ = _split(s)
    s.head = struct.Struct("<" + "".join(_fmt(f, True) for f in fixed))
    s.source = _decoder_source(s) + "\n\n" + _encoder_source(s)
    filename = f"<pipesd wire schema {s.name}>"
    linecache.cache[filename] = (len(s.source), None, s.source.splitlines(True), filename)  # readable tracebacks
    ns = {"__name__": __name__, "np": np, "_cls": s.cls, "_tag": bytes((s.tag,)), "_head": s.head,
          "_unpack": struct.Struct("<" + "".join(_fmt(f, False) for f in fixed)), "_bad": _bad, "_field": _field,
          "_check_probs": _check_probs, "_check_rows": _check_rows, "_arange_rows": _arange_rows, "_i32": _i32,
          "_f32": _f32, "_raw": _raw, "_is_dense": _is_dense, "_utf8": _utf8, "_str": _str,
          "_error_text": _error_text, "_pack": _pack, "_frame": _frame}
    exec(compile(s.source, filename, "exec"), ns)
    _DECODERS[s.tag] = ns[f"decode_{s.name}"]
    _ENCODERS[s.cls] = ns[f"encode_{s.name}"]
    _TYPE_NAMES[s.tag] = s.name
    SCHEMAS[s.cls] = s


for _s in _WIRE:
    _compile(_s)
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
        words = (["finite"] if f.wire == "f64" else []) + ([_range_words(f.lo, f.hi)] if _ranged(f) else [])
    elif isinstance(f, Count):
        rng = _range_words(f.lo, f.hi) if _ranged(f) else ""
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
    return struct.calcsize("<" + _fmt(f, True)), "", 0


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
