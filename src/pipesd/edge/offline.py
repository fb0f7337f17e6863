"""Offline robustness of the edge: the pieces the client uses when the cloud goes away.

- :class:`CloudUnavailableError`: the one error an offline policy raises when it gives up.
- :class:`Backoff` and :class:`Reconnector`: dial the cloud again on a background thread, with
  exponential backoff, so drafting never stalls on a connect that hangs.
- :class:`StreamEvent` and :class:`EventText`: the event stream of
  :meth:`pipesd.edge.EdgeClient.stream_events`: verified text, unverified (draft-only) text,
  and the retraction of unverified text. Verified text is never retracted.

- :func:`recover`, :func:`draft_offline`, :func:`reconcile`: the policy itself
  (``EdgeConfig.offline_policy``), described in docs/reliability.md.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pipesd.transport import messages as M
from pipesd.transport.conn import HandshakeError

__all__ = ["CloudUnavailableError", "Backoff", "Reconnector", "StreamEvent", "EventText", "OFFLINE_POLICIES"]

OFFLINE_POLICIES = ("draft", "wait", "fail")
"""``draft``: keep generating with the draft alone, flagged unverified, and reconcile when the
cloud returns; ``wait``: pause and reconnect with backoff until ``offline_wait_s``; ``fail``:
raise :class:`CloudUnavailableError` at once."""

log = logging.getLogger("pipesd.edge")

_PERMANENT_CODES = (M.E_AUTH, M.E_VERSION)  # a refusal that retrying cannot change


class CloudUnavailableError(ConnectionError):
    """The cloud was lost (connection refused or reset, or no verdict within the deadline) and
    the offline policy gave up. ``cause`` is the underlying error; ``generation`` holds what was
    produced, when there is something (its ``unverified_from`` flags the draft-only suffix)."""

    def __init__(self, message: str, cause: Optional[BaseException] = None, generation=None) -> None:
        super().__init__(message)
        self.cause = cause
        self.generation = generation


def is_permanent(e: BaseException) -> bool:
    """A refusal that no reconnection can cure: wrong token or protocol version, another model."""
    if isinstance(e, HandshakeError):
        return e.code in _PERMANENT_CODES
    return isinstance(e, ValueError)  # EdgeClient._dial: tokenizer or vocabulary mismatch


def is_link_loss(e: BaseException) -> bool:
    """The cloud became unreachable: refused, reset, closed, or silent past a deadline."""
    return isinstance(e, (ConnectionError, TimeoutError)) and not is_permanent(e)


class Backoff:
    """Exponential backoff: ``initial_s``, doubling, capped at ``max_s``, with +-``jitter``
    relative noise so many edges do not reconnect to a restarted cloud in lockstep."""

    def __init__(self, initial_s: float, max_s: float, jitter: float = 0.1, seed: Optional[int] = None) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        self.initial_s, self.max_s, self.jitter = initial_s, max_s, jitter
        self._n = 0
        self._rng = random.Random(seed)

    def next(self) -> float:
        d = min(self.max_s, self.initial_s * (2.0 ** min(self._n, 60)))
        self._n += 1
        return d * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))

    def reset(self) -> None:
        self._n = 0


class Reconnector:
    """Dials the cloud on a daemon thread until it answers, is stopped, or refuses for good.

    ``dial()`` returns a connected, handshaken connection or raises. The first attempt is made
    after ``first_delay_s``, the next ones after ``backoff.next()``. :meth:`poll` (non-blocking)
    and :meth:`wait` hand out the connection once; a permanent refusal (wrong auth token, other
    protocol version, a cloud serving another model) is raised from them instead.
    """

    def __init__(self, dial: Callable[[], object], backoff: Backoff, first_delay_s: float = 0.0) -> None:
        self._dial = dial
        self._backoff = backoff
        self._first = max(0.0, first_delay_s)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._conn = None
        self.error: Optional[BaseException] = None  # permanent: raised by poll / wait
        self.last_error: Optional[BaseException] = None  # the latest transient failure
        self.attempts = 0
        self._thread = threading.Thread(target=self._loop, name="pipesd-reconnect", daemon=True)

    def start(self) -> "Reconnector":
        self._thread.start()
        return self

    def _loop(self) -> None:
        delay = self._first
        while not self._stop.wait(delay):
            self.attempts += 1
            try:
                conn = self._dial()
            except BaseException as e:  # noqa: BLE001 - classified below
                if is_permanent(e) or not isinstance(e, OSError):
                    self.error = e
                    self._ready.set()
                    return
                self.last_error = e
                delay = self._backoff.next()
                continue
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conn = conn
            self._ready.set()
            return

    def _take(self):
        if self.error is not None:
            raise self.error
        with self._lock:
            conn, self._conn = self._conn, None
        return conn

    def poll(self):
        """The new connection if one is ready (once), else None."""
        return self._take() if self._ready.is_set() else None

    def wait(self, timeout_s: float):
        """Block up to ``timeout_s`` for the connection; None when it did not come."""
        self._ready.wait(max(0.0, timeout_s))
        return self._take() if self._ready.is_set() else None

    def stop(self) -> None:
        """Stop dialing; a connection made but not taken is closed. Does not wait for a dial in progress."""
        with self._lock:
            self._stop.set()
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


@dataclass(frozen=True)
class StreamEvent:
    """One event of :meth:`pipesd.edge.EdgeClient.stream_events`.

    - ``"verified"``: ``text`` is appended to the verified text. Verified text is final.
    - ``"unverified"``: ``text`` (drafted while the cloud was unreachable) is appended to the
      unverified tail, which always follows all verified text.
    - ``"retract"``: the whole unverified tail shown so far (``text``, ``token_ids``) is
      withdrawn; the tokens the target accepts come back as ``"verified"`` events.

    A display is ``"".join(verified texts) + unverified tail``.
    """

    kind: str
    text: str
    token_ids: tuple = ()


class EventText:
    """Turns token-level events into :class:`StreamEvent` s, decoding the growing sequences.

    Text is cut where a whole UTF-8 character ends (a byte-level BPE token may hold part of
    one): a piece is held until the next token completes it; :meth:`finish` flushes the rest.
    Token ids travel with the text they produced.
    """

    def __init__(self, decode: Callable[[list], str], emit: Callable[[StreamEvent], None]) -> None:
        self._decode = decode
        self._emit = emit
        self.v_ids: list[int] = []
        self.v_text = ""  # verified text emitted
        self._v_held: list[int] = []
        self.u_ids: list[int] = []
        self.u_text = ""  # unverified text emitted
        self._u_sent: list[int] = []  # unverified ids whose text was emitted
        self._u_held: list[int] = []

    def verified(self, ids: list[int], final: bool = False) -> None:
        self.v_ids.extend(ids)
        self._v_held.extend(ids)
        text = self._decode(self.v_ids)
        if text.endswith("\ufffd") and not final:
            return  # an incomplete UTF-8 sequence: wait for the next token
        piece = text[len(self.v_text):] if text.startswith(self.v_text) else text
        self.v_text = text if text.startswith(self.v_text) else self.v_text + text
        held, self._v_held = self._v_held, []
        if piece or held:
            self._emit(StreamEvent("verified", piece, tuple(held)))

    def unverified(self, ids: list[int], final: bool = False) -> None:
        self.u_ids.extend(ids)
        self._u_held.extend(ids)
        base = self._decode(self.v_ids)
        full = self._decode(self.v_ids + self.u_ids)
        if full.endswith("\ufffd") and not final:
            return
        tail = full[len(base):] if full.startswith(base) else self._decode(self.u_ids)
        if not tail.startswith(self.u_text):  # decoding moved earlier text: show the tail afresh
            all_ids = self.u_ids
            self.retract()
            self.u_ids, self._u_held = list(all_ids), list(all_ids)
        piece = tail[len(self.u_text):]
        self.u_text = tail
        held, self._u_held = self._u_held, []
        self._u_sent.extend(held)
        if piece or held:
            self._emit(StreamEvent("unverified", piece, tuple(held)))

    def retract(self) -> None:
        """Withdraw the whole unverified tail."""
        if self._u_sent:
            self._emit(StreamEvent("retract", self.u_text, tuple(self._u_sent)))
        self.u_ids, self.u_text, self._u_sent, self._u_held = [], "", [], []

    def finish(self) -> None:
        """Flush text held back for an incomplete character."""
        if self._v_held:
            self.verified([], final=True)
        if self._u_held:
            self.unverified([], final=True)


# ---------------------------------------------------------------------- the policy
def recover(edge, run, cause: BaseException) -> bool:
    """The cloud is lost. Returns True with a new connection in ``edge.conn``, False when the
    run ended offline (policy "draft"); raises :class:`CloudUnavailableError` when the policy
    gives up."""
    cfg, st = run.cfg, run.stats
    run.wire_mark(edge.conn)
    edge.conn.close(flush_timeout_s=0.5)
    # Drafts that were never shown (in flight when the link went) are dropped: offline
    # drafting redoes them with their q kept, and the user saw none of them.
    del run.seq[run.committed + run.shown_unverified:]
    if cfg.offline_policy == "fail":
        raise CloudUnavailableError(f"lost the cloud at {edge.cloud_url}: {cause} (offline_policy 'fail')",
                                    cause) from cause
    if run.offline_since is None:
        run.offline_since = time.monotonic()
        st.offline_episodes += 1
        log.warning("session %d: lost the cloud at %s (%s); offline policy %r", run.sid, edge.cloud_url, cause,
                    cfg.offline_policy, extra={"session": run.sid, "cloud": edge.cloud_url})
    rc = Reconnector(edge._dial, run.backoff, run.backoff.next()).start()
    try:
        if cfg.offline_policy == "wait":
            conn = rc.wait(run.offline_since + cfg.offline_wait_s - time.monotonic())
            if conn is None:
                raise CloudUnavailableError(f"the cloud at {edge.cloud_url} did not come back within "
                                            f"offline_wait_s={cfg.offline_wait_s} s (last error: "
                                            f"{rc.last_error or cause})", cause) from cause
        else:
            conn = draft_offline(edge, run, rc)
            if conn is None:
                st.offline_s += time.monotonic() - run.offline_since
                return False
    finally:
        rc.stop()
    edge.conn = conn
    run.wire_mark0 = (conn.bytes_sent, conn.bytes_received, conn.messages_sent)
    st.reconnects += 1
    log.info("session %d: reconnected to %s after %d attempt(s)", run.sid, edge.cloud_url, rc.attempts,
             extra={"session": run.sid, "cloud": edge.cloud_url})
    return True


def draft_offline(edge, run, rc: Reconnector):
    """Draft alone, emitting unverified tokens, until the reconnector has a connection (returned)
    or the run reaches max_new / EOS (None)."""
    from pipesd.edge.pipeline import _pad

    d, eos = edge.draft, run.eos_id
    d.reset(run.prompt + run.seq)
    while True:
        conn = rc.poll()
        if conn is not None:
            return conn
        if len(run.seq) >= run.max_new or (run.shown_unverified and run.seq[-1] == eos):
            return None
        t0 = time.perf_counter()
        st = d.step(run.params, run.gen)
        _pad(t0, run.cfg.draft_step_s)
        run.seq.append(st.token)
        run.uq.append((st.prob, st.q_ids, st.q_probs))
        run.shown_unverified += 1
        run.stats.offline_tokens += 1
        run.stats.drafted += 1
        if st.token == eos:
            run.finish_reason = "eos"
        run.emit("unverified", [st.token])


def reconcile(edge, run) -> None:
    """Have the unverified suffix verified by the re-opened session: what the target accepts
    becomes verified, the first rejected token is replaced by the target's, the rest is void."""
    from pipesd.edge.session import apply_verdict, wait_verdict

    run.finish_reason = "length"  # a drafted EOS counts only once the target agrees
    edge.draft.reset(run.prompt + run.seq)
    chunk = max(1, min(getattr(edge.conn.hello_ack, "max_draft_in_flight", 0) or 256, 128))
    while run.shown_unverified and not run.complete:
        start, n_tail = run.committed, run.shown_unverified
        n = min(n_tail, chunk)
        edge.conn.send(_unverified_batch(run, start, n))
        run.stats.batch_sizes.append(n)
        v = wait_verdict(edge.conn, run)
        tail = run.seq[start: start + n_tail]
        out = apply_verdict(run, edge.draft, v, before_commit=lambda: run.emit("retract", tail))
        if out.stale:
            raise RuntimeError(f"the cloud answered the unverified suffix out of order (verdict for "
                               f"{v.start_pos}, epoch {v.epoch}; expected {run.proto.wire_pos(start)}, "
                               f"epoch {run.proto.epoch})")
        if out.moved or run.complete:  # the tail past the verdict is void
            run.shown_unverified = 0
            run.uq.clear()
            del run.seq[run.committed:]
        else:  # a chunk fully accepted: the rest of the tail is still unverified
            left = max(0, len(run.seq) - run.committed)
            del run.uq[: len(run.uq) - left]
            run.shown_unverified = left
            run.emit("unverified", run.seq[run.committed:])


def _unverified_batch(run, start: int, n: int) -> M.DraftBatch:
    """``n`` unverified tokens from run position ``start`` as one verify request, with q."""
    import numpy as np

    recs = run.uq[:n]
    q_ids = q_probs = None
    if not run.params.greedy or run.cfg.wire_q != "auto":
        k = max(len(r[1]) for r in recs)
        q_ids = np.zeros((n, k), dtype=np.int32)
        q_probs = np.zeros((n, k), dtype=np.float32)
        for i, r in enumerate(recs):
            q_ids[i, : len(r[1])] = r[1]
            q_probs[i, : len(r[2])] = r[2]
    return M.DraftBatch(session_id=run.sid, epoch=run.proto.epoch, first_pos=run.proto.wire_pos(start),
                        tokens=np.asarray(run.seq[start: start + n], dtype=np.int32),
                        probs=np.asarray([r[0] for r in recs], dtype=np.float32), verify=True,
                        q_ids=q_ids, q_probs=q_probs, sent_at=time.perf_counter())
