"""The wire's schema language and its compiler.

Every message of :mod:`pipesd.transport.messages` is declared once, as a :class:`Schema` (in
:data:`pipesd.transport.codec.SCHEMAS`): its fields in wire order (:class:`Scalar`,
:class:`Count`, :class:`Flags`, :class:`Pad`, :class:`Array`, :class:`Str`, each with its
limits) and its cross-field :class:`Check` rules. That one declaration drives the encoder, the
decoder, the validation on receipt and the field tables of ``docs/wire.md``, so the four cannot
drift apart.

:func:`compile_schema` turns a schema into straight-line Python source, one encoder and one
decoder per message (like ``dataclasses`` generates ``__init__``: no interpreter loop over the
fields at run time, so it costs what a hand-written codec would), and executes it against a
namespace the caller passes in: the codec's runtime helpers (:data:`HELPERS` lists the names
the generated code calls). This module knows nothing of frames or buffers beyond those names.
"""
from __future__ import annotations

import ast
import dataclasses
import linecache
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from pipesd.transport import messages as M

__all__ = ["Scalar", "Count", "Flags", "Pad", "Array", "Str", "Check", "Schema", "HELPERS", "compile_schema",
           "validate", "ranged", "range_words", "wire_format"]


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


HELPERS = {
    "np": "numpy",
    "_bad": "(text[, code]) -> the ProtocolError for a malformed frame",
    "_field": "(text[, code]) -> the ProtocolError for a field that breaks its rule",
    "_check_probs": "(array, what): raise _field unless finite probabilities in [0, 1]",
    "_check_rows": "(array, what): raise _field unless every row sums to 1",
    "_arange_rows": "(rows, k) -> the implicit [rows, k] array of rows 0 .. k-1",
    "_i32": "(value, what) -> a contiguous little-endian int32 array (TypeError for non-integers)",
    "_f32": "(value, what) -> a contiguous little-endian float32 array",
    "_raw": "(array) -> its bytes as a 1-D uint8 view",
    "_is_dense": "(ids) -> True when every row of the 2-D ids is 0 .. k-1",
    "_utf8": "(text, limit, what) -> its UTF-8 (ValueError over limit, TypeError for a non-str)",
    "_error_text": "(text) -> its UTF-8, cut at a character boundary to fit",
    "_str": "(utf8) -> the u16 length prefix + utf8",
    "_pack": "(struct, what, *values) -> bytes (ValueError for a value the wire type cannot hold)",
    "_frame": "(tag byte, parts) -> the whole frame, length prefix included",
}
"""The names the generated code calls, and what each must do: :func:`compile_schema`'s
``helpers`` supplies them. A decoder also takes a reader ``r`` with ``unpack(struct)``,
``string(limit, field)``, ``array(dtype, count, field)`` and ``end()``."""


# ----------------------------------------------------------------------------- schema -> code
_DTYPE = {"i32": "<i4", "f32": "<f4"}
_SCALAR = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "i64": "q", "f64": "d"}
_FIXED = (Scalar, Count, Flags, Pad)


def compile_schema(s: Schema, helpers: dict) -> tuple[Callable, Callable]:
    """Validate ``s``, set ``s.head`` and ``s.source``, and return its ``(decoder, encoder)``:
    ``decoder(reader) -> message`` and ``encoder(message) -> frame``.

    The generated functions see ``helpers`` (every name of :data:`HELPERS`; its
    ``"__name__"``, if any, becomes their ``__module__``) and nothing else of the caller's.
    A schema that contradicts its dataclass or itself raises ``TypeError``: a bug, at import.
    """
    missing = sorted(set(HELPERS) - set(helpers))
    if missing:
        raise TypeError(f"{s.name}: the generated code needs helpers {missing}")
    validate(s)
    fixed, _ = _split(s)
    s.head = struct.Struct("<" + "".join(wire_format(f, True) for f in fixed))
    s.source = _decoder_source(s) + "\n\n" + _encoder_source(s)
    filename = f"<pipesd wire schema {s.name}>"
    linecache.cache[filename] = (len(s.source), None, s.source.splitlines(True), filename)  # readable tracebacks
    ns = {"__name__": __name__, **helpers, "_cls": s.cls, "_tag": bytes((s.tag,)), "_head": s.head,
          "_unpack": struct.Struct("<" + "".join(wire_format(f, False) for f in fixed))}
    exec(compile(s.source, filename, "exec"), ns)
    return ns[f"decode_{s.name}"], ns[f"encode_{s.name}"]


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


