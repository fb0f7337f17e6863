"""The cloud's side of a session: pending drafts, verification jobs, verdicts.

One :class:`CloudSession` per edge stream. The server's event loop calls :meth:`on_batch` for
every draft batch and :meth:`take_job` when :attr:`ready`; the verifier scores the job and
calls :meth:`judge` (reads only what no batch can change while the job runs); the loop then
calls :meth:`apply` and sends the verdict it returns. Terms: :mod:`pipesd.protocol`.

    verified [0, v)  |  pending [v, v + len(pending))
    batch(epoch == e, first_pos == v + len(pending)) -> appended
    batch(epoch <  e) -> stale; first_pos < expected -> duplicate (both dropped, nothing changes)
    verify flag -> a job over pending[: through that batch], stopping before a pending hint
    stream request(first_pos == v, nothing pending) -> a job of zero drafts per round, until the budget
    tree request(first_pos == v, nothing pending) -> one job over the tree; its verdict commits a path

A **stream** (the ``cloud-stream`` method) is the cloud decoding alone: each job has no drafts,
so its verdict's bonus is the target's next token; the session takes no drafts meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pipesd.protocol.common import SETTLED_KEPT, SETTLED_NONE, SETTLED_VOID, ProtocolViolation

__all__ = ["CloudSession", "Job", "Judged", "PendingDrafts"]


class PendingDrafts:
    """Drafts received and not yet verified, one entry per position from the verified length:
    the token, its q row (ids, probs; None for greedy sessions and hints) and the wire bytes it
    holds against the client's in-flight limit."""

    __slots__ = ("tokens", "q_ids", "q_probs", "nbytes")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.q_ids: list[Any] = []
        self.q_probs: list[Any] = []
        self.nbytes: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int], q_ids: Sequence[Any], q_probs: Sequence[Any], nbytes: int) -> None:
        self.tokens.extend(int(t) for t in tokens)
        self.q_ids.extend(q_ids)
        self.q_probs.extend(q_probs)
        self.nbytes.extend([nbytes] * len(tokens))

    def drop_front(self, n: int) -> None:
        for lst in (self.tokens, self.q_ids, self.q_probs, self.nbytes):
            del lst[:n]

    def clear(self) -> None:
        self.drop_front(len(self.tokens))

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes)


@dataclass
class Job:
    """One verification: score ``drafts`` at positions ``[start, start + len(drafts))``."""

    epoch: int
    start: int
    drafts: list
    q_ids: list  # per draft: int ids of its q (sampling), else None
    q_probs: list
    echo_sent_at: float = 0.0
    stream: bool = False  # a stream's job (no drafts: the target's next token)
    parents: Optional[list] = None  # a tree's job: node i's parent (-1 the root); q_ids/q_probs
    # then have one entry per node plus the root (index 0 the root, i + 1 node i; None: no children)

    @property
    def tree(self) -> bool:
        return self.parents is not None


@dataclass
class Judged:
    """A scored job after the clipping rules (max_new_tokens, EOS): what to commit and report."""

    job: Job
    accepted: int  # drafts accepted (after clipping)
    token: int  # the target's token at start + accepted (correction or bonus); -1 none
    rejected: bool
    new: list  # tokens committed: the accepted drafts, then ``token`` when >= 0
    finished: bool
    path: Optional[list] = None  # a tree's job: the accepted nodes, root to leaf (after clipping)

    @property
    def end(self) -> int:
        return self.job.start + len(self.job.drafts)

    @property
    def wasted(self) -> int:
        return len(self.job.drafts) - self.accepted


