"""One generation run on the edge and its cloud sessions: opening, the one receive loop,
applying verdicts (through :class:`pipesd.protocol.EdgeSession`), wire accounting.

A run may span several cloud sessions: after a loss the edge re-opens on prompt + verified
output (positions restart there: ``EdgeSession.base``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from pipesd.edge.config import EdgeConfig
from pipesd.edge.offline import Backoff
from pipesd.edge.stats import GenerationStats
from pipesd.protocol import EdgeSession, VerdictOutcome
from pipesd.sampling import SamplingParams
from pipesd.transport import conn as wire
from pipesd.transport import messages as M

log = logging.getLogger("pipesd.edge")

__all__ = ["Cancel", "Run", "apply_verdict", "open_session", "recv_for", "wait_verdict"]


class Cancel:
    """A run's cancel flag: set when any of its events is (the caller's ``cancel=`` event, the
    stream's own when its consumer closes it). Read with :meth:`is_set`, like an Event."""

    __slots__ = ("events",)

    def __init__(self, *events: Optional[threading.Event]) -> None:
        self.events = tuple(e for e in events if e is not None)

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


class Run:
    """State of one generation across its cloud sessions. The protocol state is ``proto``; the
    pipeline's threads own their own state (see :mod:`pipesd.edge.pipeline`)."""

    def __init__(self, sid: int, prompt: list[int], max_new: int, params: SamplingParams, cfg: EdgeConfig,
                 eos_id: Optional[int]) -> None:
        self.sid = sid
        self.prompt = prompt
        self.max_new = max_new
        self.params = params
        self.cfg = cfg
        self.eos_id = eos_id
        self.proto = EdgeSession(max_new, eos_id, cfg.lookahead, cfg.pipeline)
        self.stats = GenerationStats(method=cfg.method, tau_seq=cfg.trigger.tau_seq, tau_tok=cfg.trigger.tau_tok)
        self.reasons: Counter = Counter()
        self.on_event: Optional[Callable[[str, list[int]], None]] = None  # ("verified" | "unverified" | "retract", ids)
        self.finish_reason = "length"
        self.opens = 0  # cloud sessions opened for this run
        self.complete = False  # the run reached max_new / EOS / the cloud's finish
        self.gen = torch.Generator()  # the draft's sampling RNG, across sessions and offline stretches
        self.gen.manual_seed(params.seed or 0)
        self.shown_unverified = 0  # seq[committed: committed + shown_unverified] was emitted unverified
        self.uq: list[tuple] = []  # (prob, q_ids, q_probs) of each of those tokens (exact sampled verification)
        self.offline_since: Optional[float] = None  # monotonic time of the loss; None when online
        self.backoff = Backoff(cfg.reconnect_initial_s, cfg.reconnect_max_s)
        self.wire_acc = [0, 0, 0]  # bytes sent, received, messages sent on earlier connections
        self.wire_mark0 = (0, 0, 0)
        self.t0 = time.perf_counter()
        self.tuner = None  # the edge's threshold tuner while this run feeds it
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.cancel = Cancel()  # checked by every method's loop: ends the run with what is verified

    @property
    def seq(self) -> list[int]:
        """Committed tokens, then this epoch's drafts (run positions)."""
        return self.proto.seq

    @property
    def committed(self) -> int:
        return self.proto.committed

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.done.set()

    def emit(self, kind: str, ids: list[int]) -> None:
        if self.on_event is not None and (ids or kind == "retract"):
            self.on_event(kind, list(ids))

    def back_online(self) -> None:
        """The first verdict after a loss: the offline episode is over."""
        if self.offline_since is not None:
            self.stats.offline_s += time.monotonic() - self.offline_since
            self.offline_since = None
            self.backoff.reset()

    def wire_mark(self, c: wire.EdgeConnection) -> None:
        """Add the connection's traffic since the last mark to the run's totals."""
        now = (c.bytes_sent, c.bytes_received, c.messages_sent)
        for i in range(3):
            self.wire_acc[i] += now[i] - self.wire_mark0[i]
        self.wire_mark0 = now

    def wire_stats(self, c: wire.EdgeConnection) -> None:
        self.wire_mark(c)
        self.stats.bytes_sent, self.stats.bytes_received, self.stats.messages_sent = self.wire_acc


