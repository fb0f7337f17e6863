"""The edge client: the public face of the edge (``EdgeClient``: generate, stream,
stream_events). It dials the cloud and composes the rooms:

- :mod:`pipesd.edge.session`: a run and its cloud sessions (open, the one receive loop,
  verdicts through :class:`pipesd.protocol.EdgeSession`, wire accounting);
- :mod:`pipesd.edge.pipeline`: the compute, send and receive threads around the ring;
- :mod:`pipesd.edge.offline`: the offline policy (draft alone, reconnect, reconcile);
- :mod:`pipesd.edge.baselines`: ``cloud-stream``, ``target-per-token`` and ``edge-only``;
- :mod:`pipesd.edge.stats`: :class:`Generation` and :class:`GenerationStats`.

Rollback is exact: after a correction at position r every record, batch and cache entry past
r is void (epoch), and the cloud drops stale batches by the same epoch.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import ssl
import threading
import time
from typing import Callable, Iterator, Optional, Sequence, Union

from pipesd.edge.baselines import cloud_stream, edge_only, target_per_token
from pipesd.edge.config import EdgeConfig
from pipesd.edge.offline import CloudUnavailableError, EventText, StreamEvent, is_link_loss, reconcile, recover
from pipesd.edge.pipeline import run_pipelined
from pipesd.edge.schedule import AdaptiveSchedule
from pipesd.edge.session import Cancel, Run, open_session
from pipesd.edge.stats import Generation, GenerationStats
from pipesd.edge.tree import tree_rounds
from pipesd.fingerprint import tokenizer_fingerprint
from pipesd.sampling import SamplingParams
from pipesd.scheduling import CostModel
from pipesd.transport import conn as wire
from pipesd.transport import messages as M

__all__ = ["EdgeClient", "Generation", "GenerationStats", "StreamEvent", "CloudUnavailableError"]

log = logging.getLogger("pipesd.edge")


def _seeded(sampling: Optional[SamplingParams]) -> SamplingParams:
    """A run's sampling parameters. Unseeded sampling draws a fresh seed, so unseeded runs
    differ; the run's stats report it (``GenerationStats.seed``) to replay it. Greedy draws none."""
    p = sampling or SamplingParams()
    if p.greedy or p.seed is not None:
        return p
    return dataclasses.replace(p, seed=secrets.randbelow(2**63))  # the wire's seed is a signed int64


