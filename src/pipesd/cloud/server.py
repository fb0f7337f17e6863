"""The cloud: one asyncio server holding one session per edge stream, verifying draft runs
with the target model (NAV) and replying with verdicts.

Concurrency: the event loop owns the sockets and the session bookkeeping; all model work
(target forwards, verification kernels, KV-cache crops) runs on one verifier thread, so the
loop keeps reading frames while the target computes. Sessions whose triggers coincide are
verified together: one batched target forward and one batched ``verify_chain`` launch.

Hardening (docs/security.md): replies never block the loop (a client that stops reading is
dropped past ``max_send_buffer_bytes`` / ``write_timeout_s``), per-client limits on
connections, sessions, draft bytes in flight and tokens per second (a throttling bucket),
optional TLS, and a failed batched launch is retried session by session.

Session state machine (positions count generated tokens, prompt excluded)::

    verified [0, v)  |  pending drafts [v, v + len(pending))
    DraftBatch(epoch == session.epoch, first_pos == v + len(pending)) -> append to pending
    DraftBatch(epoch <  session.epoch) or first_pos < expected       -> stale/duplicate: dropped
    verify flag -> verify pending[: up to the end of that batch]
    verdict: accept a drafts + a correction (rejection: pending cleared, epoch bumped on both
             sides) or a bonus (full acceptance: the continuation rule below)

Continuation rule (every full acceptance of [a, b) carries the target's token t_b, computed
anyway): the edge's draft at b, if it made one, survives with everything after it only when
it equals t_b; otherwise both sides void the drafts past b and bump the epoch. When the
verdict finds the draft at b pending, the server decides at once; otherwise ``check_pos``
waits for the next batch (see ``_confirm_bonus``). Lossless in both modes: the committed token
at b is always the target's own (argmax, or a sample from p), and a kept draft past b was
drafted from that same prefix.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pipesd.sampling import SamplingParams
from pipesd.transport import codec, conn
from pipesd.transport.conn import server_ssl_context
from pipesd.transport import messages as M
from pipesd.verify import verify_chain

log = logging.getLogger("pipesd.cloud")

__all__ = ["CloudConfig", "CloudServer", "CloudStats", "MIN_TEMPERATURE"]

MIN_TEMPERATURE = 1e-6
"""Smallest non-zero sampling temperature a session may ask for: logits / 1e-38 overflow float32
to inf and NaN probabilities. Use 0 for greedy."""


@dataclass
class CloudConfig:
    """Server settings and limits."""

    host: str = "127.0.0.1"
    port: int = 7070  # 0: pick a free port
    auth_token: str = ""
    max_sessions: int = 64
    max_sessions_per_client: int = 8
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 4096
    max_draft_in_flight: int = 256
    max_frame_bytes: int = 8 << 20
    max_batch_sessions: int = 32
    handshake_timeout_s: float = 10.0
    write_timeout_s: float = 30.0
    # Hardening (docs/security.md). A client whose unsent replies exceed max_send_buffer_bytes,
    # or whose socket does not drain within write_timeout_s, is dropped with a logged reason.
    max_clients: int = 256  # connections at once (handshaking included); more get E_LIMIT
    max_send_buffer_bytes: int = 4 << 20  # replies queued for one client that is not reading
    max_inflight_bytes_per_client: int = 64 << 20  # draft bytes (tokens, probs, q) awaiting verification
    # Token bucket per client over prompt + draft tokens: over the rate the server stops reading
    # from that client (TCP backpressure) until the bucket refills; nothing is refused. 0 = off.
    max_tokens_per_s: float = 0.0
    tokens_burst: int = 8192
    tls_cert: Optional[str] = None  # PEM certificate (chain) file: serve TLS when set
    tls_key: Optional[str] = None  # PEM private key (None: in tls_cert)
    # Emulated cloud compute: pad each verification to at least this long (0 = off). Lets a
    # CPU run behave like a big target on a GPU; benchmarks state it in their settings.
    verify_pad_s: float = 0.0
    server_name: str = "pipesd-cloud"


@dataclass
class CloudStats:
    verifications: int = 0
    batched_launches: int = 0
    max_batch: int = 0
    target_forwards: int = 0
    wasted_forwards: int = 0  # scored draft tokens that were rejected (or followed a rejection)
    busy_s: float = 0.0
    forward_s: float = 0.0  # target forwards
    kernel_s: float = 0.0  # verification launches
    overhead_s: float = 0.0  # everything else in the verifier (packing, bookkeeping)
    stale_batches: int = 0
    duplicate_batches: int = 0
    sessions_opened: int = 0
    sessions_open: int = 0
    protocol_errors: int = 0
    clients_connected: int = 0  # connections past the handshake, now
    clients_refused: int = 0  # over max_clients
    clients_dropped: int = 0  # dropped by the server: send buffer limit or write deadline
    throttled_s: float = 0.0  # time clients spent paused by the token bucket
    isolated_failures: int = 0  # sessions whose verification failed alone (others in the launch went on)
    batch_size_counts: dict = field(default_factory=dict)  # sessions per launch -> launches (metrics)


@dataclass
class _Session:
    sid: int
    client: "_Client"
    tsession: object  # pipesd.models.TargetSession
    params: SamplingParams
    max_new_tokens: int
    eos_id: Optional[int]
    generator: torch.Generator
    epoch: int = 0
    generated: list = field(default_factory=list)  # verified generated tokens
    pending: list = field(default_factory=list)  # draft tokens after `generated`
    pending_q_ids: list = field(default_factory=list)  # per token np.int32[k]
    pending_q_probs: list = field(default_factory=list)
    pending_nbytes: list = field(default_factory=list)  # wire bytes held per pending draft (client limit)
    verify_upto: int = 0  # number of pending drafts to verify (0: nothing asked)
    verify_requested: bool = False
    bonus: bool = False  # the edge asked for it; the continuation rule gives one on every full acceptance
    check_pos: int = -1  # an unconfirmed bonus position: the edge's draft there must equal the bonus
    hints: set = field(default_factory=set)  # positions of pending hints: settled by a bonus, never verified
    echo_sent_at: float = 0.0
    busy: bool = False  # in the verifier right now
    queued: bool = False  # in the ready queue (at most once)
    finished: bool = False
    closed: bool = False


class _Client:
    def __init__(self, writer: asyncio.StreamWriter, peer: str, rate: float = 0.0, burst: int = 0) -> None:
        self.writer = writer
        self.peer = peer
        self.sessions: dict[int, _Session] = {}
        self.write_lock = asyncio.Lock()
        self.alive = True
        self.inflight_bytes = 0  # sum of the sessions' pending_nbytes
        self.drain_task: Optional[asyncio.Task] = None
        self.bucket = _TokenBucket(rate, burst) if rate > 0 else None


class _TokenBucket:
    """Tokens per second with a burst allowance; a debit may go negative (one big batch), and the
    caller then waits ``-level / rate`` seconds: throttling, never refusal."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.level = self.burst
        self.t = time.monotonic()

    def debit(self, n: int) -> float:
        """Take ``n`` tokens; return the seconds to wait before serving them (0: now)."""
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.t) * self.rate)
        self.t = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate


