"""The edge's side of a session: what it drafted, what is committed, what a verdict does.

:class:`EdgeSession` belongs to the thread that drafts (the only one that touches the draft
model): :meth:`EdgeSession.on_draft` after each draft step, :meth:`EdgeSession.on_verdict` for
each verdict, :meth:`EdgeSession.may_draft` before the next step. :class:`SendState` belongs to
the thread that frames batches; it sees only what the ring carries (records stamped with an
epoch and flags), never the EdgeSession. Terms: :mod:`pipesd.protocol`.

Positions here are *run* positions (``0`` = first token after the user's prompt); a cloud
session re-opened after a loss starts at run position ``base``, so wire position =
run position - ``base``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pipesd.protocol.common import SETTLED_KEPT, SETTLED_NONE, SETTLED_VOID, ProtocolViolation

__all__ = ["EdgeSession", "SendState", "VerdictOutcome"]

STOP_REASONS = ("lookahead", "end", "eos")  # the edge stops drafting until a verdict


@dataclass
class VerdictOutcome:
    """What a verdict did. The caller applies the draft-cache edits: on ``rollback_at`` crop the
    draft's sequence to that run position, then feed ``extend``."""

    stale: bool = False  # an older epoch or an unexpected start: nothing changed
    new: list = field(default_factory=list)  # tokens committed by this verdict
    moved: bool = False  # drafting restarts from a new last token (rollback or bonus extension)
    rollback_at: Optional[int] = None  # drafts from here on were void (epoch bumped)
    extend: list = field(default_factory=list)  # tokens to feed the draft model after the crop
    bonus: bool = False  # the verdict carried a bonus (full acceptance)
    bonus_kept: bool = False  # ... equal to the edge's draft there: its later drafts stood
    complete: bool = False  # the run is over (finished, max_new, EOS committed)
    eos: bool = False


