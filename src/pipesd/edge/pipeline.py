"""The pipelined edge: three objects on three threads around one lock-free ring.

- :class:`Compute` (producer; the only one that touches the draft model): drafts a token,
  feeds the trigger, pushes the record into the ring with its flags (verify through it);
  applies verdicts (commit, or roll back: bump the ring epoch, crop the draft cache, resume
  after the cloud's token).
- :class:`Sender` (consumer): pops records, cuts them into batches where the batcher says (DP
  plan over the online cost model), flushes at once through a verify record, times each send
  for the cost model. It sees only the ring: records of an old epoch are dropped unsent, and
  its own :class:`pipesd.protocol.SendState` frames positions and hints.
- :class:`Receiver`: reads verdicts off the connection into the compute thread's queue; each
  verdict carries its epoch, so a stale one changes nothing.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from pipesd.edge.batching import DPBatcher, FixedBatcher, TriggerOnlyBatcher
from pipesd.edge.lookup import LookupDraft, NgramIndex
from pipesd.edge.offline import is_link_loss
from pipesd.edge.session import Run, apply_verdict, recv_for
from pipesd.edge.trigger import TriggerConfig, make_trigger
from pipesd.protocol import SendState
from pipesd.protocol.edge import STOP_REASONS
from pipesd.ring import FLAG_STOP, FLAG_VERIFY, TokenRing
from pipesd.transport import messages as M

__all__ = ["run_pipelined"]


class Mailbox:
    """Verdicts from the receive thread to the compute thread (one producer, one consumer):
    a poll costs a length check, not a lock and an exception as ``queue.Queue`` does."""

    def __init__(self) -> None:
        self._q: deque = deque()
        self._ev = threading.Event()

    def put(self, item) -> None:
        self._q.append(item)
        self._ev.set()

    def poll(self):
        return self._q.popleft() if self._q else None

    def wait(self, timeout_s: float):
        """The next item, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._q:
            self._ev.clear()
            if self._q:
                break
            if not self._ev.wait(max(0.0, deadline - time.monotonic())):
                return None
        return self._q.popleft()


def _pad(t_start: float, step_s: float) -> None:
    """A compute profile: pad a draft step to at least ``step_s``."""
    if step_s > 0:
        left = t_start + step_s - time.perf_counter()
        if left > 0:
            time.sleep(left)


def _alternatives(st) -> tuple:
    """The draft's 2nd and 3rd most likely tokens at a step (from its q row)."""
    ids, probs = st.q_ids, st.q_probs
    if len(ids) < 2:
        return ()
    order = np.argsort(-np.asarray(probs), kind="stable")[:3]
    return tuple(int(ids[i]) for i in order if int(ids[i]) != st.token)[:2]


