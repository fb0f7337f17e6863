"""The edge: three threads around one lock-free ring.

- **compute** (producer): drafts a token, feeds the trigger, pushes the record into the ring;
  applies verdicts (commit, or roll back: bump the ring epoch, crop the draft cache, resume
  after the cloud's correction). It is the only thread that touches the draft model.
- **send** (consumer): pops records, cuts them into batches where the batcher says (DP plan
  over the online cost model), flushes at once through a triggered token, measures each send
  for the cost model. Records of an old epoch are dropped unsent.
- **receive**: reads verdicts off the connection and hands them to the compute thread.

Rollback is exact: after a correction at position r every record, batch and cache entry
past r is void (epoch), and the cloud drops stale batches by the same epoch.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from pipesd.edge.batching import DPBatcher, FixedBatcher, TriggerOnlyBatcher
from pipesd.edge.config import EdgeConfig
from pipesd.edge.trigger import DualThresholdTrigger, TriggerConfig
from pipesd.fingerprint import tokenizer_fingerprint
from pipesd.ring import TokenRing
from pipesd.sampling import SamplingParams
from pipesd.scheduling import CostModel
from pipesd.transport import conn as wire
from pipesd.transport import messages as M

__all__ = ["EdgeClient", "Generation", "GenerationStats"]

_STOP_REASONS = ("lookahead", "end", "eos")  # the edge stops drafting until the verdict


@dataclass
class GenerationStats:
    """Per-run measurements. Acceptance: ``accepted_lengths`` holds, per verification, the
    number of drafts accepted; ``acceptance_rate`` = accepted drafts / verified drafts."""

    method: str = ""
    new_tokens: int = 0
    wall_s: float = 0.0
    tpt_s: float = 0.0  # wall time per generated token, from session open to the last verdict
    drafted: int = 0
    verifications: int = 0
    rollbacks: int = 0
    accepted_lengths: list = field(default_factory=list)
    verified_drafts: int = 0
    accepted_drafts: int = 0
    batch_sizes: list = field(default_factory=list)
    messages_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    cloud_forwards: int = 0  # target token-forwards the cloud reported
    wasted_forwards: int = 0  # scored drafts that were rejected
    cloud_busy_s: float = 0.0
    trigger_reasons: dict = field(default_factory=dict)
    tuner: Optional[dict] = None  # the tuner's state and history, when one runs
    tau_seq: float = 0.0
    tau_tok: float = 0.0
    cost_g_s: float = 0.0
    cost_s_s: float = 0.0
    cost_c_s: float = 0.0
    edge_overhead_s: float = 0.0  # compute + send threads' time outside the draft forward, padding, waits and the wire

    @property
    def edge_overhead_per_draft_s(self) -> float:
        return self.edge_overhead_s / self.drafted if self.drafted else 0.0
    timeline: list = field(default_factory=list)  # (lane, t0, t1, info) relative to the start

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_drafts / self.verified_drafts if self.verified_drafts else 0.0

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "timeline"}
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_accepted"] = self.mean_accepted
        d["edge_overhead_per_draft_s"] = self.edge_overhead_per_draft_s
        return d


@dataclass
class Generation:
    text: str
    token_ids: list
    stats: GenerationStats
    prompt_ids: list = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "eos"


class _Run:
    """State shared by the three threads of one generation."""

    def __init__(self, sid: int, prompt: list[int], max_new: int, params: SamplingParams, cfg: EdgeConfig) -> None:
        self.sid = sid
        self.prompt = prompt
        self.max_new = max_new
        self.params = params
        self.cfg = cfg
        self.epoch = 0
        self.seq: list[int] = []  # committed tokens followed by unverified drafts (this epoch)
        self.committed = 0  # number of verified tokens at the front of seq
        self.triggered: dict[tuple[int, int], bool] = {}  # (epoch, pos) -> ask for bonus
        self.verdicts: "queue.Queue" = queue.Queue()
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.finish_reason = "length"
        self.stats = GenerationStats(method=cfg.method, tau_seq=cfg.trigger.tau_seq, tau_tok=cfg.trigger.tau_tok)
        self.reasons: Counter = Counter()
        self.on_commit: Optional[Callable[[list[int]], None]] = None
        self.t0 = time.perf_counter()
        self.full_q: dict[tuple[int, int], np.ndarray] = {}
        self.tuner_on = False  # this run feeds the edge's threshold tuner
        self.wire_s = 0.0  # send thread: time blocked in the (emulated) link
        self.send_overhead_s = 0.0  # send thread: time outside pops and the link

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.done.set()


class EdgeClient:
    """Generate with a draft model here and the target model in the cloud.

    ``cloud_url`` is ``HOST:PORT``. ``draft`` is a :class:`pipesd.models.DraftModel` (default:
    the bundled pair's draft). ``link`` (a :class:`pipesd.transport.LinkEmulator`) emulates
    bandwidth, delay and per-message overhead on this connection.
    """

    def __init__(self, cloud_url: str, draft=None, config: Optional[EdgeConfig] = None, *,
                 auth_token: str = "", link=None, connect_timeout_s: float = 10.0, client_name: str = "pipesd-edge",
                 tuner: Optional[str] = None, tuner_seed: int = 0, tuner_window_tokens: int = 64) -> None:
        host, _, port = cloud_url.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cloud_url must look like HOST:PORT, got {cloud_url!r}")
        if draft is None:
            from pipesd import zoo

            draft = zoo.load_pair().draft
        self.draft = draft
        self.config = config or EdgeConfig()
        self.tokenizer = getattr(draft, "tokenizer", None)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.conn = wire.EdgeConnection.connect(host, int(port), auth_token=auth_token, client_name=client_name,
                                                link=link, timeout_s=connect_timeout_s)
        ack = self.conn.hello_ack
        if ack.tokenizer_fingerprint and self.fingerprint and ack.tokenizer_fingerprint != self.fingerprint:
            self.conn.close()
            raise ValueError(f"the cloud's tokenizer ({ack.tokenizer_fingerprint}) differs from the draft's "
                             f"({self.fingerprint}): draft and target must share one tokenizer")
        if ack.vocab_size and ack.vocab_size != draft.vocab_size and not self.fingerprint:
            self.conn.close()
            raise ValueError(f"vocabulary sizes differ: draft {draft.vocab_size}, cloud {ack.vocab_size}")
        self.cost = CostModel()
        self._next_sid = 1
        self._lock = threading.Lock()
        # Online threshold tuner (PipeSD mechanism 3): "bayes", "fixed" or None. It tunes the
        # methods that use both thresholds; the others keep their configured trigger.
        self.tuner = None
        if tuner is not None:
            from pipesd.tuning import make_online_tuner

            t = self.config.trigger
            self.tuner = make_online_tuner(tuner, (t.tau_seq, t.tau_tok), seed=tuner_seed,
                                           window_tokens=tuner_window_tokens)

    # ------------------------------------------------------------------ public API
    def close(self) -> None:
        if self.tuner is not None:
            self.tuner.close()
        self.conn.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
                 sampling: Optional[SamplingParams] = None, config: Optional[EdgeConfig] = None) -> Generation:
        """Generate up to ``max_new_tokens`` tokens (greedy unless ``sampling`` says otherwise)."""
        return self._generate(prompt, max_new_tokens, sampling, config, None)

    def stream(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
               sampling: Optional[SamplingParams] = None, config: Optional[EdgeConfig] = None) -> Iterator[str]:
        """Yield text pieces as they are verified (never text that a verdict could change)."""
        q: "queue.Queue" = queue.Queue()
        result: dict = {}
        tok = self.tokenizer
        state = {"ids": [], "text": ""}

        def on_commit(ids: list[int]) -> None:
            state["ids"].extend(ids)
            text = tok.decode(state["ids"], skip_special_tokens=True) if tok is not None else " ".join(map(str, state["ids"]))
            if text.endswith("\ufffd"):
                return  # an incomplete UTF-8 sequence: wait for the next token
            if len(text) > len(state["text"]) and text.startswith(state["text"]):
                q.put(text[len(state["text"]):])
            state["text"] = text

        def run() -> None:
            try:
                result["gen"] = self._generate(prompt, max_new_tokens, sampling, config, on_commit)
            except BaseException as e:  # re-raised in the consumer
                result["error"] = e
            finally:
                q.put(None)

        th = threading.Thread(target=run, name="pipesd-stream", daemon=True)
        th.start()
        while True:
            piece = q.get()
            if piece is None:
                break
            yield piece
        th.join()
        if "error" in result:
            raise result["error"]
        self.last_generation = result["gen"]

    # ------------------------------------------------------------------ generation
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a draft with a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is not None and (not ids or ids[0] != bos) and getattr(self.tokenizer, "add_bos_token", False):
                ids = [bos] + ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.draft.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.draft.vocab_size})")
        return ids

    def _generate(self, prompt, max_new_tokens, sampling, config, on_commit) -> Generation:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        cfg = config or self.config
        params = sampling or SamplingParams()
        ids = self._encode(prompt)
        with self._lock:  # one generation at a time per connection
            sid = self._next_sid
            self._next_sid += 1
            run = _Run(sid, ids, max_new_tokens, params, cfg)
            run.on_commit = on_commit
            if cfg.method == "edge-only":
                self._edge_only(run)
            else:
                self._open(run)
                try:
                    if cfg.method == "target-only":
                        self._target_only(run)
                    else:
                        self._pipelined(run)
                finally:
                    try:
                        self.conn.send(M.CloseSession(sid))
                    except Exception:
                        pass
        st = run.stats
        st.new_tokens = run.committed
        st.tpt_s = st.wall_s / max(1, run.committed)
        st.trigger_reasons = dict(run.reasons)
        st.cost_g_s, st.cost_s_s, st.cost_c_s = self.cost.gen_s, self.cost.startup_s, self.cost.per_token_s
        if self._tuned(cfg):
            st.tau_seq, st.tau_tok = self.tuner.current()
            st.tuner = self.tuner.stats()
        tokens = run.seq[: run.committed]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Generation(text, tokens, st, ids, run.finish_reason)

    def _open(self, run: _Run) -> None:
        p = run.params
        self.conn.send(M.OpenSession(run.sid, np.asarray(run.prompt, dtype=np.int32), p.temperature, p.top_k, p.top_p,
                                     p.min_p, p.seed or 0, self.fingerprint, run.max_new))
        deadline = time.monotonic() + run.cfg.verdict_timeout_s
        while True:
            msg = self.conn.recv(max(0.01, deadline - time.monotonic()))
            if msg is None:
                raise TimeoutError(f"the cloud did not open session {run.sid} within {run.cfg.verdict_timeout_s} s")
            if isinstance(msg, M.SessionOpened) and msg.session_id == run.sid:
                break
            if isinstance(msg, M.Error):
                raise RuntimeError(f"the cloud refused the session: {msg.message} (code {msg.code})")
        run.t0 = time.perf_counter()

    def _commit(self, run: _Run, new: list[int]) -> None:
        if run.on_commit is not None and new:
            run.on_commit(new)

    # -- target-only: one round trip per token ---------------------------------------
    def _target_only(self, run: _Run) -> None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        empty_i = np.zeros(0, dtype=np.int32)
        empty_f = np.zeros(0, dtype=np.float32)
        while run.committed < run.max_new:
            self.conn.send(M.DraftBatch(run.sid, run.epoch, run.committed, empty_i, empty_f, verify=True, bonus=True,
                                        sent_at=time.perf_counter()))
            v = self._wait_verdict(run)
            run.seq.append(v.correction)
            run.committed += 1
            run.epoch += 1
            run.stats.verifications += 1
            run.stats.cloud_forwards += v.target_forwards
            run.stats.cloud_busy_s += v.verify_s
            self._commit(run, [v.correction])
            if v.finished or v.correction == eos:
                run.finish_reason = "eos" if v.correction == eos else "length"
                break
        run.stats.wall_s = time.perf_counter() - run.t0
        self._wire_stats(run)

    def _wait_verdict(self, run: _Run) -> M.Verdict:
        deadline = time.monotonic() + run.cfg.verdict_timeout_s
        while True:
            msg = self.conn.recv(max(0.01, deadline - time.monotonic()))
            if msg is None:
                raise TimeoutError(f"no verdict from the cloud within {run.cfg.verdict_timeout_s} s")
            if isinstance(msg, M.Verdict) and msg.session_id == run.sid:
                return msg
            if isinstance(msg, M.Error):
                raise RuntimeError(f"cloud error: {msg.message} (code {msg.code})")

    def _wire_stats(self, run: _Run) -> None:
        st = run.stats
        st.bytes_sent = self.conn.bytes_sent - getattr(run, "_b0", (0, 0, 0))[0]
        st.bytes_received = self.conn.bytes_received - getattr(run, "_b0", (0, 0, 0))[1]
        st.messages_sent = self.conn.messages_sent - getattr(run, "_b0", (0, 0, 0))[2]

    # -- edge-only: the draft alone ---------------------------------------------------
    def _edge_only(self, run: _Run) -> None:
        d = self.draft
        d.reset(run.prompt)
        gen = torch.Generator()
        gen.manual_seed(run.params.seed or 0)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        t0 = time.perf_counter()
        while run.committed < run.max_new:
            ts = time.perf_counter()
            st = d.step(run.params, gen)
            self._pad(ts, run.cfg.draft_step_s)
            run.seq.append(st.token)
            run.committed += 1
            self._commit(run, [st.token])
            if st.token == eos:
                run.finish_reason = "eos"
                break
        run.stats.drafted = run.committed
        run.stats.wall_s = time.perf_counter() - t0

    @staticmethod
    def _pad(t_start: float, step_s: float) -> None:
        if step_s > 0:
            left = t_start + step_s - time.perf_counter()
            if left > 0:
                time.sleep(left)

    # -- the pipeline ------------------------------------------------------------------
    def _tuned(self, cfg: EdgeConfig) -> bool:
        return self.tuner is not None and cfg.method in ("pipesd", "fixed-batch")

    def _pipelined(self, run: _Run) -> None:
        cfg = run.cfg
        tuned = run.tuner_on = self._tuned(cfg)
        if tuned:
            self.tuner.begin_run()
        run._b0 = (self.conn.bytes_sent, self.conn.bytes_received, self.conn.messages_sent)
        topk_max = self.draft.wire_topk
        ring = TokenRing(cfg.ring_capacity, topk_max)
        if cfg.batching == "dp":
            batcher = DPBatcher(self.cost, max_length=min(64, max(cfg.trigger.max_draft, 1)))
        elif cfg.batching == "fixed":
            batcher = FixedBatcher(cfg.batch_size)
        else:
            batcher = TriggerOnlyBatcher()
        threads = [
            threading.Thread(target=self._guard, args=(run, self._send_loop, run, ring, batcher), name="pipesd-send", daemon=True),
            threading.Thread(target=self._guard, args=(run, self._recv_loop, run), name="pipesd-recv", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._compute_loop(run, ring)
        except BaseException as e:
            run.fail(e)
        finally:
            run.done.set()
            ring.close()
            for t in threads:
                t.join(timeout=cfg.verdict_timeout_s)
            if tuned:
                self.tuner.end_run()
        run.stats.wall_s = time.perf_counter() - run.t0
        run.stats.edge_overhead_s += run.send_overhead_s
        self._wire_stats(run)
        if run.error is not None:
            raise run.error

    @staticmethod
    def _guard(run: _Run, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:
            run.fail(e)

    def _compute_loop(self, run: _Run, ring: TokenRing) -> None:
        cfg = run.cfg
        d = self.draft
        d.reset(run.prompt)
        trig = DualThresholdTrigger(cfg.trigger)
        gen = torch.Generator()
        gen.manual_seed(run.params.seed or 0)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        want_q = cfg.wire_q == "topk" or cfg.wire_q == "full" or not run.params.greedy
        stop_at = run.max_new  # no drafting at or past this position until a verdict
        awaiting = False
        timeline = run.stats.timeline if cfg.record_timeline else None
        perf = time.perf_counter
        overhead = 0.0  # time in this loop outside the draft forward, the padding and verdict waits
        tuner = self.tuner if self._tuned(cfg) else None
        tuner_ver = -1
        while not run.done.is_set():
            t_iter = perf()
            if tuner is not None:
                ver, (ts, tt) = tuner.published()
                if ver != tuner_ver:
                    trig.config = TriggerConfig(ts, tt, cfg.trigger.max_draft)
                    tuner_ver = ver
            # Apply whatever verdicts have arrived; wait for one when drafting must pause.
            pos = len(run.seq)
            block = pos >= stop_at or pos - run.committed >= cfg.lookahead or (awaiting and not cfg.pipeline)
            try:
                v = run.verdicts.get(timeout=cfg.verdict_timeout_s) if block else run.verdicts.get_nowait()
            except queue.Empty:
                if block:
                    raise TimeoutError(f"no verdict from the cloud within {cfg.verdict_timeout_s} s") from None
                v = None
            if v is not None:
                t_iter = perf()  # waiting for the verdict is not overhead
                while v is not None:
                    if isinstance(v, BaseException):
                        raise v
                    if self._apply_verdict(run, ring, trig, v, eos):
                        stop_at, awaiting = run.max_new, False
                        trig.reset()
                    elif v.end_pos >= len(run.seq):
                        awaiting = False
                    if run.done.is_set():
                        break
                    try:
                        v = run.verdicts.get_nowait()
                    except queue.Empty:
                        v = None
                overhead += perf() - t_iter
                continue  # re-evaluate position and pausing with the new state
            # Draft one token.
            t_step = perf()
            st = d.step(run.params, gen)
            t_fwd = perf()
            self._pad(t_step, cfg.draft_step_s)
            t_end = perf()
            overhead += t_step - t_iter
            self.cost.observe_draft(t_end - t_step)
            reason = trig.update(st.prob)
            if st.token == eos:
                reason, stop_at = "eos", pos + 1
            elif pos + 1 >= run.max_new:
                reason = "end"
            elif pos + 1 - run.committed >= cfg.lookahead:
                reason = "lookahead"
            if reason is not None:
                if reason in _STOP_REASONS:
                    trig.reset()
                run.reasons[reason] += 1
                run.triggered[(run.epoch, pos)] = (not cfg.pipeline) or reason in _STOP_REASONS
                awaiting = True
            run.seq.append(st.token)
            qi = st.q_ids if want_q else None
            qp = st.q_probs if want_q else None
            if cfg.wire_q == "full":
                full = np.zeros(d.vocab_size, dtype=np.float32)
                full[np.asarray(st.q_ids, dtype=np.int64)] = st.q_probs
                run.full_q[(run.epoch, pos)] = full
            while not ring.push(pos, st.token, st.prob, qi, qp):
                if run.done.is_set():
                    return
                time.sleep(0.0002)
            run.stats.drafted += 1
            if timeline is not None:
                timeline.append(("draft", t_step - run.t0, t_end - run.t0, pos))
            overhead += perf() - t_end
        run.stats.edge_overhead_s += overhead

    def _apply_verdict(self, run: _Run, ring: TokenRing, trig: DualThresholdTrigger, v: M.Verdict, eos) -> bool:
        """Commit / roll back; returns True when the epoch moved (drafting restarts)."""
        if v.epoch != run.epoch or v.start_pos != run.committed:
            return False  # cannot happen with an honest cloud; ignore rather than corrupt
        st = run.stats
        st.verifications += 1
        n_seg = v.end_pos - v.start_pos
        st.verified_drafts += n_seg
        st.accepted_drafts += v.accepted
        st.accepted_lengths.append(v.accepted)
        st.cloud_forwards += v.target_forwards
        st.wasted_forwards += n_seg - v.accepted
        st.cloud_busy_s += v.verify_s
        if run.cfg.record_timeline:
            t = time.perf_counter() - run.t0
            st.timeline.append(("verdict", t, t, (v.start_pos, v.accepted, v.correction)))
            st.timeline.append(("verify", max(0.0, t - v.verify_s), t, v.verify_s))
        accepted = run.seq[v.start_pos: v.start_pos + v.accepted]
        new = list(accepted)
        moved = v.correction >= 0
        if moved:
            new.append(int(v.correction))
            del run.seq[v.start_pos + v.accepted:]
            run.seq.append(int(v.correction))
            run.epoch += 1
            ring.bump_epoch()
            if v.rejected:
                st.rollbacks += 1
            self.draft.truncate(len(run.prompt) + v.start_pos + v.accepted)
            self.draft.extend([int(v.correction)])
            run.triggered = {k: b for k, b in run.triggered.items() if k[0] == run.epoch}
            run.full_q = {k: q for k, q in run.full_q.items() if k[0] == run.epoch}
        run.committed = v.verified_len
        if len(run.seq) > run.committed and v.finished:
            del run.seq[run.committed:]
        self._commit(run, new)
        if run.tuner_on:
            self.tuner.observe(len(new))
        if v.finished or run.committed >= run.max_new or (eos is not None and eos in new):
            if eos is not None and eos in new:
                run.finish_reason = "eos"
            run.done.set()
        return moved

    def _send_loop(self, run: _Run, ring: TokenRing, batcher) -> None:
        cfg = run.cfg
        pending: list[tuple] = []
        since = 0
        cur_epoch = ring.epoch
        batcher.begin_segment()
        perf = time.perf_counter
        timeline = run.stats.timeline if cfg.record_timeline else None
        while True:
            b = ring.pop_batch(256, 0.05)
            if b is None:
                return
            if run.done.is_set():
                return
            t_pop = perf()
            wire0 = run.wire_s
            epoch = ring.epoch
            if epoch != cur_epoch:
                pending.clear()
                since = 0
                cur_epoch = epoch
                batcher.begin_segment()
            n = len(b.position)
            cut = False
            for i in range(n):
                if int(b.epoch[i]) != cur_epoch:
                    continue
                pos = int(b.position[i])
                pending.append((pos, int(b.token[i]), float(b.prob[i]), b.topk_ids[i], b.topk_probs[i], int(b.topk_count[i])))
                since += 1
                bonus = run.triggered.get((cur_epoch, pos))
                if bonus is not None:
                    self._ship(run, pending, cur_epoch, True, bonus, timeline)
                    pending = []
                    batcher.end_segment(since)
                    since = 0
                    batcher.begin_segment()
                    cut = False
                elif batcher.cut_now(since):
                    cut = True
            if cut and pending:
                self._ship(run, pending, cur_epoch, False, False, timeline)
                pending = []
            run.send_overhead_s += perf() - t_pop - (run.wire_s - wire0)

    def _ship(self, run: _Run, recs: list[tuple], epoch: int, verify: bool, bonus: bool, timeline) -> None:
        n = len(recs)
        tokens = np.fromiter((r[1] for r in recs), dtype=np.int32, count=n)
        probs = np.fromiter((r[2] for r in recs), dtype=np.float32, count=n)
        q_ids = q_probs = None
        if run.cfg.wire_q == "full":
            V = self.draft.vocab_size
            q_ids = np.broadcast_to(np.arange(V, dtype=np.int32), (n, V))
            q_probs = np.stack([run.full_q.get((epoch, r[0]), np.zeros(V, np.float32)) for r in recs])
        elif recs[0][5] > 0:
            k = max(r[5] for r in recs)
            q_ids = np.stack([r[3][:k] for r in recs]).astype(np.int32, copy=False)
            q_probs = np.stack([r[4][:k] for r in recs]).astype(np.float32, copy=False)
        t0 = time.perf_counter()
        msg = M.DraftBatch(run.sid, epoch, recs[0][0], tokens, probs, verify, bonus, q_ids, q_probs, t0)
        t_send = time.perf_counter()
        self.conn.send(msg)
        t1 = time.perf_counter()
        run.wire_s += t1 - t_send
        self.cost.observe_send(n, t1 - t0)
        if run.tuner_on:
            self.tuner.observe_costs(self.cost.snapshot())
        run.stats.batch_sizes.append(n)
        if timeline is not None:
            timeline.append(("send", t0 - run.t0, t1 - run.t0, (recs[0][0], n, verify)))

    def _recv_loop(self, run: _Run) -> None:
        while not run.done.is_set():
            try:
                msg = self.conn.recv(0.05)
            except Exception as e:  # connection lost
                run.verdicts.put(ConnectionError(f"lost the connection to the cloud: {e}"))
                return
            if msg is None:
                continue
            if isinstance(msg, M.Verdict):
                if msg.session_id == run.sid:
                    run.verdicts.put(msg)
            elif isinstance(msg, M.Error):
                run.verdicts.put(RuntimeError(f"cloud error: {msg.message} (code {msg.code})"))
                return