@dataclass
class EdgeSession:
    """Drafts and commits of one generation run (see the module docstring)."""

    max_new: int
    eos_id: Optional[int] = None
    lookahead: int = 48
    pipeline: bool = True  # keep drafting while a verdict is awaited
    seq: list = field(default_factory=list)  # committed tokens, then this epoch's drafts
    committed: int = 0
    epoch: int = 0
    base: int = 0  # run position of the cloud session's position 0
    stop_at: int = -1  # no drafting at or past this position until a verdict (-1: max_new)
    awaiting: bool = False  # a verify request is out
    stream_left: int = 0  # tokens the cloud still streams (:meth:`request_stream`): no drafting meanwhile
    tree: Optional[tuple] = None  # (tokens, parents) of the tree request out (:meth:`request_tree`)

    def __post_init__(self) -> None:
        if self.stop_at < 0:
            self.stop_at = self.max_new

    def reopen(self) -> None:
        """A fresh cloud session on prompt + committed output: positions restart there."""
        self.base = self.committed
        self.epoch = 0
        self.awaiting = False
        self.stop_at = self.max_new
        self.stream_left = 0
        self.tree = None

    def request_tree(self, tokens, parents) -> int:
        """Send a draft tree for verification (a serial round); returns the wire position it
        starts at. Needs nothing drafted past the committed prefix and no request out."""
        if len(self.seq) != self.committed or self.awaiting or self.stream_left or self.tree is not None:
            raise ValueError("a tree request needs no drafts past the committed prefix and no request out")
        toks, par = [int(t) for t in tokens], [int(p) for p in parents]
        if not toks or len(par) != len(toks) or any(not -1 <= p < i for i, p in enumerate(par)):
            raise ValueError("a tree needs >= 1 node and parents[i] in [-1, i) for each node")
        self.tree, self.awaiting = (toks, par), True
        return self.wire_pos(self.committed)

    def on_tree_verdict(self, *, epoch: int, start_pos: int, path, token: int, rejected: bool, verified_len: int,
                        finished: bool) -> VerdictOutcome:
        """Commit the accepted path of the tree out, then the correction or bonus. Raises
        :class:`ProtocolViolation` for a path that is not a root-to-node chain of that tree,
        or a verified length that does not add up."""
        start = start_pos + self.base
        if self.tree is None or epoch != self.epoch or start != self.committed:
            return VerdictOutcome(stale=True)
        toks, par = self.tree
        prev = -1
        for node in (int(x) for x in path):
            if not (0 <= node < len(toks)) or par[node] != prev:
                raise ProtocolViolation("field", f"tree path node {node} is not a child of {prev}")
            prev = node
        if rejected and prev not in set(par):
            raise ProtocolViolation("field", f"a correction after leaf {prev} (only a bonus follows a leaf)")
        new = [toks[i] for i in path] + ([int(token)] if token >= 0 else [])
        if verified_len + self.base != start + len(new):
            raise ProtocolViolation("field", f"verified length {verified_len} after {len(new)} tokens from {start_pos}")
        self.tree, self.awaiting = None, False
        self.seq.extend(new)
        self.committed += len(new)
        out = VerdictOutcome(new=new, moved=bool(new), extend=list(new), bonus=token >= 0 and not rejected)
        out.eos = self.eos_id is not None and self.eos_id in new
        out.complete = finished or self.committed >= self.max_new or out.eos
        return out

    def request_stream(self, budget: int) -> int:
        """Ask the cloud to decode up to ``budget`` tokens alone (the ``cloud-stream`` method);
        returns the wire position the request starts at. Needs nothing drafted past the
        committed prefix and no request out; no drafting until the stream's last verdict."""
        if budget < 1:
            raise ValueError(f"stream budget must be >= 1, got {budget}")
        if len(self.seq) != self.committed or self.awaiting or self.stream_left:
            raise ValueError("a stream request needs no drafts past the committed prefix and no request out")
        self.stream_left = min(int(budget), self.max_new - self.committed)
        return self.wire_pos(self.committed)

    def may_draft(self) -> bool:
        """False while drafting must pause for a verdict: at the lookahead cap, past EOS or
        the length, while the cloud streams or a tree is out, or (serial methods) while a request is out."""
        pos = len(self.seq)
        return pos < self.stop_at and pos - self.committed < self.lookahead and not self.stream_left and not (
            self.awaiting and not self.pipeline) and self.tree is None

    def on_draft(self, token: int, reason: Optional[str]) -> tuple[int, Optional[str]]:
        """Record a draft at the next position; ``reason`` is the trigger's (None: no verify).
        Returns ``(position, reason)`` with the protocol's own reasons added: ``"eos"``,
        ``"end"`` (max_new) or ``"lookahead"``; a reason means: verify through this token."""
        pos = len(self.seq)
        if self.eos_id is not None and token == self.eos_id:
            reason, self.stop_at = "eos", pos + 1
        elif pos + 1 >= self.max_new:
            reason = "end"
        elif pos + 1 - self.committed >= self.lookahead:
            reason = "lookahead"
        if reason is not None:
            self.awaiting = True
        self.seq.append(int(token))
        return pos, reason

    def wire_pos(self, run_pos: int) -> int:
        return run_pos - self.base

    def on_verdict(self, *, epoch: int, start_pos: int, end_pos: int, accepted: int, token: int,
                   rejected: bool, verified_len: int, finished: bool, settled: int = SETTLED_NONE) -> VerdictOutcome:
        """Commit, keep or void per the verdict (positions in the cloud session's frame).
        Raises :class:`ProtocolViolation` when the cloud's ``settled`` contradicts the drafts."""
        start = start_pos + self.base
        if epoch != self.epoch or start != self.committed:
            return VerdictOutcome(stale=True)
        out = VerdictOutcome(new=list(self.seq[start: start + accepted]))
        if token >= 0:
            at = start + accepted
            out.new.append(int(token))
            out.bonus = not rejected
            self._continue(out, at, int(token), rejected, settled)
        self.committed = verified_len + self.base
        if finished and len(self.seq) > self.committed:
            del self.seq[self.committed:]
        if out.moved:
            self.stop_at, self.awaiting = self.max_new, False
        elif end_pos + self.base >= len(self.seq):
            self.awaiting = False  # nothing past the verified segment: no request is out
        eos = self.eos_id is not None and self.eos_id in out.new
        out.eos = eos
        out.complete = finished or self.committed >= self.max_new or eos
        if self.stream_left:
            self.stream_left = 0 if out.complete else max(0, self.stream_left - len(out.new))
        return out

    def _continue(self, out: VerdictOutcome, at: int, token: int, rejected: bool, settled: int) -> None:
        """The correction or bonus at ``at``: the continuation rule."""
        have = len(self.seq) > at
        if not rejected and have and self.seq[at] == token:
            if settled == SETTLED_VOID:
                raise ProtocolViolation("field", f"the cloud voided a draft at {at} that equals its bonus")
            out.bonus_kept = True
            return
        if not rejected and not have:
            if settled != SETTLED_NONE:
                raise ProtocolViolation("field", f"the cloud settled a draft at {at} the edge never made")
            self.seq.append(token)  # nothing drafted there yet: the bonus extends the sequence
            out.moved, out.extend = True, [token]
            return
        if not rejected and settled == SETTLED_KEPT:
            raise ProtocolViolation("field", f"the cloud kept a draft at {at} that differs from its bonus")
        del self.seq[at:]  # a correction, or a bonus unequal to the draft there: void past it
        self.seq.append(token)
        self.epoch += 1
        out.moved, out.rollback_at, out.extend = True, at, [token]


class SendState:
    """The framing thread's protocol state: the epoch of the records it ships and where its last
    verify request ended (the next record there goes as a hint). Records of an older epoch are
    void; a newer epoch resets it."""

    __slots__ = ("epoch", "base", "await_pos")

    def __init__(self, epoch: int = 0, base: int = 0) -> None:
        self.epoch = epoch
        self.base = base
        self.await_pos: Optional[int] = None

    def admit(self, record_epoch: int) -> bool:
        """True for a record of the current epoch (a newer one starts it); False: void."""
        if record_epoch > self.epoch:
            self.epoch, self.await_pos = record_epoch, None
        return record_epoch == self.epoch

    def frame(self, first_pos: int, n: int, verify: bool) -> tuple[int, bool]:
        """Frame ``n`` records from run position ``first_pos``: returns ``(wire first_pos, hint)``.
        The first record after a verify request is its bonus position: it goes as a hint."""
        hint = first_pos == self.await_pos
        if verify:
            self.await_pos = first_pos + n
        return first_pos - self.base, hint
