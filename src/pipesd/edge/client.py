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

When the cloud is lost (refused, reset, or no verdict within ``verdict_timeout_s``) the
threads stop and ``EdgeConfig.offline_policy`` decides: draft alone (flagged unverified) while
reconnecting, then re-open the session on prompt + verified output and have the unverified
suffix verified; or wait; or fail. See :mod:`pipesd.edge.offline` and docs/reliability.md.
"""
from __future__ import annotations

import logging
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
from pipesd.edge.offline import Backoff, CloudUnavailableError, EventText, Reconnector, StreamEvent, is_link_loss
from pipesd.edge.trigger import DualThresholdTrigger, TriggerConfig
from pipesd.fingerprint import tokenizer_fingerprint
from pipesd.ring import TokenRing
from pipesd.sampling import SamplingParams
from pipesd.scheduling import CostModel
from pipesd.transport import conn as wire
from pipesd.transport import messages as M

__all__ = ["EdgeClient", "Generation", "GenerationStats", "StreamEvent", "CloudUnavailableError"]

log = logging.getLogger("pipesd.edge")

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
    bonus_tokens: int = 0  # target tokens that came free with a full acceptance (continuation rule)
    bonus_kept: int = 0  # of those, equal to the edge's draft there: its later drafts stood
    hints_sent: int = 0  # drafts sent as hints (no q on the wire: only compared with a bonus)
    tuner: Optional[dict] = None  # the tuner's state and history, when one runs
    tau_seq: float = 0.0
    tau_tok: float = 0.0
    cost_g_s: float = 0.0
    cost_s_s: float = 0.0
    cost_c_s: float = 0.0
    edge_overhead_s: float = 0.0  # compute + send threads' time outside the draft forward, padding, waits and the wire
    # Offline robustness (docs/reliability.md).
    offline_episodes: int = 0  # times the cloud was lost (a failed recovery continues the episode)
    reconnects: int = 0  # new connections made after a loss
    offline_tokens: int = 0  # tokens drafted while offline (unverified when shown)
    offline_s: float = 0.0  # time from each loss to the first verdict after it (or to the end)
    unverified_tokens: int = 0  # tokens of the output still unverified at the end

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
    """The output. ``token_ids[:unverified_from]`` is exactly the target's; the rest (only when
    the run ended while the cloud was unreachable, offline policy "draft") is the draft's alone.
    ``unverified_from`` is None when everything was verified."""

    text: str
    token_ids: list
    stats: GenerationStats
    prompt_ids: list = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "eos"
    unverified_from: Optional[int] = None

    @property
    def verified(self) -> bool:
        return self.unverified_from is None

    @property
    def verified_token_ids(self) -> list:
        return self.token_ids if self.unverified_from is None else self.token_ids[: self.unverified_from]


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
        self.on_event: Optional[Callable[[str, list[int]], None]] = None  # ("verified" | "unverified" | "retract", ids)
        self.base = 0  # run position of the current cloud session's position 0 (re-opened after a loss)
        self.opens = 0  # cloud sessions opened for this run
        self.complete = False  # the run reached max_new / EOS / the cloud's finish
        self.gen = torch.Generator()  # the draft's sampling RNG, across sessions and offline stretches
        self.gen.manual_seed(params.seed or 0)
        self.shown_unverified = 0  # seq[committed: committed + shown_unverified] was emitted unverified
        self.uq: list[tuple] = []  # (prob, q_ids, q_probs) of each of those tokens (exact sampled verification)
        self.offline_since: Optional[float] = None  # monotonic time of the loss; None when online
        self.backoff = Backoff(cfg.reconnect_initial_s, cfg.reconnect_max_s)
        self.wire_acc = [0, 0, 0]  # bytes sent, received, messages sent on earlier connections
        self._b0 = (0, 0, 0)
        self.t0 = time.perf_counter()
        self.full_q: dict[tuple[int, int], np.ndarray] = {}
        self.tuner_on = False  # this run feeds the edge's threshold tuner
        self.wire_s = 0.0  # send thread: time blocked in the (emulated) link
        # Send thread: where the last verify request ended (its bonus position); None after a
        # rollback, until the next request.
        self.await_pos: Optional[int] = None
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
        self.cloud_url = cloud_url
        self._host, self._port = host, int(port)
        # Kept for reconnecting after the cloud was lost (same token, name, link, timeout).
        self._connect_kw = dict(auth_token=auth_token, client_name=client_name, link=link, timeout_s=connect_timeout_s)
        self.conn = self._dial()
        ack = self.conn.hello_ack
        self.cost = CostModel()
        log.info("connected to %s (%s)", cloud_url, ack.server_name, extra={"cloud": cloud_url})
        self._next_sid = 1
        self._lock = threading.Lock()
        self._offline = False
        # Online threshold tuner (PipeSD mechanism 3): "bayes", "fixed" or None. It tunes the
        # methods that use both thresholds; the others keep their configured trigger.
        self.tuner = None
        if tuner is not None:
            from pipesd.tuning import make_online_tuner

            t = self.config.trigger
            self.tuner = make_online_tuner(tuner, (t.tau_seq, t.tau_tok), seed=tuner_seed,
                                           window_tokens=tuner_window_tokens)

    # ------------------------------------------------------------------ public API
    @property
    def offline(self) -> bool:
        """True while a generation runs without the cloud: from a loss until the first verdict
        after it (drafting alone under policy "draft", waiting under "wait")."""
        return self._offline

    def close(self) -> None:
        if self.tuner is not None:
            self.tuner.close()
        self.conn.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _dial(self) -> wire.EdgeConnection:
        """Connect and handshake; refuse a cloud that serves another tokenizer (ValueError)."""
        conn = wire.EdgeConnection.connect(self._host, self._port, **self._connect_kw)
        ack = conn.hello_ack
        if ack.tokenizer_fingerprint and self.fingerprint and ack.tokenizer_fingerprint != self.fingerprint:
            conn.close()
            raise ValueError(f"the cloud's tokenizer ({ack.tokenizer_fingerprint}) differs from the draft's "
                             f"({self.fingerprint}): draft and target must share one tokenizer")
        if ack.vocab_size and ack.vocab_size != self.draft.vocab_size and not self.fingerprint:
            conn.close()
            raise ValueError(f"vocabulary sizes differ: draft {self.draft.vocab_size}, cloud {ack.vocab_size}")
        return conn

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
                 sampling: Optional[SamplingParams] = None, config: Optional[EdgeConfig] = None) -> Generation:
        """Generate up to ``max_new_tokens`` tokens (greedy unless ``sampling`` says otherwise)."""
        return self._generate(prompt, max_new_tokens, sampling, config, None)

    def stream(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
               sampling: Optional[SamplingParams] = None, config: Optional[EdgeConfig] = None) -> Iterator[str]:
        """Yield text pieces as they are verified (never text that a verdict could change).

        Draft-only text (offline policy "draft") is never yielded: when the run ends while the
        cloud is still unreachable, :class:`CloudUnavailableError` is raised after the verified
        text, with the flagged :class:`Generation` in its ``generation``. Use
        :meth:`stream_events` to see unverified text as it is drafted.
        """
        q: "queue.Queue" = queue.Queue()
        tok = self.tokenizer
        state = {"ids": [], "text": ""}

        def on_commit(kind: str, ids: list[int]) -> None:
            if kind != "verified":
                return
            state["ids"].extend(ids)
            text = tok.decode(state["ids"], skip_special_tokens=True) if tok is not None else " ".join(map(str, state["ids"]))
            if text.endswith("\ufffd"):
                return  # an incomplete UTF-8 sequence: wait for the next token
            if len(text) > len(state["text"]) and text.startswith(state["text"]):
                q.put(text[len(state["text"]):])
            state["text"] = text

        yield from self._on_thread(q, lambda: self._generate(prompt, max_new_tokens, sampling, config, on_commit))
        gen = self.last_generation
        if gen.unverified_from is not None:
            raise CloudUnavailableError(
                f"the cloud at {self.cloud_url} was unreachable when the generation ended: the last "
                f"{len(gen.token_ids) - gen.unverified_from} tokens are the draft's alone (unverified; "
                "see .generation, or use stream_events)", generation=gen)

    def stream_events(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
                      sampling: Optional[SamplingParams] = None,
                      config: Optional[EdgeConfig] = None) -> Iterator[StreamEvent]:
        """Yield :class:`StreamEvent` s: ``"verified"`` text (final), ``"unverified"`` text drafted
        while the cloud is unreachable, and ``"retract"`` of the unverified tail when the cloud
        has it verified (what it accepts comes back as ``"verified"``). Verified text is never
        retracted. ``last_generation`` holds the :class:`Generation` afterwards.
        """
        q: "queue.Queue" = queue.Queue()
        text = EventText(self._decode_ids, q.put)

        def on_event(kind: str, ids: list[int]) -> None:
            if kind == "verified":
                text.verified(ids)
            elif kind == "unverified":
                text.unverified(ids)
            else:
                text.retract()

        def generate() -> Generation:
            gen = self._generate(prompt, max_new_tokens, sampling, config, on_event)
            text.finish()
            return gen

        yield from self._on_thread(q, generate)

    def _on_thread(self, q: "queue.Queue", generate: Callable[[], Generation]) -> Iterator:
        """Run ``generate`` (which feeds ``q``) on its own thread and yield what it queues; its
        error is re-raised here, its Generation becomes ``last_generation``."""
        result: dict = {}

        def run() -> None:
            try:
                result["gen"] = generate()
            except BaseException as e:  # re-raised in the consumer
                result["error"] = e
            finally:
                q.put(None)

        th = threading.Thread(target=run, name="pipesd-stream", daemon=True)
        th.start()
        while (item := q.get()) is not None:
            yield item
        th.join()
        if "error" in result:
            raise result["error"]
        self.last_generation = result["gen"]

    def _decode_ids(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

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

    def _generate(self, prompt, max_new_tokens, sampling, config, on_event) -> Generation:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        cfg = config or self.config
        params = sampling or SamplingParams()
        ids = self._encode(prompt)
        with self._lock:  # one generation at a time per connection
            sid = self._next_sid
            self._next_sid += 1
            run = _Run(sid, ids, max_new_tokens, params, cfg)
            run.on_event = on_event
            if cfg.method == "edge-only":
                self._edge_only(run)
            else:
                try:
                    self._session(run)
                finally:
                    self._offline = False
                    try:
                        self.conn.send(M.CloseSession(run.sid))
                    except Exception:
                        pass
        st = run.stats
        n_out = run.committed + run.shown_unverified  # a draft-only suffix only when the run ended offline
        st.new_tokens = n_out
        st.unverified_tokens = run.shown_unverified
        st.tpt_s = st.wall_s / max(1, n_out)
        st.trigger_reasons = dict(run.reasons)
        st.cost_g_s, st.cost_s_s, st.cost_c_s = self.cost.gen_s, self.cost.startup_s, self.cost.per_token_s
        if self._tuned(cfg):
            st.tau_seq, st.tau_tok = self.tuner.current()
            st.tuner = self.tuner.stats()
        log.info("generation %d done (%s): %d tokens, TPT %.1f ms, %d verifications, %d rollbacks", sid, cfg.method,
                 st.new_tokens, st.tpt_s * 1e3, st.verifications, st.rollbacks,
                 extra={"session": sid, "method": cfg.method, "tokens": st.new_tokens, "tpt_s": st.tpt_s})
        tokens = run.seq[:n_out]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Generation(text, tokens, st, ids, run.finish_reason, run.committed if run.shown_unverified else None)

    def _open(self, run: _Run) -> None:
        """Open a cloud session for what is left of the run. Its prompt is the prompt plus the
        verified output, so a session re-opened after a loss continues where the target was."""
        if self.conn.closed:
            raise wire.ConnectionClosed("the connection to the cloud is closed")
        p = run.params
        seed = p.seed or 0
        if run.opens:  # a re-open: a fresh session id, and a fresh seed for the cloud's RNG, so its
            run.sid = self._next_sid  # draws stay independent of the earlier session's (exact sampling)
            self._next_sid += 1
            seed = (seed + run.opens * 0x9E3779B97F4A7C15) % (1 << 63)
        run.base = run.committed
        run.epoch = 0
        run.triggered.clear()
        run.full_q.clear()
        prompt = run.prompt + run.seq[: run.committed]
        self.conn.send(M.OpenSession(run.sid, np.asarray(prompt, dtype=np.int32), p.temperature, p.top_k, p.top_p,
                                     p.min_p, seed, self.fingerprint, run.max_new - run.committed))
        deadline = time.monotonic() + run.cfg.verdict_timeout_s
        while True:
            msg = self.conn.recv(max(0.01, deadline - time.monotonic()))
            if msg is None:
                raise TimeoutError(f"the cloud did not open session {run.sid} within {run.cfg.verdict_timeout_s} s")
            if isinstance(msg, M.SessionOpened) and msg.session_id == run.sid:
                break
            if isinstance(msg, M.Error):
                raise RuntimeError(f"the cloud refused the session: {msg.message} (code {msg.code})")
        if not run.opens:
            run.t0 = time.perf_counter()
        run.opens += 1
        run._b0 = (self.conn.bytes_sent, self.conn.bytes_received, self.conn.messages_sent)

    def _commit(self, run: _Run, new: list[int]) -> None:
        self._emit(run, "verified", new)

    @staticmethod
    def _emit(run: _Run, kind: str, ids: list[int]) -> None:
        if run.on_event is not None and (ids or kind == "retract"):
            run.on_event(kind, list(ids))

    # -- offline robustness -------------------------------------------------------------
    def _session(self, run: _Run) -> None:
        """Run the generation against the cloud; when the cloud is lost, apply the offline policy
        and, once it is back, re-open, reconcile the unverified suffix and go on."""
        cause: Optional[BaseException] = None
        if self.conn.closed:
            cause = wire.ConnectionClosed("the connection to the cloud is closed")
        while True:
            if cause is not None:
                if not self._recover(run, cause):
                    run.stats.wall_s = time.perf_counter() - run.t0
                    self._wire_stats(run)
                    return  # ended offline: the suffix stays flagged unverified
                cause = None
            try:
                self._open(run)
                if run.shown_unverified:
                    self._reconcile(run)
                if run.complete:
                    run.stats.wall_s = time.perf_counter() - run.t0
                    self._wire_stats(run)
                elif run.cfg.method == "target-only":
                    self._target_only(run)
                else:
                    self._pipelined(run)
                return
            except BaseException as e:
                if not is_link_loss(e):
                    raise
                cause = e

    def _recover(self, run: _Run, cause: BaseException) -> bool:
        """The cloud is lost. Returns True with a new connection in place, False when the run
        ended offline (policy "draft"); raises :class:`CloudUnavailableError` when the policy
        gives up."""
        cfg, st = run.cfg, run.stats
        self._wire_mark(run)
        self.conn.close(flush_timeout_s=0.5)
        # Drafts that were never shown (in flight when the link went) are dropped: offline
        # drafting redoes them with their q kept, and the user saw none of them.
        del run.seq[run.committed + run.shown_unverified:]
        if cfg.offline_policy == "fail":
            raise CloudUnavailableError(f"lost the cloud at {self.cloud_url}: {cause} (offline_policy 'fail')",
                                        cause) from cause
        self._offline = True
        if run.offline_since is None:
            run.offline_since = time.monotonic()
            st.offline_episodes += 1
            log.warning("session %d: lost the cloud at %s (%s); offline policy %r", run.sid, self.cloud_url, cause,
                        cfg.offline_policy, extra={"session": run.sid, "cloud": self.cloud_url})
        rc = Reconnector(self._dial, run.backoff, run.backoff.next()).start()
        try:
            if cfg.offline_policy == "wait":
                left = run.offline_since + cfg.offline_wait_s - time.monotonic()
                conn = rc.wait(left)
                if conn is None:
                    why = rc.last_error or cause
                    raise CloudUnavailableError(f"the cloud at {self.cloud_url} did not come back within "
                                                f"offline_wait_s={cfg.offline_wait_s} s (last error: {why})",
                                                cause) from cause
            else:
                conn = self._draft_offline(run, rc)
                if conn is None:
                    st.offline_s += time.monotonic() - run.offline_since
                    return False
        finally:
            rc.stop()
        self.conn = conn
        run._b0 = (conn.bytes_sent, conn.bytes_received, conn.messages_sent)
        st.reconnects += 1
        log.info("session %d: reconnected to %s after %d attempt(s)", run.sid, self.cloud_url, rc.attempts,
                 extra={"session": run.sid, "cloud": self.cloud_url})
        return True

    def _draft_offline(self, run: _Run, rc: Reconnector):
        """Draft alone, emitting unverified tokens, until the reconnector has a connection (returned)
        or the run reaches max_new / EOS (None)."""
        d, cfg = self.draft, run.cfg
        eos = getattr(self.tokenizer, "eos_token_id", None)
        d.reset(run.prompt + run.seq)
        while True:
            conn = rc.poll()
            if conn is not None:
                return conn
            if len(run.seq) >= run.max_new or (run.shown_unverified and run.seq[-1] == eos):
                return None
            t0 = time.perf_counter()
            st = d.step(run.params, run.gen)
            self._pad(t0, cfg.draft_step_s)
            run.seq.append(st.token)
            run.uq.append((st.prob, st.q_ids, st.q_probs))
            run.shown_unverified += 1
            run.stats.offline_tokens += 1
            run.stats.drafted += 1
            if st.token == eos:
                run.finish_reason = "eos"
            self._emit(run, "unverified", [st.token])

    def _reconcile(self, run: _Run) -> None:
        """Have the unverified suffix verified by the re-opened session: what the target accepts
        becomes verified, the first rejected token is replaced by the target's, the rest is void."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        run.finish_reason = "length"  # a drafted EOS counts only once the target agrees
        self.draft.reset(run.prompt + run.seq)
        limit = getattr(self.conn.hello_ack, "max_draft_in_flight", 0) or 256
        chunk = max(1, min(limit, 128))
        while run.shown_unverified and not run.complete:
            start, n_tail = run.committed, run.shown_unverified
            n = min(n_tail, chunk)
            recs = run.uq[:n]
            tokens = np.asarray(run.seq[start: start + n], dtype=np.int32)
            probs = np.asarray([r[0] for r in recs], dtype=np.float32)
            q_ids = q_probs = None
            if not run.params.greedy or run.cfg.wire_q != "auto":
                k = max(len(r[1]) for r in recs)
                q_ids = np.zeros((n, k), dtype=np.int32)
                q_probs = np.zeros((n, k), dtype=np.float32)
                for i, r in enumerate(recs):
                    q_ids[i, : len(r[1])] = r[1]
                    q_probs[i, : len(r[2])] = r[2]
            last = n == n_tail
            self.conn.send(M.DraftBatch(run.sid, run.epoch, start - run.base, tokens, probs, True, last, q_ids,
                                        q_probs, time.perf_counter()))
            run.stats.batch_sizes.append(n)
            v = self._wait_verdict(run)
            if v.epoch != run.epoch or v.start_pos + run.base != start:
                raise RuntimeError(f"the cloud answered the unverified suffix out of order (verdict for "
                                   f"{v.start_pos}, epoch {v.epoch}; expected {start - run.base}, epoch {run.epoch})")
            # The whole unverified tail is withdrawn; what the target accepted comes back verified.
            self._emit(run, "retract", run.seq[start: start + n_tail])
            moved = self._apply_verdict(run, None, None, v, eos)
            if moved or run.complete:  # the tail past the verdict is void
                run.shown_unverified = 0
                run.uq.clear()
                del run.seq[run.committed:]
            else:  # a chunk fully accepted: the rest of the tail is still unverified
                left = max(0, len(run.seq) - run.committed)
                del run.uq[: len(run.uq) - left]
                run.shown_unverified = left
                self._emit(run, "unverified", run.seq[run.committed:])

    def _back_online(self, run: _Run) -> None:
        """The first verdict after a loss: the offline episode is over."""
        run.stats.offline_s += time.monotonic() - run.offline_since
        run.offline_since = None
        run.backoff.reset()
        self._offline = False

    # -- target-only: one round trip per token ---------------------------------------
    def _target_only(self, run: _Run) -> None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        empty_i = np.zeros(0, dtype=np.int32)
        empty_f = np.zeros(0, dtype=np.float32)
        while run.committed < run.max_new:
            self.conn.send(M.DraftBatch(run.sid, run.epoch, run.committed - run.base, empty_i, empty_f, verify=True,
                                        bonus=True, sent_at=time.perf_counter()))
            v = self._wait_verdict(run)
            if run.offline_since is not None:
                self._back_online(run)
            run.seq.append(v.correction)
            run.committed += 1  # a bonus with nothing drafted: the epoch stays (continuation rule)
            run.stats.verifications += 1
            run.stats.cloud_forwards += v.target_forwards
            run.stats.cloud_busy_s += v.verify_s
            self._commit(run, [v.correction])
            if v.finished or v.correction == eos:
                run.finish_reason = "eos" if v.correction == eos else "length"
                break
        run.complete = True
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

    def _wire_mark(self, run: _Run) -> None:
        """Add the current connection's traffic since the last mark to the run's totals."""
        c = self.conn
        now = (c.bytes_sent, c.bytes_received, c.messages_sent)
        for i in range(3):
            run.wire_acc[i] += now[i] - run._b0[i]
        run._b0 = now

    def _wire_stats(self, run: _Run) -> None:
        self._wire_mark(run)
        st = run.stats
        st.bytes_sent, st.bytes_received, st.messages_sent = run.wire_acc

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
        run.done, run.error, run.verdicts = threading.Event(), None, queue.Queue()  # fresh per cloud session
        topk_max = self.draft.wire_topk
        ring = TokenRing(cfg.ring_capacity, topk_max)
        while ring.epoch < run.epoch:  # a session re-opened after a loss: the reconciliation moved the epoch
            ring.bump_epoch()
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
            if run.error is not None and is_link_loss(run.error):
                self.conn.close(flush_timeout_s=0.5)  # unblocks a send stuck on a silent cloud
            for t in threads:
                t.join(timeout=cfg.verdict_timeout_s)
            if tuned:
                self.tuner.end_run()
                run.tuner_on = False
        run.stats.wall_s = time.perf_counter() - run.t0
        run.stats.edge_overhead_s += run.send_overhead_s
        run.send_overhead_s = 0.0  # counted; a session re-opened after a loss adds its own
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
        d.reset(run.prompt + run.seq)  # the verified output so far (not empty after a re-open)
        trig = DualThresholdTrigger(cfg.trigger)
        gen = run.gen
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
                    elif v.end_pos + run.base >= len(run.seq):
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

    def _apply_verdict(self, run: _Run, ring: Optional[TokenRing], trig, v: M.Verdict, eos) -> bool:
        """Commit / roll back; returns True when the epoch moved (drafting restarts)."""
        start = v.start_pos + run.base  # run position (the session may have been re-opened)
        if v.epoch != run.epoch or start != run.committed:
            return False  # cannot happen with an honest cloud; ignore rather than corrupt
        if run.offline_since is not None:
            self._back_online(run)
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
            st.timeline.append(("verdict", t, t, (start, v.accepted, v.correction)))
            st.timeline.append(("verify", max(0.0, t - v.verify_s), t, v.verify_s))
        accepted = run.seq[start: start + v.accepted]
        new = list(accepted)
        moved = False
        if v.correction >= 0:
            t, at = int(v.correction), start + v.accepted
            new.append(t)
            if not v.rejected:
                st.bonus_tokens += 1
            if not v.rejected and len(run.seq) > at and run.seq[at] == t:
                # Continuation rule: the draft at the bonus position is the target's token, so it
                # and every draft after it stand; same epoch on both sides.
                st.bonus_kept += 1
            elif not v.rejected and len(run.seq) == at:
                run.seq.append(t)  # nothing drafted there yet: the bonus extends the sequence
                self.draft.extend([t])
                moved = True
            else:  # a correction, or a bonus that differs from the draft there: drafts past it are void
                del run.seq[at:]
                run.seq.append(t)
                run.epoch += 1
                run.await_pos = None
                if ring is not None:
                    ring.bump_epoch()
                st.rollbacks += 1
                log.debug("session %d: rollback at position %d (%d accepted)", run.sid, at, v.accepted)
                self.draft.truncate(len(run.prompt) + at)
                self.draft.extend([t])
                run.triggered = {k: b for k, b in run.triggered.items() if k[0] == run.epoch}
                run.full_q = {k: q for k, q in run.full_q.items() if k[0] == run.epoch}
                moved = True
        run.committed = v.verified_len + run.base
        if len(run.seq) > run.committed and v.finished:
            del run.seq[run.committed:]
        self._commit(run, new)
        if run.tuner_on:
            self.tuner.observe(len(new))
        if v.finished or run.committed >= run.max_new or (eos is not None and eos in new):
            if eos is not None and eos in new:
                run.finish_reason = "eos"
            run.complete = True
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
                    self._ship(run, pending, cur_epoch, True, bonus, timeline, ring)
                    pending = []
                    batcher.end_segment(since)
                    since = 0
                    batcher.begin_segment()
                    cut = False
                elif batcher.cut_now(since):
                    cut = True
            if cut and pending:
                self._ship(run, pending, cur_epoch, False, False, timeline, ring)
                pending = []
            run.send_overhead_s += perf() - t_pop - (run.wire_s - wire0)

    def _ship(self, run: _Run, recs: list[tuple], epoch: int, verify: bool, bonus: bool, timeline,
              ring: Optional[TokenRing] = None) -> None:
        if ring is not None and ring.epoch != epoch:
            return  # a rollback since these were popped: void
        committed = run.committed
        if recs[0][0] < committed:
            # Confirmed by a bonus token while queued here (continuation rule): already verified,
            # not sent. (Should one slip through, the cloud trims it.)
            recs = [r for r in recs if r[0] >= committed]
            if not recs:
                return
        n = len(recs)
        # The draft at the bonus position of the verification in flight goes as a hint: the
        # cloud only compares it with the bonus (continuation rule), so its q stays here.
        hint = recs[0][0] == run.await_pos and committed <= recs[0][0]
        qrecs = recs[1:] if hint else recs
        tokens = np.fromiter((r[1] for r in recs), dtype=np.int32, count=n)
        probs = np.fromiter((r[2] for r in recs), dtype=np.float32, count=n)
        q_ids = q_probs = None
        if not qrecs:
            pass
        elif run.cfg.wire_q == "full":
            V = self.draft.vocab_size
            q_ids = np.broadcast_to(np.arange(V, dtype=np.int32), (len(qrecs), V))
            rows = [run.full_q.get((epoch, r[0])) for r in qrecs]
            if any(q is None for q in rows):
                return  # a rollback voided these records while they were being shipped: stale, not sent
            q_probs = np.stack(rows)
        elif qrecs[0][5] > 0:
            k = max(r[5] for r in qrecs)
            q_ids = np.stack([r[3][:k] for r in qrecs]).astype(np.int32, copy=False)
            q_probs = np.stack([r[4][:k] for r in qrecs]).astype(np.float32, copy=False)
        t0 = time.perf_counter()
        msg = M.DraftBatch(run.sid, epoch, recs[0][0] - run.base, tokens, probs, verify, bonus, q_ids, q_probs, t0,
                           hint)
        t_send = time.perf_counter()
        self.conn.send(msg)
        t1 = time.perf_counter()
        run.wire_s += t1 - t_send
        if verify:
            run.await_pos = recs[-1][0] + 1
        if hint:
            run.stats.hints_sent += 1
        self.cost.observe_send(n - hint, t1 - t0)  # a hint carries no q: it costs like a header
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