class Compute:
    """The compute thread: draft, trigger, push; apply verdicts."""

    def __init__(self, edge, run: Run, ring: TokenRing, verdicts: Mailbox) -> None:
        self.edge, self.run, self.ring, self.verdicts = edge, run, ring, verdicts
        cfg = run.cfg
        self.draft = edge.draft if cfg.lookup == "off" else _lookup_draft(edge.draft, cfg)
        self.lookup = isinstance(self.draft, LookupDraft)
        self.model_steps, self.model_s = 0, 0.0  # the draft model's steps and their forward time (no padding)
        self.trig = make_trigger(cfg.trigger, cfg.trigger_rule)
        self.probs: dict = {}  # run position -> draft probability (only for a trigger that learns from verdicts)
        self.want_q = cfg.wire_q in ("topk", "full") or not run.params.greedy
        self.tuner, self.tuner_ver = run.tuner, -1
        self.overhead = 0.0  # time outside the draft forward, the padding and verdict waits
        self.alts: dict = {}  # run position -> the draft's 2nd and 3rd choices there, when it was unsure
        self.tree_confidence = cfg.tree_confidence

    def loop(self) -> None:
        run, perf = self.run, time.perf_counter
        self.draft.reset(run.prompt + run.seq)  # the verified output so far (not empty after a re-open)
        try:
            while not run.done.is_set() and not run.cancel.is_set():  # cancelled: end with what is verified
                t_iter = perf()
                self._thresholds()
                if self._verdicts():
                    continue  # re-evaluate position and pausing with the new state
                self.overhead += perf() - t_iter
                if not self._step():
                    return
            run.stats.edge_overhead_s += self.overhead
        finally:
            self._draft_stats()

    def _draft_stats(self) -> None:
        st = self.run.stats
        st.draft_steps += self.model_steps
        st.draft_s += self.model_s
        if self.lookup:
            st.lookup_hits += self.draft.hits
            st.lookup_proposals += self.draft.proposals
            st.lookup_shadow += self.draft.shadow_count

    def _thresholds(self) -> None:
        if self.tuner is not None:
            ver, (ts, tt) = self.tuner.published()
            if ver != self.tuner_ver:
                self.trig.config = TriggerConfig(ts, tt, self.run.cfg.trigger.max_draft)
                self.tuner_ver = ver

    def _verdicts(self) -> bool:
        """Apply whatever verdicts have arrived; wait for one when drafting must pause."""
        run = self.run
        v = self.verdicts.poll()
        if v is None:
            if run.proto.may_draft():
                return False
            v = self.verdicts.wait(run.cfg.verdict_timeout_s)  # drafting must pause for a verdict
            if v is None:
                raise TimeoutError(f"no verdict from the cloud within {run.cfg.verdict_timeout_s} s")
        t0 = time.perf_counter()  # waiting for the verdict is not overhead
        while v is not None:
            if isinstance(v, BaseException):
                raise v
            at = len(run.prompt) + v.start_pos + run.proto.base  # the verdict's first position in the draft's sequence
            end = at + v.accepted  # the correction's (or bonus') position: a rollback drops what stood there
            wrong_lookup = self.lookup and v.rejected and self.draft.lookup_tokens_in(end, end + 1)
            tail = self.draft.shadow_at.get(end) if self.lookup else None
            out = apply_verdict(run, self.draft, v)
            if not out.stale:
                self._rescues(v)
            if self.lookup and not out.stale:
                st = run.stats
                st.lookup_accepted += self.draft.lookup_tokens_in(at, at + v.accepted)  # accepted drafts stand
                st.lookup_rejected += bool(wrong_lookup)
                if self.draft.shadow:  # the verdict's tokens are the target's: score the shadow there
                    checked, right = self.draft.shadow_check(at, end)
                    if tail is not None and v.token >= 0:
                        checked, right = checked + 1, right + (tail == v.token)
                    self.draft.shadow_at.pop(end, None)
                    st.lookup_shadow_checked += checked
                    st.lookup_shadow_right += right
            if self.trig.wants_feedback and not out.stale:
                self._feedback(v)
            if out.rollback_at is not None:
                self.ring.bump_epoch()  # the ring's epoch is the session's: its old records are void
            if out.moved:
                self.trig.reset()
            if run.done.is_set():
                break
            v = self.verdicts.poll()
        self.overhead += time.perf_counter() - t0
        return True

    def _rescues(self, v) -> None:
        """Would a draft tree have rescued this correction? (It is the draft's 2nd / 3rd choice at
        an unsure position: a sibling there would have been accepted.) Then forget what is verified."""
        run = self.run
        if v.rejected and v.token >= 0:
            alt = self.alts.get(v.start_pos + run.proto.base + v.accepted)
            if alt is not None and v.token in alt:
                run.stats.rescued_w3 += 1
                run.stats.rescued_w2 += v.token == alt[0]
        if self.alts:
            done = run.proto.committed
            self.alts = {p: a for p, a in self.alts.items() if p >= done}

    def _feedback(self, v) -> None:
        """The trigger's update hook: the verified round's length, acceptances and cumulative
        confidence (the product of its drafts' probabilities)."""
        start, n = v.start_pos + self.run.proto.base, v.end_pos - v.start_pos
        conf = 1.0
        for pos in range(start, start + n):
            conf *= self.probs.get(pos, 1.0)
        self.trig.on_verdict(n, v.accepted, conf)
        self.run.stats.tau_seq = self.trig.alpha  # the threshold the run ends with

    def _step(self) -> bool:
        """Draft one token and push it; False when the run ended while the ring was full."""
        run, perf, cfg = self.run, time.perf_counter, self.run.cfg
        t_step = perf()
        st = self.draft.step(run.params, run.gen)
        if self.lookup and self.draft.last_lookup:
            t_end = perf()  # a lookup proposal: no forward, no padding, not a draft step for the cost model
        else:
            self.model_steps += 1
            self.model_s += perf() - t_step
            _pad(t_step, cfg.draft_step_s)
            t_end = perf()
            self.edge.cost.observe_draft(t_end - t_step)
        pos, reason = run.proto.on_draft(st.token, self.trig.update(st.prob))
        if st.prob < self.tree_confidence:
            run.stats.unsure_drafts += 1
            self.alts[pos] = _alternatives(st)
        if self.trig.wants_feedback:
            self.probs[pos] = st.prob
        flags = 0
        if reason is not None:
            if reason in STOP_REASONS:
                self.trig.reset()
                flags = FLAG_STOP
            run.reasons[reason] += 1
            flags |= FLAG_VERIFY
        qi, qp = (st.q_ids, st.q_probs) if self.want_q else (None, None)
        while not self.ring.push(pos, st.token, st.prob, qi, qp, flags=flags):
            if run.done.is_set():
                return False
            time.sleep(0.0002)
        run.stats.drafted += 1
        if cfg.record_timeline:
            run.stats.timeline.append(("draft", t_step - run.t0, t_end - run.t0, pos))
        self.overhead += perf() - t_end
        return True