@dataclass
class CloudSession:
    """The protocol state of one cloud session (see the module docstring)."""

    max_new_tokens: int
    eos_id: Optional[int] = None
    max_in_flight: int = 256  # pending drafts at most
    epoch: int = 0
    generated: list = field(default_factory=list)  # committed tokens
    pending: PendingDrafts = field(default_factory=PendingDrafts)
    verify_upto: int = 0  # pending drafts the open request covers
    requested: bool = False  # a verify request is open
    hints: set = field(default_factory=set)  # positions of pending hints
    unsettled: Optional[int] = None  # a bonus position whose draft had not arrived (SETTLED_NONE)
    echo_sent_at: float = 0.0
    busy: bool = False  # a job is out
    finished: bool = False
    stream_left: int = 0  # tokens a stream request still asks for (see :meth:`on_stream`)
    closed: bool = False  # the edge closed the session (or the server dropped it): no more jobs
    tree: Optional[Job] = None  # a tree request not yet taken (see :meth:`on_tree`)
    tree_open: bool = False  # a tree request is taken and not yet answered

    # ------------------------------------------------------------------ batches
    def on_batch(self, epoch: int, first_pos: int, tokens: Sequence[int], q_ids=None, q_probs=None, *,
                 verify: bool = False, hint: bool = False, sent_at: float = 0.0, nbytes: int = 8) -> str:
        """Take one draft batch: ``"taken"``, ``"stale"``, ``"duplicate"``, ``"settled"`` (it
        settled a bonus and was void) or ``"finished"``. ``q_ids``/``q_probs``: one row per
        token (none for a hint's first token), or None. ``nbytes``: wire bytes per token held.
        Raises :class:`ProtocolViolation` for a gap, an epoch ahead, too many drafts, or drafts
        while the session streams."""
        if self.finished or self.closed:
            return "finished"
        if self.stream_left:
            if epoch < self.epoch:
                return "stale"
            if first_pos < len(self.generated) + len(self.pending):
                return "duplicate"
            raise ProtocolViolation("field", "a draft batch while the session streams")
        if self.unsettled is not None:
            settle = self._settle(epoch, first_pos, tokens)
            if settle == "void":
                return "settled"
            if settle == "trim":  # the matching draft at the bonus position: already committed
                first_pos, tokens = first_pos + 1, tokens[1:]
                if hint:
                    hint = False  # a hint carries no q row
                elif q_ids is not None:
                    q_ids, q_probs = q_ids[1:], q_probs[1:]
        if epoch < self.epoch:
            return "stale"
        if epoch > self.epoch:
            raise ProtocolViolation("field", f"epoch {epoch} is ahead of the session's {self.epoch}")
        expected = len(self.generated) + len(self.pending)
        n = len(tokens)
        if first_pos < expected:
            return "duplicate"  # a replay of a batch already taken (empty ones too)
        if n and first_pos != expected:
            raise ProtocolViolation("field", f"batch starts at {first_pos}, expected {expected} (gap)")
        if len(self.pending) + n > self.max_in_flight:
            raise ProtocolViolation("limit", f"more than {self.max_in_flight} draft tokens in flight")
        if n:
            rows_i = list(q_ids) if q_ids is not None else [None] * (n - hint)
            rows_p = list(q_probs) if q_probs is not None else [None] * (n - hint)
            if hint:
                self.hints.add(first_pos)
                rows_i, rows_p = [None] + rows_i, [None] + rows_p
            self.pending.extend(tokens, rows_i, rows_p, nbytes)
        if verify:
            self.verify_upto = len(self.pending)
            self.echo_sent_at = sent_at
            self.requested = True
        return "taken"

    def on_stream(self, epoch: int, first_pos: int, budget: int, *, sent_at: float = 0.0) -> str:
        """Take a stream request: decode up to ``budget`` tokens from ``first_pos`` (the verified
        length) with the target alone, one job of zero drafts per verification round, one verdict
        each, until the budget, EOS or max_new_tokens. Returns ``"taken"``, ``"stale"``,
        ``"duplicate"`` or ``"finished"``; raises :class:`ProtocolViolation` for a gap, an epoch
        ahead, a budget below 1, or drafts pending (a stream starts from a settled state)."""
        if self.finished or self.closed:
            return "finished"
        if budget < 1:
            raise ProtocolViolation("field", f"stream budget {budget} < 1")
        if self.unsettled is not None:
            self._settle(epoch, first_pos, ())
        if epoch < self.epoch:
            return "stale"
        if epoch > self.epoch:
            raise ProtocolViolation("field", f"epoch {epoch} is ahead of the session's {self.epoch}")
        verified = len(self.generated)
        if first_pos < verified:
            return "duplicate"
        if len(self.pending) or self.requested:
            raise ProtocolViolation("field", "a stream request while drafts are pending or a verify request is open")
        if first_pos != verified:
            raise ProtocolViolation("field", f"stream request at {first_pos}, expected {verified} (gap)")
        self.stream_left = int(budget)
        self.echo_sent_at = sent_at
        return "taken"

    def on_tree(self, epoch: int, first_pos: int, tokens: Sequence[int], parents: Sequence[int],
                q_rows=None, q_ids=None, q_probs=None, *, sent_at: float = 0.0) -> str:
        """Take a tree request: one job over a draft tree below the verified length ``first_pos``
        (a serial round: nothing may be pending, no request open). ``q_rows``/``q_ids``/``q_probs``
        (sampling; None for greedy): per row, the node (-1 the root) whose children were drawn
        from it; every node with children needs exactly one row, and every node's token must be
        in its parent's q with probability > 0 (the multi-candidate rule reads them). Returns
        ``"taken"``, ``"stale"``, ``"duplicate"`` or ``"finished"``; raises
        :class:`ProtocolViolation` for a malformed tree, a gap, an epoch ahead or drafts pending."""
        if self.finished or self.closed:
            return "finished"
        if self.unsettled is not None:
            self._settle(epoch, first_pos, ())
        if epoch < self.epoch:
            return "stale"
        if epoch > self.epoch:
            raise ProtocolViolation("field", f"epoch {epoch} is ahead of the session's {self.epoch}")
        verified = len(self.generated)
        if first_pos < verified or (self.tree_open and first_pos == verified):
            return "duplicate"  # a replay of a tree already taken (answered, or being verified)
        if len(self.pending) or self.requested or self.stream_left or self.busy:
            raise ProtocolViolation("field", "a tree request while drafts are pending or a request is open")
        if first_pos != verified:
            raise ProtocolViolation("field", f"tree request at {first_pos}, expected {verified} (gap)")
        toks, par = [int(t) for t in tokens], [int(p) for p in parents]
        n = len(toks)
        if n < 1 or len(par) != n:
            raise ProtocolViolation("field", f"a tree needs >= 1 node and one parent per node ({n} tokens, {len(par)} parents)")
        for i, p in enumerate(par):
            if not -1 <= p < i:
                raise ProtocolViolation("field", f"tree parents[{i}] = {p}: must be in [-1, {i}) (parents first)")
        rows_i: list = [None] * (n + 1)
        rows_p: list = [None] * (n + 1)
        if q_rows is not None:
            has_child = {p for p in par}
            for j, node in enumerate(int(x) for x in q_rows):
                if node not in has_child:
                    raise ProtocolViolation("field", f"q row {j} is for node {node}, which has no children")
                if rows_i[node + 1] is not None:
                    raise ProtocolViolation("field", f"two q rows for node {node}")
                rows_i[node + 1], rows_p[node + 1] = q_ids[j], q_probs[j]
            for i, p in enumerate(par):
                qi, qp = rows_i[p + 1], rows_p[p + 1]
                if qi is None:
                    raise ProtocolViolation("field", f"node {p} has children but no q row")
                if not any(int(a) == toks[i] and float(b) > 0 for a, b in zip(qi, qp)):
                    raise ProtocolViolation("field", f"tree node {i}'s token is not in its parent's q")
        self.tree = Job(self.epoch, verified, toks, rows_i, rows_p, sent_at, parents=par)
        self.tree_open = True
        return "taken"

    def close(self) -> None:
        """The session is gone: nothing pending, no more jobs (a stream stops here)."""
        self.closed = True
        self.stream_left = 0
        self.tree = None
        self._void()

    def _settle(self, epoch: int, first_pos: int, tokens: Sequence[int]) -> str:
        """Settle an unsettled bonus at ``c`` from the first batch after it: ``"void"`` (the
        draft at c differed: the epoch moved; the batch is void), ``"trim"`` (it matched: drop
        it from the batch), ``"keep"`` (nothing to compare: take the batch as it is)."""
        c, verified = self.unsettled, len(self.generated)
        if epoch == self.epoch + 1 and first_pos == verified:  # the edge saw a mismatch
            self.epoch += 1
            self.unsettled = None
            return "keep"
        if epoch != self.epoch:
            return "keep"  # stale, or an error the normal checks report
        if first_pos == c and len(tokens):
            self.unsettled = None
            if int(tokens[0]) != self.generated[c]:
                self._void()
                self.epoch += 1
                return "void"
            return "trim"
        if first_pos >= verified:
            self.unsettled = None  # the edge had no draft at c (or dropped the matching one)
        return "keep"

    # ------------------------------------------------------------------ jobs
    @property
    def ready(self) -> bool:
        """A verify request is open (or a stream goes on), no job is out and the session goes on."""
        return ((self.requested or self.stream_left > 0 or self.tree is not None) and not self.busy
                and not self.finished and not self.closed)

    def take_job(self) -> Job:
        """The next job: pending drafts through the request, stopping before a pending hint
        (that job's bonus settles it); the rest of the request stays open. Streaming: a job of
        zero drafts (its bonus is the target's next token). A tree request: its one job."""
        if self.tree is not None:
            job, self.tree, self.busy = self.tree, None, True
            return job
        if not self.requested:
            self.busy = True
            return Job(self.epoch, len(self.generated), [], [], [], self.echo_sent_at, stream=True)
        n = self.verify_upto
        if self.hints:
            n = min(n, min(self.hints) - len(self.generated))
        p = self.pending
        job = Job(self.epoch, len(self.generated), p.tokens[:n], p.q_ids[:n], p.q_probs[:n], self.echo_sent_at)
        self.requested = n < self.verify_upto
        self.busy = True
        return job

    def judge(self, job: Job, accepted: int, target_tokens: Sequence[int]) -> Judged:
        """Clip a scored job at max_new_tokens and EOS (nothing past them is ever committed).
        ``target_tokens``: the accepted drafts then the target's token (the verifier's output)."""
        new = [int(t) for t in target_tokens]
        rejected = accepted < len(job.drafts)
        token = new[accepted] if len(new) > accepted else -1
        room = self.max_new_tokens - job.start
        finished = False
        if len(new) >= room:
            new, finished = new[:room], True
        if self.eos_id is not None and self.eos_id in new:
            new, finished = new[: new.index(self.eos_id) + 1], True
        if len(new) <= accepted:  # clipped before the correction
            token = -1
        return Judged(job, min(accepted, len(new)), token, rejected, new, finished)

    def judge_tree(self, job: Job, path: Sequence[int], target_tokens: Sequence[int]) -> Judged:
        """A scored tree job: ``path`` the accepted nodes (0-based, root to leaf), ``target_tokens``
        their tokens then the target's token after them; clipped as :meth:`judge`."""
        path = [int(x) for x in path]
        new = [int(t) for t in target_tokens]
        last = path[-1] if path else -1
        rejected = last in set(job.parents)  # the last accepted node has children, none accepted
        token = new[len(path)] if len(new) > len(path) else -1
        room = self.max_new_tokens - job.start
        finished = False
        if len(new) >= room:
            new, finished = new[:room], True
        if self.eos_id is not None and self.eos_id in new:
            new, finished = new[: new.index(self.eos_id) + 1], True
        if len(new) <= len(path):
            token = -1
        path = path[: min(len(path), len(new))]
        return Judged(job, len(path), token, rejected, new, finished, path=path)

    def abandon(self) -> None:
        """The job failed: nothing was committed."""
        self.busy = False
        self.tree_open = False

    def apply(self, j: Judged) -> int:
        """Commit a judged job and move past it; returns the settled code for the verdict."""
        self.busy = False
        self.generated.extend(j.new)
        settled = SETTLED_NONE
        n = len(j.job.drafts)
        if j.job.tree:  # a serial round: nothing was pending, nothing to void or settle
            self.tree_open = False
        elif j.job.stream:  # nothing can be drafted at a stream token's position: settled by construction
            self.stream_left = 0 if j.finished else max(0, self.stream_left - len(j.new))
        elif j.token >= 0 and j.rejected:
            self._void()  # the correction replaces a draft: every pending draft is void
            self.epoch += 1
        elif j.token >= 0:  # a bonus: the continuation rule
            self._drop_verified(n)
            if not len(self.pending):
                self.unsettled = j.end  # not here yet (or never drafted): the next batch settles it
                self.requested = False
            elif self.pending.tokens[0] == j.token:
                self._drop_verified(1)
                settled = SETTLED_KEPT
                if self.verify_upto == 0:
                    self.requested = False  # the request ended at the bonus position: answered
            else:
                self._void()
                self.epoch += 1
                settled = SETTLED_VOID
        else:
            self._drop_verified(n)
        if j.finished:
            self.finished = True
            self.stream_left = 0
        return settled

    def _void(self) -> None:
        self.hints.clear()
        self.pending.clear()
        self.requested = False
        self.verify_upto = 0

    def _drop_verified(self, n: int) -> None:
        self.pending.drop_front(n)
        self.verify_upto = max(0, self.verify_upto - n)
        if self.hints:
            self.hints = {h for h in self.hints if h >= len(self.generated)}