class EdgeClient:
    """Generate with a draft model here and the target model in the cloud.

    ``cloud_url`` is ``HOST:PORT``. ``draft`` is a :class:`pipesd.models.DraftModel` (default:
    the bundled pair's draft). ``link`` (a :class:`pipesd.transport.LinkEmulator`) emulates
    bandwidth, delay and per-message overhead on this connection.

    TLS (``tls``, ``tls_ca``, ``tls_insecure``) and ``write_timeout_s`` are passed to
    :meth:`pipesd.transport.conn.EdgeConnection.connect`, for the first connection and every
    reconnection; ``tls=None`` with neither of the others reads the ``PIPESD_TLS*`` environment.
    """

    def __init__(self, cloud_url: str, draft=None, config: Optional[EdgeConfig] = None, *,
                 auth_token: str = "", link=None, connect_timeout_s: float = 10.0, client_name: str = "pipesd-edge",
                 tuner: Optional[str] = None, tuner_seed: int = 0, tuner_window_tokens: int = 64,
                 tls: Union[bool, ssl.SSLContext, None] = None, tls_ca: Optional[str] = None,
                 tls_insecure: bool = False, write_timeout_s: float = wire.WRITE_TIMEOUT_S) -> None:
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
        # Kept for reconnecting after the cloud was lost (same token, name, link, timeouts, TLS).
        self._connect_kw = dict(auth_token=auth_token, client_name=client_name, link=link, timeout_s=connect_timeout_s,
                                tls=tls, tls_ca=tls_ca, tls_insecure=tls_insecure, write_timeout_s=write_timeout_s)
        self.conn = self._dial()
        ack = self.conn.hello_ack
        self.cost = CostModel()
        log.info("connected to %s (%s)", cloud_url, ack.server_name, extra={"cloud": cloud_url})
        self._next_sid = 1
        self._lock = threading.Lock()
        self._run: Optional[Run] = None  # the generation in progress
        self._owner: Optional[int] = None  # the thread running it (close() must not wait for itself)
        self._closing = threading.Event()  # close() cancels the generation in progress
        self.schedule: Optional[AdaptiveSchedule] = None  # method "pipesd-adaptive": made at its first generation
        # Online threshold tuner (PipeSD mechanism 3): "bayes", "fixed" or None. It tunes the
        # methods that use both thresholds; the others keep their configured trigger.
        self.tuner = None
        if tuner is not None:
            from pipesd.tuning import make_online_tuner

            t = self.config.trigger
            # the cloud budget (cloud busy ms per generated token) bounds what the tuner may choose
            self.tuner = make_online_tuner(tuner, (t.tau_seq, t.tau_tok), seed=tuner_seed,
                                           window_tokens=tuner_window_tokens,
                                           cloud_budget_ms_per_token=getattr(self.config, "cloud_budget_ms_per_token",
                                                                             None))

    # ------------------------------------------------------------------ public API
    @property
    def offline(self) -> bool:
        """True while a generation runs without the cloud: from a loss until the first verdict
        after it (drafting alone under policy "draft", waiting under "wait")."""
        run = self._run
        return run is not None and run.offline_since is not None

    def close(self) -> None:
        """Close the connection. A generation still running (on another thread, or one that a
        Ctrl-C left behind: ``with EdgeClient(...)`` closes on the way out) is cancelled first and
        its cloud session closed, waiting at most ``config.verdict_timeout_s``: closing the
        socket under it would look like a lost cloud, and its threads must not outlive it."""
        self._closing.set()
        waited = self._owner != threading.get_ident() and self._lock.acquire(timeout=self.config.verdict_timeout_s)
        try:
            if waited:
                self._closing.clear()  # a later generate (it re-dials) is not cancelled
            if self.tuner is not None:
                self.tuner.close()
            self.conn.close()
        finally:
            if waited:
                self._lock.release()

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
                 sampling: Optional[SamplingParams] = None, config: Optional[EdgeConfig] = None, *,
                 cancel: Optional[threading.Event] = None) -> Generation:
        """Generate up to ``max_new_tokens`` tokens (greedy unless ``sampling`` says otherwise).
        Sampling without a seed draws a fresh one: ``stats.seed`` replays the run.

        ``cancel``: set it (from any thread) to end the generation early. It returns what was
        verified by then (a prefix of the uncancelled output) with ``finish_reason``
        ``"cancelled"``, and the cloud session is closed at once. The flag is checked at every
        draft step or verdict, so a run waiting on a verdict ends when that verdict arrives.
        """
        return self._generate(prompt, max_new_tokens, sampling, config, None, Cancel(cancel))

    def stream(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
               sampling: Optional[SamplingParams] = None, config: Optional[EdgeConfig] = None, *,
               cancel: Optional[threading.Event] = None) -> Iterator[str]:
        """Yield text pieces as they are verified (never text that a verdict could change).

        Cancel as :meth:`generate` (``cancel``), or close the iterator (``.close()``, leaving a
        ``for`` loop with ``break`` and dropping it): the generation ends, the cloud session is
        closed, and ``last_generation`` holds what was verified (``finish_reason`` ``"cancelled"``).

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

        stop = threading.Event()  # set when the consumer closes the stream
        yield from self._on_thread(q, lambda: self._generate(prompt, max_new_tokens, sampling, config, on_commit,
                                                             Cancel(cancel, stop)), stop)
        gen = self.last_generation
        if gen.unverified_from is not None:
            raise CloudUnavailableError(
                f"the cloud at {self.cloud_url} was unreachable when the generation ended: the last "
                f"{len(gen.token_ids) - gen.unverified_from} tokens are the draft's alone (unverified; "
                "see .generation, or use stream_events)", generation=gen)

    def stream_events(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 128,
                      sampling: Optional[SamplingParams] = None,
                      config: Optional[EdgeConfig] = None, *,
                      cancel: Optional[threading.Event] = None) -> Iterator[StreamEvent]:
        """Yield :class:`StreamEvent` s: ``"verified"`` text (final), ``"unverified"`` text drafted
        while the cloud is unreachable, and ``"retract"`` of the unverified tail when the cloud
        has it verified (what it accepts comes back as ``"verified"``). Verified text is never
        retracted. ``last_generation`` holds the :class:`Generation` afterwards. Cancelled as
        :meth:`stream` (``cancel``, or closing the iterator).
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

        stop = threading.Event()  # set when the consumer closes the stream

        def generate() -> Generation:
            gen = self._generate(prompt, max_new_tokens, sampling, config, on_event, Cancel(cancel, stop))
            text.finish()
            return gen

        yield from self._on_thread(q, generate, stop)

    def _on_thread(self, q: "queue.Queue", generate: Callable[[], Generation], stop: threading.Event) -> Iterator:
        """Run ``generate`` (which feeds ``q``) on its own thread and yield what it queues; its
        error is re-raised here, its Generation becomes ``last_generation``. Closing the
        iterator sets ``stop`` (the run's cancel flag) and waits for the run to end."""
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
        try:
            while (item := q.get()) is not None:
                yield item
        except BaseException:  # the consumer left (GeneratorExit) or was interrupted (KeyboardInterrupt):
            stop.set()  # cancel, and go on once the session is closed and the run's threads are joined
            th.join()
            if "gen" in result:
                self.last_generation = result["gen"]
            raise
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

    def _new_sid(self) -> int:
        sid = self._next_sid
        self._next_sid += 1
        return sid

    def _generate(self, prompt, max_new_tokens, sampling, config, on_event, cancel: Cancel) -> Generation:
        cancel = Cancel(*cancel.events, self._closing)  # close() ends it too
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        cfg = config or self.config
        ids = self._encode(prompt)
        with self._lock:  # one generation at a time per connection
            asked, schedule = cfg, None
            if cfg.method == "pipesd-adaptive":  # the schedule the model ranks fastest within the budget
                if self.schedule is None:
                    self.schedule = AdaptiveSchedule(lookup_allowed=not getattr(self.draft, "replayed", False))
                self.schedule.observe_rtt(self.conn.handshake_rtt_s)
                cfg, *schedule = self.schedule.config_for(cfg)
            run = Run(self._new_sid(), ids, max_new_tokens, _seeded(sampling), cfg,
                      getattr(self.tokenizer, "eos_token_id", None))
            if schedule:
                run.stats.method, (run.stats.schedule, run.stats.schedule_reason) = asked.method, schedule
            run.on_event = on_event
            run.stats.seed = run.params.seed
            run.cancel = cancel
            self._run, self._owner = run, threading.get_ident()
            try:
                if cancel.is_set():  # cancelled while it waited for the lock: the cloud is not asked
                    pass
                elif cfg.method == "edge-only":
                    edge_only(self, run)
                else:
                    self._session(run)
            finally:
                self._run, self._owner = None, None
                if cfg.method != "edge-only" and (run.opens or not cancel.is_set()):
                    try:
                        self.conn.send(M.CloseSession(session_id=run.sid))
                    except Exception:
                        pass
            if cancel.is_set() and not run.complete:
                run.finish_reason = "cancelled"
            gen = self._result(run)  # sets the stats' tokens and TPT, which the schedule reads
            if schedule:
                self.schedule.observe(run.stats, self.cost, asked, calibrate=run.finish_reason != "cancelled")
        return gen

    def _result(self, run: Run) -> Generation:
        st, cfg = run.stats, run.cfg
        n_out = run.committed + run.shown_unverified  # a draft-only suffix only when the run ended offline
        st.new_tokens = n_out
        st.unverified_tokens = run.shown_unverified
        st.tpt_s = st.wall_s / max(1, n_out)
        st.trigger_reasons = dict(run.reasons)
        st.cost_g_s, st.cost_s_s, st.cost_c_s = self.cost.gen_s, self.cost.startup_s, self.cost.per_token_s
        if self._tuned(cfg):
            st.tau_seq, st.tau_tok = self.tuner.current()
            st.tuner = self.tuner.stats()
        log.info("generation %d done (%s): %d tokens, TPT %.1f ms, %d verifications, %d rollbacks", run.sid,
                 cfg.method, st.new_tokens, st.tpt_s * 1e3, st.verifications, st.rollbacks,
                 extra={"session": run.sid, "method": cfg.method, "tokens": st.new_tokens, "tpt_s": st.tpt_s})
        tokens = run.seq[:n_out]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Generation(text, tokens, st, run.prompt, run.finish_reason,
                          run.committed if run.shown_unverified else None)

    def _session(self, run: Run) -> None:
        """Run the generation against the cloud; when the cloud is lost, apply the offline policy
        and, once it is back, re-open, reconcile the unverified suffix and go on."""
        cause: Optional[BaseException] = None
        if self.conn.closed:
            cause = wire.ConnectionClosed("the connection to the cloud is closed")
        while True:
            if run.cancel.is_set():
                return  # cancelled while the cloud was lost: what is verified stands
            if cause is not None:
                if not recover(self, run, cause):
                    run.stats.wall_s = time.perf_counter() - run.t0
                    run.wire_stats(self.conn)
                    return  # ended offline: the suffix stays flagged unverified
                cause = None
            try:
                open_session(self.conn, run, self._new_sid, self.fingerprint)
                if run.shown_unverified:
                    reconcile(self, run)
                if run.complete:
                    run.stats.wall_s = time.perf_counter() - run.t0
                    run.wire_stats(self.conn)
                elif run.cfg.method == "target-per-token":
                    target_per_token(self, run)
                elif run.cfg.method == "cloud-stream":
                    cloud_stream(self, run)
                elif run.cfg.method == "tree-sd":
                    tree_rounds(self, run)
                else:
                    self._pipelined(run)
                return
            except BaseException as e:
                if not is_link_loss(e):
                    raise
                cause = e

    def _tuned(self, cfg: EdgeConfig) -> bool:
        return self.tuner is not None and cfg.method in ("pipesd", "fixed-batch", "dual-no-pipeline")

    def _pipelined(self, run: Run) -> None:
        tuned = self._tuned(run.cfg)
        if tuned:
            self.tuner.begin_run()
            run.tuner = self.tuner
        try:
            run_pipelined(self, run)
        finally:
            if tuned:
                self.tuner.end_run()
                run.tuner = None