class Sender:
    """The send thread: ring records -> batches on the wire."""

    def __init__(self, edge, run: Run, ring: TokenRing, batcher) -> None:
        self.edge, self.run, self.ring, self.batcher = edge, run, ring, batcher
        self.state = SendState(ring.epoch, run.proto.base)
        self.full_v = edge.draft.vocab_size if run.cfg.wire_q == "full" else 0
        self.overhead = 0.0  # time outside pops and the link
        self.wire_s = 0.0  # time blocked in the (emulated) link
        self.sizes: list[int] = []
        self.hints = 0

    def loop(self) -> None:
        run, perf = self.run, time.perf_counter
        pending: list[tuple] = []
        since = 0
        self.batcher.begin_segment()
        while True:
            b = self.ring.pop_batch(256, 0.05)
            if b is None or run.done.is_set():
                return
            t_pop, wire0 = perf(), self.wire_s
            cut = False
            # Whole columns to Python once per pop: indexing numpy scalars per record costs more.
            rows = zip(b.position.tolist(), b.token.tolist(), b.prob.tolist(), b.topk_ids, b.topk_probs,
                       b.topk_count.tolist(), b.epoch.tolist(), b.flags.tolist())
            for pos, tok, prob, qi, qp, qn, ep, flags in rows:
                if ep != self.state.epoch:
                    if not self.state.admit(ep):
                        continue  # an old epoch: void
                    pending, since = [], 0  # a rollback: what was pending is void
                    self.batcher.begin_segment()
                pending.append((pos, tok, prob, qi, qp, qn))
                since += 1
                if flags & FLAG_VERIFY:
                    self._ship(pending, True)
                    pending, cut = [], False
                    self.batcher.end_segment(since)
                    since = 0
                    self.batcher.begin_segment()
                elif self.batcher.cut_now(since):
                    cut = True
            if cut and pending:
                self._ship(pending, False)
                pending = []
            self.overhead += perf() - t_pop - (self.wire_s - wire0)

    def _q(self, recs: list[tuple]):
        """The q rows of ``recs``: top-k (ids, probs), or the full-vocabulary q (the paper's wire)."""
        if not recs or recs[0][5] == 0:
            return None, None
        if self.full_v:
            q_probs = np.zeros((len(recs), self.full_v), dtype=np.float32)
            for i, r in enumerate(recs):
                q_probs[i, r[3][: r[5]]] = r[4][: r[5]]
            return np.broadcast_to(np.arange(self.full_v, dtype=np.int32), q_probs.shape), q_probs
        k = max(r[5] for r in recs)
        return (np.stack([r[3][:k] for r in recs]).astype(np.int32, copy=False),
                np.stack([r[4][:k] for r in recs]).astype(np.float32, copy=False))

    def _ship(self, recs: list[tuple], verify: bool) -> None:
        if self.ring.epoch != self.state.epoch:
            return  # a rollback since these were popped: void
        run, n = self.run, len(recs)
        first, hint = self.state.frame(recs[0][0], n, verify)
        q_ids, q_probs = self._q(recs[1:] if hint else recs)  # a hint's q stays here
        t0 = time.perf_counter()
        msg = M.DraftBatch(session_id=run.sid, epoch=self.state.epoch, first_pos=first,
                           tokens=np.fromiter((r[1] for r in recs), dtype=np.int32, count=n),
                           probs=np.fromiter((r[2] for r in recs), dtype=np.float32, count=n),
                           verify=verify, hint=hint, q_ids=q_ids, q_probs=q_probs, sent_at=t0)
        t_send = time.perf_counter()
        self.edge.conn.send(msg)
        t1 = time.perf_counter()
        self.wire_s += t1 - t_send
        self.hints += hint
        self.edge.cost.observe_send(n - hint, t1 - t0)  # a hint carries no q: it costs like a header
        if run.tuner is not None:
            run.tuner.observe_costs(self.edge.cost.snapshot())
        self.sizes.append(n)
        if run.cfg.record_timeline:
            run.stats.timeline.append(("send", t0 - run.t0, t1 - run.t0, (recs[0][0], n, verify)))