def ranged(f) -> bool:
    """``f`` (a :class:`Scalar` or :class:`Count`) has a bound."""
    return f.lo is not None or f.hi is not None


def _bad_range(var: str, lo, hi) -> str:
    """A condition true when ``var`` is outside ``[lo, hi]`` (None: unbounded)."""
    if lo is not None and hi is not None:
        return f"not {lo!r} <= {var} <= {hi!r}"
    return f"{var} < {lo!r}" if lo is not None else f"{var} > {hi!r}"


def range_words(lo, hi) -> str:
    """``[lo, hi]`` in words (error messages and ``docs/wire.md``)."""
    if lo is not None and hi is not None:
        return f"in [{_num(lo)}, {_num(hi)}]"
    return f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}"


def _num(x) -> str:
    """2^20 rather than 1048576 (docs and messages)."""
    if isinstance(x, int) and x >= 1024 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:g}"


def validate(s: Schema) -> None:
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
    off, after_str = 1 + struct.calcsize("<" + "".join(wire_format(f, True) for f in fixed)), False
    for f in rest:
        if isinstance(f, Array) and (off % 4 or after_str):
            raise TypeError(f"{s.name}.{f.name}: the array would not start 4-aligned (pad the header)")
        after_str |= isinstance(f, Str)


def wire_format(f, pack: bool) -> str:
    """The ``struct`` format of a fixed field; padding as ``x`` to pack, as ``s`` to unpack (and check)."""
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

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# ----------------------------------------------------------------------------- the decoder
def _decoder_source(s: Schema) -> str:
    N = s.name
    fixed, rest = _split(s)
    src = _Src()
    src(0, f"def decode_{N}(r):")
    _decode_head(src, N, fixed)
    arrays = [f for f in rest if isinstance(f, Array)]
    for flag, when in dict.fromkeys((a.implicit, a.when) for a in arrays if a.implicit):
        src.raise_if(1, f"{flag} and not {when}", "_field", f"{N}: flag {flag} without flag {when}")
    for count, flag in dict.fromkeys(_dim(d) for a in arrays for d in a.shape if _dim(d)[1]):
        src.raise_if(1, f"{flag} and not {count}", "_field", f"{N}: with flag {flag}, {count} must be >= 1")
    for f in rest:
        if isinstance(f, Str):
            src(1, f"{f.name} = r.string({f.limit}, {f.name!r})")
        else:
            _decode_array(src, N, f)
    src(1, "r.end()")
    for f in arrays:
        if f.implicit:
            src(1, f"if {f.implicit}:")
            src(2, f"{f.name} = _arange_rows({', '.join(_dim_expr(d) for d in f.shape)})")
    for c in s.checks:
        src.raise_if(1, f"not ({c.expr})", "_field", f"{N}: breaks `{c.expr}` ({c.text})")
    src(1, f"return _cls({', '.join(f'{x.name}={x.name}' for x in dataclasses.fields(s.cls))})")
    return src.text()


def _decode_head(src: _Src, N: str, fixed: list) -> None:
    """Unpack the fixed fields; check padding, flags, numbers and counts."""
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
            if ranged(f):
                src.raise_if(1, _bad_range(f.name, f.lo, f.hi), "_field",
                             f"{N}: {f.name} %r must be {range_words(f.lo, f.hi)}", f.name)
        elif isinstance(f, Count):
            _decode_count(src, N, f)


def _decode_count(src: _Src, N: str, f: Count) -> None:
    cond = _bad_range(f.name, f.lo, f.hi) if ranged(f) else ""
    if f.when:
        src(1, f"if {f.when}:")
        if cond:
            src.raise_if(2, cond, "_field", f"{N}: {f.name} %d must be {range_words(f.lo, f.hi)}",
                         f.name, code=f.code)
        else:
            src(2, "pass")
        src(1, f"elif {f.name}:")
        src.raise_(2, "_field", f"{N}: {f.name} %d without flag {f.when} (must be 0)", f.name)
    elif cond:
        src.raise_if(1, cond, "_field", f"{N}: {f.name} %d must be {range_words(f.lo, f.hi)}", f.name,
                     code=f.code)


