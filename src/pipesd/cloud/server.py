"""The cloud: one asyncio server holding one session per edge stream, verifying draft runs
with the target model (NAV) and replying with verdicts.

Rooms: this module (lifecycle, the read loop, dispatch, the verification round),
:mod:`pipesd.cloud.connection` (a client connection with its limits and non-blocking replies),
:mod:`pipesd.cloud.sessions` (opening, draft batches into the protocol, closing),
:mod:`pipesd.cloud.verifier` (pack, score, verify, judge, commit, account). Every protocol
decision (positions, epochs, hints, the continuation rule, EOS and length ends) is
:class:`pipesd.protocol.CloudSession`'s.

Concurrency: the event loop owns the sockets and the session bookkeeping; all model work
(target forwards, verification kernels, KV-cache crops) runs on one verifier thread, so the
loop keeps reading frames while the target computes. Sessions whose triggers coincide are
verified together: one batched target forward and one batched ``verify_chain`` launch; a failed
launch is retried session by session. Hardening: docs/security.md.
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

from pipesd.cloud.connection import ClientConn, TokenBucket
from pipesd.cloud.identities import FairQueue, HandshakeGate, IdentityTable
from pipesd.cloud.sessions import MIN_TEMPERATURE, Session, SessionStore
from pipesd.cloud.verifier import Verifier
from pipesd.transport import codec, conn
from pipesd.transport import messages as M
from pipesd.transport.conn import server_ssl_context

log = logging.getLogger("pipesd.cloud")

__all__ = ["CloudConfig", "CloudServer", "CloudStats", "MIN_TEMPERATURE"]


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
    handshake_timeout_s: float = 5.0  # TLS + Hello: a connection that has not authenticated by then is closed
    write_timeout_s: float = 30.0
    # Hardening (docs/security.md). A client whose unsent replies exceed max_send_buffer_bytes,
    # or whose socket does not drain within write_timeout_s, is dropped with a logged reason.
    max_clients: int = 256  # authenticated connections at once; more get E_LIMIT
    # Connections still in the handshake count apart (never against max_clients): per peer
    # address and in all; one over either cap evicts the oldest pending one (cloud.identities.HandshakeGate).
    max_pending_handshakes: int = 64
    max_pending_per_peer: int = 8
    # The per-peer cap evicts only a connection silent this long: a younger one may have its Hello
    # in the socket buffer, unread (a burst of edges behind one NAT). max_pending_handshakes stays hard.
    hello_grace_s: float = 1.0
    # Identities besides auth_token's "default" (cloud.identities.load_identities: --auth-tokens FILE),
    # each with its quota on connections, sessions, bytes awaiting verification and tokens/s.
    identities: tuple = ()
    # A session with nothing to do, and a connection with no session, that sent nothing for this
    # long are closed and their KV caches freed (the reason is logged and counted). 0 = never.
    idle_timeout_s: float = 300.0
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
    clients_refused: int = 0  # over max_clients or an identity's connection quota
    handshakes_evicted: int = 0  # pending handshakes closed to make room (HandshakeGate)
    idle_sessions_closed: int = 0  # idle_timeout_s
    idle_connections_closed: int = 0  # idle_timeout_s
    clients_dropped: int = 0  # dropped by the server: send buffer limit or write deadline
    throttled_s: float = 0.0  # time clients spent paused by the token bucket
    isolated_failures: int = 0  # sessions whose verification failed alone (others in the launch went on)
    failed_launches: int = 0  # launches that raised (each session then re-verified alone, from a fresh cache)
    verify_backends: dict = field(default_factory=dict)  # verify_chain calls by path: "triton" / "torch" (reference)
    batch_size_counts: dict = field(default_factory=dict)  # sessions per launch -> launches (metrics)


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
        self.sessions = SessionStore(target, self.config, self.stats, tokenizer_fingerprint, self.eos_id, self._release)
        self.verifier = Verifier(target, self.config, self.stats, self.energy)
        self._server: Optional[asyncio.base_events.Server] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready: Optional[asyncio.Queue] = None
        self._clients: set[ClientConn] = set()
        self._n_conns = 0  # open connections, handshaking included
        self._n_auth = 0  # authenticated connections, and those granted a slot in the handshake (max_clients)
        self.identities = IdentityTable(self.config.auth_token, self.config.identities)
        for ident in self.identities:
            q = ident.quota
            ident.bucket = TokenBucket(q.max_tokens_per_s, q.tokens_burst) if q.max_tokens_per_s > 0 else None
        self._gate = HandshakeGate(self.config.max_pending_handshakes, self.config.max_pending_per_peer,
                                   self.config.hello_grace_s)
        self._gate_timer: Optional[asyncio.TimerHandle] = None  # the gate's next expire (_gate_due)
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._conn_tasks: dict = {}  # each connection's task -> its writer (closed at shutdown)
        self.address: tuple[str, int] = (self.config.host, self.config.port)

    # ------------------------------------------------------------------ lifecycle
    async def serve(self) -> None:
        """Run until :meth:`stop` (or cancellation)."""
        self._loop = asyncio.get_running_loop()
        self._ready = FairQueue()  # round-robin across identities (a fair verifier)
        self._stop_event = asyncio.Event()
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": self.config.handshake_timeout_s} if self._ssl else {}
        self._server = await asyncio.start_server(self._on_connection, self.config.host, self.config.port, **tls)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        verifier = asyncio.create_task(self._verifier())
        sweeper = asyncio.create_task(self._sweep_idle())
        self._started.set()
        log.info("serving on %s:%d%s", *self.address, " (TLS)" if self._ssl else "")
        try:
            await self._stop_event.wait()
        finally:
            self._server.close()
            if self._gate_timer is not None:
                self._gate_timer.cancel()
            verifier.cancel()
            sweeper.cancel()
            for c in list(self._clients):
                c.writer.close()
            await self._end_connections()
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
        """Clean shutdown: stop accepting, close connections, finish the verifier. Idempotent:
        stopping a stopped server (its event loop closed) does nothing."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop closed in between: stopped already
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ connections
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's task for one connection. It never ends cancelled or failed: Python 3.11's
        stream callback calls ``task.exception()`` on it, which prints an ``Exception in
        callback ... CancelledError`` traceback for a task cancelled at shutdown."""
        task = asyncio.current_task()
        self._conn_tasks[task] = writer
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:  # shutdown: the connection goes with the server
            writer.transport.abort()
        except Exception:  # never let one connection take the server down
            log.exception("connection %s failed", writer.get_extra_info("peername"))
            writer.transport.abort()
        finally:
            self._conn_tasks.pop(task, None)

    async def _end_connections(self, timeout_s: float = 2.0) -> None:
        """At shutdown: close every connection (handshaking ones too) and let its task end on its
        own, freeing its sessions; a task still running after ``timeout_s`` is cancelled."""
        for w in list(self._conn_tasks.values()):
            w.close()
        tasks = list(self._conn_tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            w = self._conn_tasks.get(t)
            if w is not None:
                w.transport.abort()
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername)
        address = str(peername[0]) if isinstance(peername, (tuple, list)) and peername else peer
        self._n_conns += 1
        try:
            # over a pending cap: the oldest pending one goes (per peer only once silent hello_grace_s)
            self._evict(self._gate.admit(writer, address, self._loop.time()))
            try:
                client = await self._handshake(reader, writer, peer)
            finally:
                self._gate.remove(writer)
            if client is not None:
                await self._serve_client(reader, client)
        finally:
            self._n_conns -= 1

    def _evict(self, writers: list) -> None:
        """Close pending connections the gate evicted, then arm its next expiry."""
        for old in writers:
            self.stats.handshakes_evicted += 1
            peer = old.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer)
            log.info("closing a pending handshake from %s to make room (max_pending_per_peer %d after "
                     "hello_grace_s %g, max_pending_handshakes %d)", address, self.config.max_pending_per_peer,
                     self.config.hello_grace_s, self.config.max_pending_handshakes, extra={"peer": address})
            old.transport.abort()
        due = self._gate.next_expiry()
        if due is None or (self._gate_timer is not None and self._gate_timer.when() <= due):
            return
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        self._gate_timer = self._loop.call_at(due, self._gate_due, due)

    def _gate_due(self, due: float) -> None:
        self._gate_timer = None
        self._evict(self._gate.expire(max(due, self._loop.time())))

    def _admit(self, hello: M.Hello, granted: list) -> None:
        """Authenticate a Hello and grant its connection a slot (appended to ``granted``), or
        raise the ProtocolError the edge is refused with (server-wide limit, identity quota)."""
        cfg = self.config
        ident = self.identities.authenticate(hello.auth_token)
        if ident is None:
            raise codec.ProtocolError(M.E_AUTH, "authentication failed: wrong auth token")
        q = ident.quota.max_connections
        if q and ident.connections >= q:
            ident.refuse("connections")
            self.stats.clients_refused += 1
            raise codec.ProtocolError(M.E_LIMIT, f"identity {ident.name!r} has {ident.connections} connections open "
                                                 f"(its quota connections={q}); try later")
        if self._n_auth >= cfg.max_clients:
            ident.refuse("max_clients")
            self.stats.clients_refused += 1
            log.warning("refusing a connection of %r: %d connections open (max_clients %d)", ident.name,
                        self._n_auth, cfg.max_clients)
            raise codec.ProtocolError(M.E_LIMIT, f"the cloud serves at most {cfg.max_clients} connections; try later")
        ident.connections += 1
        self._n_auth += 1
        granted.append(ident)

    def _hello(self, writer, hello: M.Hello, granted: list) -> None:
        """The Hello is in whole: the connection is no longer pending (the gate's caps are for
        silent ones), whatever :meth:`_admit` decides."""
        self._gate.remove(writer)
        self._admit(hello, granted)

    def _unbind(self, ident) -> None:
        ident.connections -= 1
        self._n_auth -= 1

    async def _handshake(self, reader, writer, peer: str) -> Optional[ClientConn]:
        cfg = self.config
        info = M.HelloAck(version=M.PROTOCOL_VERSION, server_name=cfg.server_name, vocab_size=self.vocab_size,
                          tokenizer_fingerprint=self.fingerprint, max_sessions=cfg.max_sessions_per_client,
                          max_prompt_tokens=cfg.max_prompt_tokens, max_draft_in_flight=cfg.max_draft_in_flight)
        granted: list = []
        try:
            await conn.serve_handshake(reader, writer, expected_token=cfg.auth_token, server_info=info,
                                       timeout_s=cfg.handshake_timeout_s,
                                       accept=lambda h: self._hello(writer, h, granted))
        except Exception as e:  # refused: serve_handshake already answered with an Error frame
            for ident in granted:  # the HelloAck did not get through
                self._unbind(ident)
            log.info("handshake with %s failed: %s", peer, e)
            writer.close()
            return None
        ident = granted[0]
        client = ClientConn(writer, peer, cfg, self.stats, ident)
        self._clients.add(client)
        self.stats.clients_connected = len(self._clients)
        log.info("edge %s connected as %r", peer, ident.name, extra={"peer": peer, "identity": ident.name})
        return client

    async def _serve_client(self, reader: asyncio.StreamReader, client: ClientConn) -> None:
        """The client's read loop: one frame at a time, until it goes or misbehaves."""
        try:
            while await self._serve_frame(reader, client):
                pass
        except Exception:  # never let one client take the server down
            log.exception("client %s failed", client.peer)
        finally:
            client.alive = False
            for s in list(client.sessions.values()):
                self.sessions.close(s)
            if client in self._clients:
                self._unbind(client.identity)
            self._clients.discard(client)
            self.stats.clients_connected = len(self._clients)
            client.writer.close()  # flushes what is buffered; a peer that never reads it is cut off below
            asyncio.get_running_loop().call_later(min(self.config.write_timeout_s, 5.0),
                                                  client.writer.transport.abort)

    async def _serve_frame(self, reader, client: ClientConn) -> bool:
        """Read and dispatch one frame; False when the connection is done."""
        try:
            msg = await conn.read_message(reader, self.config.max_frame_bytes)
        except codec.ProtocolError as e:
            self.stats.protocol_errors += 1
            client.send(M.Error(code=e.code, message=str(e)))
            return False
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        client.last_active = time.monotonic()
        await client.throttle(msg)
        if not client.alive:  # dropped while this frame was read
            return False
        try:
            self._dispatch(client, msg)
        except codec.ProtocolError as e:
            self.stats.protocol_errors += 1
            sid = getattr(msg, "session_id", -1)
            client.send(M.Error(code=e.code, message=str(e), session_id=sid))
            if sid == -1:
                return False  # a connection-level error closes the connection (docs/wire.md)
            if sid in client.sessions:
                self.sessions.close(client.sessions[sid])
        return True

    def _dispatch(self, client: ClientConn, msg) -> None:
        if isinstance(msg, M.DraftBatch):
            s = self.sessions.on_draft(client, msg)
            if s is not None:
                self._schedule(s)
        elif isinstance(msg, M.StreamRequest):
            s = self.sessions.on_stream(client, msg)
            if s is not None:
                self._schedule(s)
        elif isinstance(msg, M.TreeRequest):
            s = self.sessions.on_tree(client, msg)
            if s is not None:
                self._schedule(s)
        elif isinstance(msg, M.OpenSession):
            if self.sessions.open(client, msg) is not None:
                client.send(M.SessionOpened(session_id=msg.session_id))
        elif isinstance(msg, M.CloseSession):
            s = client.sessions.get(msg.session_id)
            if s is not None:
                self.sessions.close(s)
        else:
            raise codec.ProtocolError(M.E_BAD_FRAME, f"unexpected message {type(msg).__name__} from an edge")

    def _release(self, s: Session) -> None:
        try:
            self._executor.submit(s.tsession.close)
        except RuntimeError:  # shutting down: the cache goes with the process
            s.tsession.close()

    def _schedule(self, s: Session) -> None:
        """Queue a session for verification: once, and never while it is being verified."""
        if s.proto.ready and not s.queued and not s.closed:
            s.queued = True
            self._ready.put_nowait(s)

    async def _sweep_idle(self) -> None:
        """Every so often, close what has been idle for ``idle_timeout_s``: sessions with nothing
        to do (their owner is told, with an Error naming the timeout), then connections left
        with no session (closed without a frame: an edge sees a lost link and may reconnect)."""
        timeout = self.config.idle_timeout_s
        if timeout <= 0:
            return
        while True:
            await asyncio.sleep(min(max(timeout / 4, 0.05), 5.0))
            self.sweep_idle(time.monotonic())

    def sweep_idle(self, now: float) -> None:
        """One sweep at time ``now`` (monotonic): see :meth:`_sweep_idle`. Event loop only."""
        timeout = self.config.idle_timeout_s
        for c in list(self._clients):
            for s in list(c.sessions.values()):
                if s.idle and now - s.last_active >= timeout:
                    self.sessions.expire(s, f"idle for {now - s.last_active:.1f} s (idle_timeout_s {timeout:g})")
            if c.alive and not c.sessions and now - c.last_active >= timeout:
                c.alive = False
                log.warning("closing idle connection %s of %r: nothing for %.1f s (idle_timeout_s %g)", c.peer,
                            getattr(c.identity, "name", "?"), now - c.last_active, timeout, extra={"peer": c.peer})
                self.stats.idle_connections_closed += 1
                if c.identity is not None:
                    c.identity.idle_closed["connection"] = c.identity.idle_closed.get("connection", 0) + 1
                c.writer.close()  # its read loop sees the end and cleans up

    # ------------------------------------------------------------------ verification
    async def _verifier(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # One round per call: its locals (sessions, caches) are released while idle, so a
            # closed session's memory is freed at once, not at the next verification.
            await self._verify_round(loop, await self._ready.get())

    async def _verify_round(self, loop, first: Session) -> None:
        batch = [first]
        while not self._ready.empty() and len(batch) < self.config.max_batch_sessions:
            batch.append(self._ready.get_nowait())
        for s in batch:
            s.queued = False
        work = [(s, s.proto.take_job()) for s in batch if not s.closed and s.proto.ready]
        if not work:
            return
        results = await self._run(loop, work)
        for (s, _), res in zip(work, results):
            if res is None or s.closed:
                s.proto.abandon()  # nothing of it is applied
            if s.closed:
                self._release(s)
                continue
            if res is None:  # this session's verification failed: it alone gets the error
                s.client.send(M.Error(code=M.E_INTERNAL, message="verification failed", session_id=s.sid))
                self.sessions.close(s)
                continue
            settled = self.sessions.apply(s, res.judged)  # held bytes, idle clock, identity counts
            self._schedule(s)
            s.client.send(self._verdict(s, res, settled))

    @staticmethod
    def _verdict(s: Session, res, settled: int):
        j = res.judged
        if j.job.tree:
            return M.TreeVerdict(session_id=s.sid, epoch=j.job.epoch, start_pos=j.job.start,
                                 path=np.asarray(j.path, dtype=np.int32), token=j.token, rejected=j.rejected,
                                 verified_len=len(s.proto.generated), finished=j.finished,
                                 target_forwards=res.forwards, verify_s=res.verify_s, echo_sent_at=j.job.echo_sent_at)
        return M.Verdict(session_id=s.sid, epoch=j.job.epoch, start_pos=j.job.start, end_pos=j.end,
                         accepted=j.accepted, token=j.token, rejected=j.rejected, verified_len=len(s.proto.generated),
                         finished=j.finished, settled=settled, target_forwards=res.forwards, verify_s=res.verify_s,
                         echo_sent_at=j.job.echo_sent_at)

    async def _run(self, loop, work) -> list:
        """A ``Scored`` per session, or None for one whose verification failed.

        When a batched launch fails, each of its sessions is verified alone, from a fresh cache
        (nothing was committed: commits come after every verdict of a launch is known), so one
        bad session cannot fail or corrupt the others it was batched with.
        """
        try:
            return await loop.run_in_executor(self._executor, self.verifier.run, work)
        except Exception:
            self.stats.failed_launches += 1
            log.exception("verification of %d session(s) failed", len(work))
        if len(work) == 1:
            work[0][0].tsession.close()  # the cache may be half-updated: re-feed next time
            return [None]
        out = []
        for w in work:
            w[0].tsession.close()
            try:
                out.extend(await loop.run_in_executor(self._executor, self.verifier.run, [w]))
            except Exception:
                log.exception("verification of session %d failed on its own", w[0].sid)
                self.stats.isolated_failures += 1
                self.stats.failed_launches += 1
                w[0].tsession.close()
                out.append(None)
        return out

    def energy_report(self) -> dict:
        """Cloud energy so far: joules (NVML or model, labelled), forwards useful and wasted."""
        generated = sum(len(s.proto.generated) for c in self._clients for s in c.sessions.values())
        return self.energy.report(max(1, generated)).to_dict()