class Receiver:
    """The receive thread: verdicts (and errors) into the compute thread's queue."""

    def __init__(self, conn, run: Run, verdicts: Mailbox) -> None:
        self.conn, self.run, self.verdicts = conn, run, verdicts

    def loop(self) -> None:
        while not self.run.done.is_set():
            try:
                v = recv_for(self.conn, self.run.sid, 0.05, wake_token=self)  # run_pipelined wakes us at the end
            except RuntimeError as e:  # an Error frame from the cloud
                self.verdicts.put(e)
                return
            except Exception as e:  # connection lost
                self.verdicts.put(ConnectionError(f"lost the connection to the cloud: {e}"))
                return
            if v is not None:
                self.verdicts.put(v)


def _lookup_draft(draft, cfg) -> LookupDraft:
    return LookupDraft(draft, NgramIndex(cfg.lookup_max_n, cfg.lookup_min_n), confidence=cfg.lookup_confidence,
                       max_tokens=cfg.lookup_max_tokens, confirm=cfg.lookup_confirm, shadow=cfg.lookup == "shadow")


def _batcher(edge, cfg):
    if cfg.batching == "dp":
        return DPBatcher(edge.cost, max_length=min(64, max(cfg.trigger.max_draft, 1)))
    if cfg.batching == "fixed":
        return FixedBatcher(cfg.batch_size)
    return TriggerOnlyBatcher()


def run_pipelined(edge, run: Run) -> None:
    """Draft, send and receive on three threads until the run ends (or fails: re-raised)."""
    cfg = run.cfg
    run.done, run.error = threading.Event(), None  # fresh per cloud session
    verdicts = Mailbox()
    ring = TokenRing(cfg.ring_capacity, edge.draft.wire_topk)
    while ring.epoch < run.proto.epoch:  # a re-opened session: the reconciliation moved the epoch
        ring.bump_epoch()
    compute = Compute(edge, run, ring, verdicts)
    sender = Sender(edge, run, ring, _batcher(edge, cfg))
    receiver = Receiver(edge.conn, run, verdicts)
    threads = [threading.Thread(target=_guard, args=(run, o.loop), name=f"pipesd-{name}", daemon=True)
               for name, o in (("send", sender), ("recv", receiver))]
    for t in threads:
        t.start()
    try:
        compute.loop()
    except BaseException as e:
        run.fail(e)
        if isinstance(e, KeyboardInterrupt):
            run.error = e  # a Ctrl-C wins over a failure that raced it (never taken for a lost link)
    finally:
        run.done.set()
        ring.close()  # wakes the send thread
        edge.conn.wake(receiver)  # and the receive thread, rather than let it finish its 50 ms poll
        if run.error is not None and is_link_loss(run.error):
            edge.conn.close(flush_timeout_s=0.5)  # unblocks a send stuck on a silent cloud
        _join(run, threads, cfg.verdict_timeout_s)
    st = run.stats
    st.edge_overhead_s += sender.overhead
    st.batch_sizes.extend(sender.sizes)
    st.hints_sent += sender.hints
    st.wall_s = time.perf_counter() - run.t0  # after the joins: when the caller has its result
    run.wire_stats(edge.conn)
    if run.error is not None:
        raise run.error


def _join(run: Run, threads: list, timeout_s: float) -> None:
    """Join the send and receive threads, also through a Ctrl-C: a thread still blocked in the
    native ring when the interpreter exits aborts the process ("terminate called without an
    active exception"). They end within one poll once ``run.done`` is set; the interrupt is
    kept as the run's error (raised by :func:`run_pipelined`)."""
    for t in threads:
        while True:
            try:
                t.join(timeout=timeout_s)
                break
            except KeyboardInterrupt as e:
                run.fail(e)
                run.error = e


def _guard(run: Run, fn) -> None:
    try:
        fn()
    except BaseException as e:
        run.fail(e)