def _decode_array(src: _Src, N: str, f: Array) -> None:
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


# ----------------------------------------------------------------------------- the encoder
class _Counts:
    """The counts an encoder being generated has defined so far."""

    def __init__(self, s: Schema, src: _Src) -> None:
        fixed, self.rest = _split(s)
        self.N, self.src = s.name, src
        self.counts = {f.name: f for f in fixed if isinstance(f, Count)}
        self.known: set = set()
        self.seen: set = set()  # (count, flag) pairs already checked

    def define(self, ind: int, count: str, value: str) -> None:
        """``count = value``, checked against its range and the flags that take one off it."""
        N, src = self.N, self.src
        self.known.add(count)
        src(ind, f"{count} = {value}")
        c = self.counts[count]
        if ranged(c):
            src.raise_if(ind, _bad_range(count, c.lo, c.hi), "ValueError",
                         f"{N}: {count} %d must be {range_words(c.lo, c.hi)}", count)
        for a in self.rest:  # a flag that takes one off this count needs it >= 1
            for d in getattr(a, "shape", ()):
                cnt, flag = _dim(d)
                if cnt == count and flag and (count, flag) not in self.seen:
                    self.seen.add((count, flag))
                    src.raise_if(ind, f"{flag} and not {count}", "ValueError",
                                 f"{N}: with flag {flag}, {count} must be >= 1")


def _encoder_source(s: Schema) -> str:
    fixed, rest = _split(s)
    src = _Src()
    src(0, f"def encode_{s.name}(msg):")
    _encode_flags(src, s, fixed, rest)
    counts = _Counts(s, src)
    groups: dict = {}  # when-flag -> the first array that sets it
    parts = []
    for f in rest:
        if isinstance(f, Str):
            text = f"_error_text(msg.{f.name})" if f.cut else f"_utf8(msg.{f.name}, {f.limit}, {f.name!r})"
            parts.append(("", f"_str({text})"))
        else:
            _encode_array(src, s.name, f, groups, counts)
            parts.append((_sent(f), f"_raw({f.name})"))
    _encode_frame(src, s.name, fixed, parts)
    return src.text()


def _encode_flags(src: _Src, s: Schema, fixed: list, rest: list) -> None:
    """Start every flag (from the message, or False when derived) and every conditional count (0)."""
    fields = {f.name for f in dataclasses.fields(s.cls)}
    implicit = {f.implicit for f in rest if isinstance(f, Array)}
    flags = [name for f in fixed if isinstance(f, Flags) for _, name in f.bits]
    for name in flags:
        if name in fields or name in implicit:
            src(1, f"{name} = bool(msg.{name})" if name in fields else f"{name} = False")
    for c in fixed:
        if isinstance(c, Count) and c.when:
            src(1, f"{c.name} = 0")


def _encode_array(src: _Src, N: str, f: Array, groups: dict, counts: _Counts) -> None:
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
    known = counts.known
    if len(f.shape) == 1:
        src(ind, f"{f.name} = {conv}(msg.{f.name}, {f.name!r}).reshape(-1)")
        d = f.shape[0]
        if _dim(d)[0] in known:
            src.raise_if(ind, f"len({f.name}) != {_dim_expr(d)}", "ValueError",
                         f"{N}: {f.name} has %d entries; {d} is %d", f"len({f.name})", _dim_expr(d))
        else:
            counts.define(ind, _dim(d)[0], f"len({f.name})")
        return
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
            counts.define(ind, _dim(d)[0], f"{f.name}.shape[{i}]")
    if f.implicit:
        src(ind, f"{f.implicit} = _is_dense({f.name})")
        src(ind, f"if not {f.implicit}:")
        src(ind + 1, f"{f.name} = _i32({f.name}, {f.name!r})")


def _encode_frame(src: _Src, N: str, fixed: list, parts: list) -> None:
    """Pack the fixed fields and join them with ``parts`` (``(condition, expression)``) into the frame."""
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