def recv_for(c: wire.EdgeConnection, sid: int, timeout_s: float, kind=M.Verdict, wake_token: object = None):
    """The one receive loop: the next ``kind`` message of session ``sid`` (others are skipped),
    or None after ``timeout_s`` (or at once on ``c.wake(wake_token)``). An Error frame raises
    RuntimeError; a lost link raises."""
    deadline = time.monotonic() + timeout_s
    while True:
        msg = c.recv(max(0.0, deadline - time.monotonic()), wake_token)
        if msg is None:
            return None
        if isinstance(msg, M.Error):
            raise RuntimeError(f"cloud error: {msg.message} (code {msg.code})")
        if isinstance(msg, kind) and msg.session_id == sid:
            return msg


def wait_verdict(c: wire.EdgeConnection, run: Run) -> M.Verdict:
    v = recv_for(c, run.sid, run.cfg.verdict_timeout_s)
    if v is None:
        raise TimeoutError(f"no verdict from the cloud within {run.cfg.verdict_timeout_s} s")
    return v


def open_session(c: wire.EdgeConnection, run: Run, new_sid: Callable[[], int], fingerprint: str) -> None:
    """Open a cloud session for what is left of the run: its prompt is the prompt plus the
    verified output, so a session re-opened after a loss continues where the target was."""
    if c.closed:
        raise wire.ConnectionClosed("the connection to the cloud is closed")
    p = run.params
    seed = p.seed or 0
    if run.opens:  # a re-open: a fresh session id, and a fresh seed for the cloud's RNG, so its
        run.sid = new_sid()  # draws stay independent of the earlier session's (exact sampling)
        seed = (seed + run.opens * 0x9E3779B97F4A7C15) % (1 << 63)
    run.proto.reopen()
    prompt = run.prompt + run.seq[: run.committed]
    c.send(M.OpenSession(session_id=run.sid, prompt_ids=np.asarray(prompt, dtype=np.int32),
                         temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=seed,
                         tokenizer_fingerprint=fingerprint, max_new_tokens=run.max_new - run.committed))
    try:
        opened = recv_for(c, run.sid, run.cfg.verdict_timeout_s, M.SessionOpened)
    except RuntimeError as e:
        raise RuntimeError(f"the cloud refused the session: {e}") from None
    if opened is None:
        raise TimeoutError(f"the cloud did not open session {run.sid} within {run.cfg.verdict_timeout_s} s")
    if not run.opens:
        run.t0 = time.perf_counter()
    run.opens += 1
    run.wire_mark0 = (c.bytes_sent, c.bytes_received, c.messages_sent)


def apply_verdict(run: Run, draft, v: M.Verdict, before_commit: Optional[Callable[[], None]] = None) -> VerdictOutcome:
    """Apply a verdict: the protocol decides, this side edits the draft's cache, counts and
    emits. ``draft``: the draft model (None when it has no cache to keep in step);
    ``before_commit``: called before the verified tokens are emitted (not for a stale verdict)."""
    out = run.proto.on_verdict(epoch=v.epoch, start_pos=v.start_pos, end_pos=v.end_pos, accepted=v.accepted,
                               token=v.token, rejected=v.rejected, verified_len=v.verified_len,
                               finished=v.finished, settled=v.settled)
    if out.stale:
        return out  # cannot happen with an honest cloud; ignore rather than corrupt
    run.back_online()
    st = run.stats
    st.observe_verdict(v.end_pos - v.start_pos, v.accepted, v.target_forwards, v.verify_s)
    st.bonus_tokens += out.bonus
    st.bonus_kept += out.bonus_kept
    if run.cfg.record_timeline:
        t = time.perf_counter() - run.t0
        start = v.start_pos + run.proto.base
        st.timeline.append(("verdict", t, t, (start, v.accepted, v.token)))
        st.timeline.append(("verify", max(0.0, t - v.verify_s), t, v.verify_s))
    if draft is not None:
        if out.rollback_at is not None:
            st.rollbacks += 1
            log.debug("session %d: rollback at position %d (%d accepted)", run.sid, out.rollback_at, v.accepted)
            draft.truncate(len(run.prompt) + out.rollback_at)
        if out.extend:
            draft.extend(out.extend)
    elif out.rollback_at is not None:
        st.rollbacks += 1
    if before_commit is not None:
        before_commit()  # e.g. withdraw the unverified tail the verdict replaces
    run.emit("verified", out.new)
    if run.tuner is not None:
        run.tuner.observe(len(out.new), cloud_s=v.verify_s)  # the cloud's busy time, as it reports it
    if out.complete:
        if out.eos:
            run.finish_reason = "eos"
        run.complete = True
        run.done.set()
    return out