class CloudServer:
    """Verification server. ``target`` is a :class:`pipesd.models.TargetModel`."""

    def __init__(self, target, config: Optional[CloudConfig] = None, *, tokenizer_fingerprint: str = "") -> None:
        self.target = target
        self.config = config or CloudConfig()
        self._ssl = server_ssl_context(self.config.tls_cert, self.config.tls_key)  # a bad path fails here, clearly
        self.fingerprint = tokenizer_fingerprint
        self.stats = CloudStats()
        from pipesd.energy import EnergyMeter

        self.energy = EnergyMeter()  # NVML's counter on a GPU, else the documented power model
        tok = getattr(target, "tokenizer", None)
        self.eos_id = getattr(tok, "eos_token_id", None) if tok is not None else None
        self.vocab_size = int(target.vocab_size)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pipesd-verify")
        self._server: Optional[asyncio.base_events.Server] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready: Optional[asyncio.Queue] = None
        self._clients: set[_Client] = set()
        self._n_sessions = 0
        self._n_conns = 0  # open connections, handshaking included (max_clients)
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._stop_event: Optional[asyncio.Event] = None
        self.address: tuple[str, int] = (self.config.host, self.config.port)

    # ------------------------------------------------------------------ lifecycle
    async def serve(self) -> None:
        """Run until :meth:`stop` (or cancellation)."""
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Queue()
        self._stop_event = asyncio.Event()
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": self.config.handshake_timeout_s} if self._ssl else {}
        self._server = await asyncio.start_server(self._handle, self.config.host, self.config.port, **tls)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        verifier = asyncio.create_task(self._verifier())
        self._started.set()
        log.info("serving on %s:%d%s", *self.address, " (TLS)" if self._ssl else "")
        try:
            await self._stop_event.wait()
        finally:
            self._server.close()
            verifier.cancel()
            for c in list(self._clients):
                c.writer.close()
            try:
                await self._server.wait_closed()
            except Exception:  # pragma: no cover
                pass
            self._executor.shutdown(wait=True)
            self.energy.close()

    def start_in_thread(self) -> tuple[str, int]:
        """Serve from a background thread (tests, demo); returns ``(host, port)``."""
        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # e.g. the port is taken: report it to the caller, not 30 s later
                self._start_error = e
                self._started.set()

        self._thread = threading.Thread(target=run, name="pipesd-cloud", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("cloud server did not start within 30 s")
        if self._start_error is not None:
            raise RuntimeError(f"cloud server failed to start: {self._start_error}") from self._start_error
        return self.address

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown: stop accepting, close connections, finish the verifier."""
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        self._n_conns += 1
        try:
            if self._n_conns > self.config.max_clients:
                self.stats.clients_refused += 1
                log.warning("refusing %s: %d connections open (max_clients %d)", peer, self._n_conns - 1,
                            self.config.max_clients, extra={"peer": peer})
                try:
                    await asyncio.wait_for(conn.write_message(writer, M.Error(
                        M.E_LIMIT, f"the cloud serves at most {self.config.max_clients} connections; try later")), 2.0)
                except Exception:  # the peer may be gone already; the refusal stands
                    pass
                writer.transport.abort()
                return
            await self._serve_client(reader, writer, peer)
        finally:
            self._n_conns -= 1

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        cfg = self.config
        info = M.HelloAck(M.PROTOCOL_VERSION, cfg.server_name, self.vocab_size, self.fingerprint,
                          cfg.max_sessions_per_client, cfg.max_prompt_tokens, cfg.max_draft_in_flight)
        try:
            await conn.serve_handshake(reader, writer, expected_token=cfg.auth_token, server_info=info,
                                       timeout_s=cfg.handshake_timeout_s)
        except Exception as e:  # refused: serve_handshake already answered with an Error frame
            log.info("handshake with %s failed: %s", peer, e)
            writer.close()
            return
        client = _Client(writer, peer, cfg.max_tokens_per_s, cfg.tokens_burst)
        self._clients.add(client)
        self.stats.clients_connected = len(self._clients)
        log.info("edge %s connected", peer, extra={"peer": peer})
        try:
            while True:
                try:
                    msg = await conn.read_message(reader, cfg.max_frame_bytes)
                except codec.ProtocolError as e:
                    self.stats.protocol_errors += 1
                    await self._send(client, M.Error(e.code, str(e)))
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if client.bucket is not None:
                    await self._throttle(client, msg)
                if not client.alive:  # dropped while this frame was read
                    break
                try:
                    await self._dispatch(client, msg)
                except codec.ProtocolError as e:
                    self.stats.protocol_errors += 1
                    sid = getattr(msg, "session_id", -1)
                    await self._send(client, M.Error(e.code, str(e), sid))
                    if sid in client.sessions:
                        self._close_session(client.sessions[sid])
        except Exception:  # never let one client take the server down
            log.exception("client %s failed", peer)
        finally:
            client.alive = False
            for s in list(client.sessions.values()):
                self._close_session(s)
            self._clients.discard(client)
            self.stats.clients_connected = len(self._clients)
            writer.close()  # flushes what is buffered; a peer that never reads it is cut off below
            asyncio.get_running_loop().call_later(min(cfg.write_timeout_s, 5.0), writer.transport.abort)

    async def _send(self, client: _Client, msg) -> None:
        """Queue ``msg`` for ``client`` without waiting for the peer to read it.

        The verifier and the other clients never wait on a slow reader. The write side is
        bounded: a client with more than ``max_send_buffer_bytes`` unread, or whose socket does
        not drain within ``write_timeout_s``, is dropped (its sessions are freed).
        """
        if not client.alive:
            return
        transport = client.writer.transport
        if transport.is_closing():
            client.alive = False
            return
        client.writer.write(codec.encode(msg))
        buffered = transport.get_write_buffer_size()
        if buffered > self.config.max_send_buffer_bytes:
            self._drop(client, f"{buffered} bytes of replies unread (max_send_buffer_bytes "
                               f"{self.config.max_send_buffer_bytes}): the client is not reading")
        elif client.drain_task is None and buffered > transport.get_write_buffer_limits()[1]:
            client.drain_task = asyncio.create_task(self._drain(client))

    async def _drain(self, client: _Client) -> None:
        """Watch a client whose replies back up: it must read them within ``write_timeout_s``."""
        try:
            await asyncio.wait_for(client.writer.drain(), self.config.write_timeout_s)
        except asyncio.TimeoutError:
            self._drop(client, f"replies not read within write_timeout_s ({self.config.write_timeout_s} s)")
        except (ConnectionError, RuntimeError):  # the connection is gone: the reader cleans up
            client.alive = False
        finally:
            client.drain_task = None

    def _drop(self, client: _Client, reason: str) -> None:
        """Cut a misbehaving client off now (no flush); its read loop then frees its sessions."""
        if not client.alive:
            return
        client.alive = False
        log.warning("dropping client %s: %s", client.peer, reason, extra={"peer": client.peer})
        self.stats.clients_dropped += 1  # after the log line: whoever sees the count finds the reason
        client.writer.transport.abort()

    async def _throttle(self, client: _Client, msg) -> None:
        """Token bucket over prompt and draft tokens: wait (stop reading this client) when over the rate."""
        if isinstance(msg, M.DraftBatch):
            n = max(len(msg.tokens), 1 if msg.verify else 0)  # an empty verify still costs a target forward
        elif isinstance(msg, M.OpenSession):
            n = len(msg.prompt_ids)
        else:
            return
        wait = client.bucket.debit(n)
        if wait > 0:
            self.stats.throttled_s += wait
            await asyncio.sleep(wait)

    async def _dispatch(self, client: _Client, msg) -> None:
        if isinstance(msg, M.DraftBatch):
            self._on_draft(client, msg)
        elif isinstance(msg, M.OpenSession):
            await self._on_open(client, msg)
        elif isinstance(msg, M.CloseSession):
            s = client.sessions.get(msg.session_id)
            if s is not None:
                self._close_session(s)
        else:
            raise codec.ProtocolError(M.E_BAD_FRAME, f"unexpected message {type(msg).__name__} from an edge")

    async def _on_open(self, client: _Client, msg: M.OpenSession) -> None:
        cfg = self.config
        sid = msg.session_id
        if sid in client.sessions:
            raise codec.ProtocolError(M.E_BAD_FIELD, f"session {sid} is already open on this connection")
        if len(client.sessions) >= cfg.max_sessions_per_client or self._n_sessions >= cfg.max_sessions:
            await self._send(client, M.Error(M.E_LIMIT, "too many sessions", sid))
            return
        prompt = np.asarray(msg.prompt_ids)
        if len(prompt) == 0 or len(prompt) > cfg.max_prompt_tokens:
            raise codec.ProtocolError(M.E_LIMIT, f"prompt length {len(prompt)} outside [1, {cfg.max_prompt_tokens}]")
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.vocab_size:
            raise codec.ProtocolError(M.E_BAD_FIELD, f"prompt token ids outside [0, {self.vocab_size})")
        if msg.tokenizer_fingerprint and self.fingerprint and msg.tokenizer_fingerprint != self.fingerprint:
            raise codec.ProtocolError(M.E_TOKENIZER, "tokenizer fingerprint differs from the cloud's: "
                                      f"edge {msg.tokenizer_fingerprint}, cloud {self.fingerprint}")
        try:
            params = SamplingParams(float(msg.temperature), int(msg.top_k), float(msg.top_p), float(msg.min_p),
                                    int(msg.seed))
        except ValueError as e:
            raise codec.ProtocolError(M.E_BAD_FIELD, str(e)) from None
        if 0.0 < params.temperature < MIN_TEMPERATURE:
            raise codec.ProtocolError(M.E_BAD_FIELD, f"temperature {params.temperature} is below {MIN_TEMPERATURE} "
                                                     "(use 0 for greedy)")
        if not (1 <= msg.max_new_tokens <= cfg.max_new_tokens):
            raise codec.ProtocolError(M.E_LIMIT, f"max_new_tokens {msg.max_new_tokens} outside [1, {cfg.max_new_tokens}]")
        gen = torch.Generator()
        gen.manual_seed(int(msg.seed))
        tsession = self.target.new_session([int(t) for t in prompt])
        s = _Session(sid, client, tsession, params, int(msg.max_new_tokens), self.eos_id, gen)
        client.sessions[sid] = s
        self._n_sessions += 1
        self.stats.sessions_opened += 1
        self.stats.sessions_open = self._n_sessions
        log.info("session %d opened by %s: %d prompt tokens, up to %d new", sid, client.peer, len(prompt),
                 msg.max_new_tokens, extra={"session": sid, "peer": client.peer})
        await self._send(client, M.SessionOpened(sid))

    def _close_session(self, s: _Session) -> None:
        if s.closed:
            return
        s.closed = True
        log.info("session %d closed: %d tokens verified", s.sid, len(s.generated), extra={"session": s.sid})
        s.client.sessions.pop(s.sid, None)
        s.client.inflight_bytes -= sum(s.pending_nbytes)
        s.pending.clear()  # a verification in flight holds its own copy
        s.pending_q_ids.clear()
        s.pending_q_probs.clear()
        s.pending_nbytes.clear()
        self._n_sessions -= 1
        self.stats.sessions_open = self._n_sessions
        if not s.busy:
            self._release(s)

    def _release(self, s: _Session) -> None:
        try:
            self._executor.submit(s.tsession.close)
        except RuntimeError:  # shutting down: the cache goes with the process
            s.tsession.close()

    def _on_draft(self, client: _Client, b: M.DraftBatch) -> None:
        s = client.sessions.get(b.session_id)
        if s is None:
            raise codec.ProtocolError(M.E_UNKNOWN_SESSION, f"unknown session {b.session_id}")
        if s.finished:
            return
        if s.check_pos >= 0 and not self._confirm_bonus(s, b):
            return
        if b.epoch < s.epoch:
            self.stats.stale_batches += 1
            return
        if b.epoch > s.epoch:
            raise codec.ProtocolError(M.E_BAD_FIELD, f"epoch {b.epoch} is ahead of the session's {s.epoch}")
        n = len(b.tokens)
        expected = len(s.generated) + len(s.pending)
        if b.first_pos < expected:  # a replay of a batch already taken (empty ones too)
            self.stats.duplicate_batches += 1
            return
        if n and b.first_pos != expected:
            raise codec.ProtocolError(M.E_BAD_FIELD, f"batch starts at {b.first_pos}, expected {expected} (gap)")
        if len(s.pending) + n > self.config.max_draft_in_flight:
            raise codec.ProtocolError(M.E_LIMIT, f"more than {self.config.max_draft_in_flight} draft tokens in flight")
        if n:
            toks = np.asarray(b.tokens)
            if int(toks.min()) < 0 or int(toks.max()) >= self.vocab_size:
                raise codec.ProtocolError(M.E_BAD_FIELD, f"draft token ids outside [0, {self.vocab_size})")
            per_token = 8  # token + prob; the q of a sampling session below
            if not s.params.greedy:
                rows = n - 1 if b.hint else n  # a hint carries no q
                if rows and (b.q_ids is None or b.q_probs is None):
                    raise codec.ProtocolError(M.E_BAD_FIELD, "sampling mode needs the draft's q (q_ids, q_probs)")
                qi = np.asarray(b.q_ids) if b.q_ids is not None else np.zeros((0, 1), np.int32)
                qp = np.asarray(b.q_probs) if b.q_probs is not None else np.zeros((0, 1), np.float32)
                if qi.size and (int(qi.min()) < 0 or int(qi.max()) >= self.vocab_size):
                    raise codec.ProtocolError(M.E_BAD_FIELD, f"q ids outside [0, {self.vocab_size})")
                per_token += 8 * qi.shape[1]
            limit = self.config.max_inflight_bytes_per_client
            if client.inflight_bytes + n * per_token > limit:
                raise codec.ProtocolError(M.E_LIMIT, f"more than {limit} bytes of drafts awaiting verification "
                                                     "on this connection (max_inflight_bytes_per_client)")
            if b.hint:
                s.hints.add(b.first_pos)
            if not s.params.greedy:
                if b.hint:  # placeholder rows: a hint is settled by a bonus, never verified
                    s.pending_q_ids.append(None)
                    s.pending_q_probs.append(None)
                s.pending_q_ids.extend(qi)
                s.pending_q_probs.extend(qp)
            s.pending.extend(int(t) for t in toks)
            s.pending_nbytes.extend([per_token] * n)
            client.inflight_bytes += n * per_token
        if b.verify:
            s.verify_upto = len(s.pending)
            s.bonus = bool(b.bonus)
            s.echo_sent_at = b.sent_at
            s.verify_requested = True
            self._schedule(s)

    def _confirm_bonus(self, s: _Session, b: M.DraftBatch) -> bool:
        """The continuation rule, when the bonus at ``s.check_pos`` met no pending draft.

        The edge compares its own draft at that position (if it made one) with the bonus: a
        match keeps its later drafts, a mismatch voids them and it moves to the next epoch.
        The first batch after the verdict tells which: one from the next epoch starting at
        the verified length (mismatch seen by the edge), one carrying the edge's draft at the
        bonus position (compared here: equal -> trimmed; different -> the epoch moves), or one
        starting past it (the edge had no draft there, or dropped the matching one unsent).
        Returns False when the batch is consumed; may trim the batch in place.
        """
        c = s.check_pos
        verified = len(s.generated)
        if b.epoch == s.epoch + 1 and b.first_pos == verified:
            s.epoch += 1
            s.check_pos = -1
            return True
        if b.epoch != s.epoch:
            return True  # stale, or a protocol error that the normal checks report
        if b.first_pos == c and len(b.tokens):
            s.check_pos = -1
            if int(b.tokens[0]) != s.generated[c]:
                self._void_pending(s)
                s.epoch += 1
                self.stats.stale_batches += 1
                return False
            b.first_pos = c + 1
            b.tokens, b.probs = b.tokens[1:], b.probs[1:]
            if b.hint:  # the hint carried no q row
                b.hint = False
            elif b.q_ids is not None:
                b.q_ids, b.q_probs = b.q_ids[1:], b.q_probs[1:]
            return True
        if b.first_pos >= verified:
            s.check_pos = -1
        return True

    def _void_pending(self, s: _Session) -> None:
        s.hints.clear()
        s.pending.clear()
        s.pending_q_ids.clear()
        s.pending_q_probs.clear()
        s.client.inflight_bytes -= sum(s.pending_nbytes)
        s.pending_nbytes.clear()
        s.verify_requested = False
        s.verify_upto = 0

    def _drop_verified(self, s: _Session, n: int) -> None:
        del s.pending[:n]
        del s.pending_q_ids[:n]
        del s.pending_q_probs[:n]
        s.client.inflight_bytes -= sum(s.pending_nbytes[:n])
        del s.pending_nbytes[:n]
        s.verify_upto = max(0, s.verify_upto - n)
        if s.hints:
            s.hints = {h for h in s.hints if h >= len(s.generated)}

    def _schedule(self, s: _Session) -> None:
        """Queue a session for verification: once, and never while it is being verified."""
        if s.verify_requested and not s.busy and not s.queued and not s.closed:
            s.queued = True
            self._ready.put_nowait(s)

    # ------------------------------------------------------------------ verification
    async def _verifier(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # One round per call: its locals (sessions, caches) are released while idle, so a
            # closed session's memory is freed at once, not at the next verification.
            await self._verify_round(loop, await self._ready.get())

    async def _verify_round(self, loop, first: _Session) -> None:
        batch = [first]
        while not self._ready.empty() and len(batch) < self.config.max_batch_sessions:
            batch.append(self._ready.get_nowait())
        for s in batch:
            s.queued = False
        batch = [s for s in batch if not s.closed and s.verify_requested]
        if not batch:
            return
        jobs = []
        for s in batch:
            n = s.verify_upto
            if s.hints:  # verify up to the first hint only: this verdict's bonus settles it
                n = min(n, min(s.hints) - len(s.generated))
            jobs.append((s, s.pending[:n], s.pending_q_ids[:n], s.pending_q_probs[:n], s.bonus, s.echo_sent_at))
            s.verify_requested = n < s.verify_upto  # the rest of the request: after this verdict
            s.busy = True
        results = await self._run_jobs(loop, jobs)
        for (s, *_), res in zip(jobs, results):
            s.busy = False
            if s.closed:
                self._release(s)
                continue
            if res is None:  # this session's verification failed: it alone gets the error
                await self._send(s.client, M.Error(M.E_INTERNAL, "verification failed", s.sid))
                self._close_session(s)
                continue
            verdict, new = res
            self._apply(s, verdict, new)
            self._schedule(s)
            await self._send(s.client, verdict)

    async def _run_jobs(self, loop, jobs) -> list:
        """``(verdict, new tokens)`` per job, or None for a job whose verification failed.

        When a batched launch fails, each of its sessions is verified alone, from a fresh cache
        (nothing was committed: commits come after every verdict of a launch is known), so one
        bad session cannot fail or corrupt the others it was batched with.
        """
        try:
            return await loop.run_in_executor(self._executor, self._verify_jobs, jobs)
        except Exception:
            log.exception("verification of %d session(s) failed", len(jobs))
        if len(jobs) == 1:
            jobs[0][0].tsession.close()  # the cache may be half-updated: re-feed next time
            return [None]
        out = []
        for j in jobs:
            j[0].tsession.close()
            try:
                out.extend(await loop.run_in_executor(self._executor, self._verify_jobs, [j]))
            except Exception:
                log.exception("verification of session %d failed on its own", j[0].sid)
                self.stats.isolated_failures += 1
                j[0].tsession.close()
                out.append(None)
        return out

    def _verify_jobs(self, jobs) -> list[tuple[M.Verdict, list[int]]]:
        """Verifier thread: one batched target forward + one verify_chain launch."""
        with self.energy.measure():
            return self._verify_jobs_measured(jobs)

    def _verify_jobs_measured(self, jobs) -> list[tuple[M.Verdict, list[int]]]:
        t0 = time.perf_counter()
        sessions = [j[0] for j in jobs]
        drafts = [j[1] for j in jobs]
        f0 = self.target.forwards
        if len(jobs) == 1:
            logits_list = [sessions[0].tsession.score(drafts[0])]
        else:
            logits_list = self.target.score_batch([s.tsession for s in sessions], drafts)
        forwards = self.target.forwards - f0
        t_fwd = time.perf_counter()
        B = len(jobs)
        K = max(len(d) for d in drafts)
        V = logits_list[0].shape[-1]
        logits = torch.zeros(B, K + 1, V, dtype=logits_list[0].dtype)
        draft_t = torch.zeros(B, max(K, 1), dtype=torch.int64)[:, :K]
        num = torch.tensor([len(d) for d in drafts], dtype=torch.int64)
        for i, (lg, d) in enumerate(zip(logits_list, drafts)):
            logits[i, : lg.shape[0]] = lg
            if d:
                draft_t[i, : len(d)] = torch.tensor(d)
        greedy = all(s.params.greedy for s in sessions)
        # The continuation rule: every full acceptance carries the target's next token (it is
        # already computed); the edge keeps what it drafted past it only if it equals it.
        bonus = torch.ones(len(jobs), dtype=torch.bool)
        if greedy:
            t_kern0 = time.perf_counter()
            v = verify_chain(logits, draft_t, num, mode="greedy", bonus=bonus)
        else:
            kq = max((q.shape[-1] for j in jobs for q in j[2]), default=1)
            q_ids = torch.zeros(B, K, kq, dtype=torch.int64)
            q_probs = torch.zeros(B, K, kq, dtype=torch.float32)
            for i, j in enumerate(jobs):
                for t, (qi, qp) in enumerate(zip(j[2], j[3])):
                    q_ids[i, t, : len(qi)] = torch.as_tensor(np.array(qi, dtype=np.int64))
                    q_probs[i, t, : len(qp)] = torch.as_tensor(np.array(qp, dtype=np.float32))
            p = [s.params for s in sessions]
            temp = torch.tensor([x.temperature for x in p], dtype=torch.float32)
            # One seed per session, drawn from the session's own generator: a session's draws do
            # not depend on which other sessions share the launch.
            seeds = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=s.generator)) for s in sessions],
                                 dtype=torch.int64)
            t_kern0 = time.perf_counter()
            v = verify_chain(logits, draft_t, num, mode="sample", draft_topk_ids=q_ids, draft_topk_probs=q_probs,
                             temperature=temp, top_k=torch.tensor([x.top_k for x in p]),
                             top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32),
                             min_p=torch.tensor([x.min_p for x in p], dtype=torch.float32),
                             seed=seeds, bonus=bonus)
        _ = v.accepted.tolist()  # make sure the launch has finished (CUDA)
        t_kern = time.perf_counter()
        out = []
        wasted_sum = 0
        for i, (s, d, _, _, _, echo) in enumerate(jobs):
            acc = int(v.accepted[i])
            ntok = int(v.num_tokens[i])
            new = [int(t) for t in v.tokens[i, :ntok]]
            rejected = acc < len(d)
            correction = new[acc] if ntok > acc else -1
            start = len(s.generated)
            # Clip at max_new_tokens and at EOS: nothing past them is ever emitted.
            room = s.max_new_tokens - start
            finished = False
            if len(new) >= room:
                new, finished = new[:room], True
            if s.eos_id is not None and s.eos_id in new:
                new, finished = new[: new.index(s.eos_id) + 1], True
            if len(new) <= acc:  # clipped before the correction
                correction = -1
            if new and not (min(new) >= 0 and max(new) < self.vocab_size):
                raise ValueError(f"session {s.sid}: the verifier returned token ids outside [0, {self.vocab_size})")
            wasted = len(d) - min(acc, len(new))
            out.append((M.Verdict(s.sid, s.epoch, start, start + len(d), min(acc, len(new)), correction,
                                  rejected, start + len(new), finished,
                                  forwards if B == 1 else len(d) + 1, 0.0, echo), new))
            self.stats.wasted_forwards += wasted
            wasted_sum += wasted
        for (s, *_), (_, new) in zip(jobs, out):  # only now that every verdict of the launch is known
            s.tsession.commit(new)
        busy = time.perf_counter() - t0
        self.stats.forward_s += t_fwd - t0
        self.stats.kernel_s += t_kern - t_kern0
        self.stats.overhead_s += busy - (t_fwd - t0) - (t_kern - t_kern0)
        if self.config.verify_pad_s > busy:
            time.sleep(self.config.verify_pad_s - busy)
            busy = self.config.verify_pad_s
        for vd, _ in out:
            vd.verify_s = busy
        self.energy.add_forwards(useful=max(0, forwards - wasted_sum), wasted=min(wasted_sum, forwards))
        self.stats.verifications += B
        self.stats.batched_launches += 1
        self.stats.max_batch = max(self.stats.max_batch, B)
        self.stats.batch_size_counts[B] = self.stats.batch_size_counts.get(B, 0) + 1
        self.stats.target_forwards += forwards
        self.stats.busy_s += busy
        log.debug("verified %d session(s), %d target forwards, %.1f ms", B, forwards, busy * 1e3)
        return out

    def energy_report(self) -> dict:
        """Cloud energy so far: joules (NVML or model, labelled), forwards useful and wasted."""
        generated = sum(len(s.generated) for c in self._clients for s in c.sessions.values())
        return self.energy.report(max(1, generated)).to_dict()

    def _apply(self, s: _Session, v: M.Verdict, new: list[int]) -> None:
        """Event loop: move the session past the verdict."""
        s.generated.extend(new)
        if v.correction >= 0 and v.rejected:
            # The correction replaces a draft: every pending draft is void, both sides bump the epoch.
            self._void_pending(s)
            s.epoch += 1
        elif v.correction >= 0:
            # Bonus after full acceptance (the continuation rule): the edge's draft at the bonus
            # position survives, with everything after it, only if it equals the bonus.
            self._drop_verified(s, v.end_pos - v.start_pos)
            if not s.pending:
                # Not here yet (or never drafted): the next batch tells. Nothing is verified
                # until then, or a verdict could land in an epoch the edge has left.
                s.check_pos = v.end_pos
                s.verify_requested = False
            elif s.pending[0] == v.correction:
                self._drop_verified(s, 1)
                if s.verify_upto == 0:  # the request ended at the bonus position: answered
                    s.verify_requested = False
            else:
                self._void_pending(s)
                s.epoch += 1
        else:
            self._drop_verified(s, v.end_pos - v.start_pos)
        if v.finished:
            s.finished = True
