"""The fleet's front door: one TCP address for the edges, N verifier replicas behind it.

Routing is per connection: an edge connection is assigned once, to the least-loaded live
replica, and its bytes are spliced both ways, so every frame of it (hence of its sessions)
reaches the replica holding its KV caches. The protocol, auth and TLS are the replica's: the
router parses nothing. A replica that dies takes its connections with it (the router closes their
edge sides at once); the edges' offline path reconnects here and lands on a live replica.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger("pipesd.fleet")

__all__ = ["Fleet", "FleetConfig", "RAY_MISSING", "import_ray", "splice", "start_ray"]

#: What ``--replicas`` says without Ray.
RAY_MISSING = "pipesd serve --replicas needs Ray: pip install 'pipesd[fleet]'"


def import_ray():
    """The ``ray`` module, or RuntimeError naming the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError(f"{RAY_MISSING} ({e})") from None
    return ray


def start_ray(address: Optional[str], replicas: int) -> bool:
    """Join the cluster at ``address``, or start a local one with this machine's CPUs (at least one
    per replica). Returns True when this process started Ray (and so shuts it down)."""
    import os

    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False, log_to_driver=False)
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` cluster address that accepts no TCP connection fails here, clearly
    (``ray.init`` would retry for minutes). Other forms (``auto``, ``ray://...``) go to Ray as given."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RuntimeError(f"--ray-address {address}: no Ray head answers there ({e}); start one with "
                           "`ray start --head --port PORT`, or leave --ray-address out for a local Ray") from None


@dataclass
class FleetConfig:
    """The router's settings; the replicas' are a :class:`~pipesd.cloud.CloudConfig` (``cloud``)."""

    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 7070  # 0: pick a free port
    cloud: dict = field(default_factory=dict)  # CloudConfig fields for every replica (host/port: theirs)
    model: Optional[str] = None
    target_gguf: Optional[str] = None
    threads: Optional[int] = None  # torch threads per replica
    replica_cpus: float = 1.0  # Ray CPUs each replica asks for
    poll_s: float = 0.15  # how often each replica's load() is read
    ready_timeout_s: float = 180.0  # replicas (model loaded, listening) ready within this
    connect_timeout_s: float = 5.0
    drain_grace_s: float = 0.0  # SIGTERM / stop(): drain every replica this long first (0: stop at once)
    # The per-peer pending-handshake cap evicts only a connection silent this long: a younger one
    # may have its Hello in the socket buffer, unread (a burst of edges behind one NAT). Fleet._enforce_cap.
    hello_grace_s: float = 1.0


@dataclass
class _Replica:
    index: int
    actor: Any
    address: Optional[tuple] = None
    pid: Optional[int] = None
    live: bool = False
    draining: bool = False
    load: dict = field(default_factory=dict)
    conns: set = field(default_factory=set)  # edge-side writers spliced to this replica now
    restarts: int = 0
    connections_routed: int = 0


class Fleet:
    """N replicas (Ray actors, :mod:`pipesd.fleet.replica`) behind one listening socket.

    Lifecycle as :class:`~pipesd.cloud.CloudServer`'s (``serve``/``start_in_thread``/``stop``,
    ``address``), so :func:`pipesd.launch.serve_until_stopped` runs it. Ray must be initialised
    (:func:`start_ray`); ``owns_ray``: shut it down at stop.
    """

    def __init__(self, config: FleetConfig, *, owns_ray: bool = False) -> None:
        if not (isinstance(config.replicas, int) and config.replicas >= 1):
            raise ValueError(f"replicas must be a whole number >= 1, got {config.replicas!r}")
        if not (isinstance(config.hello_grace_s, (int, float)) and config.hello_grace_s >= 0):
            raise ValueError(f"hello_grace_s must be a number >= 0, got {config.hello_grace_s!r}")
        self.config = config
        self.owns_ray = owns_ray
        self.address: tuple = (config.host, config.port)
        cloud = dict(config.cloud)
        # The replicas see the router as their only peer: the per-peer pending-handshake cap is the
        # router's (by real peer address, below); theirs is raised to their global cap.
        self.max_pending_per_peer = int(cloud.get("max_pending_per_peer", 8))
        cloud["max_pending_per_peer"] = int(cloud.get("max_pending_handshakes", 64))
        # A burst of young connections from one peer may pass the per-peer cap, up to what the
        # replicas hold pending in all (their global caps); over that the oldest goes, whatever its age.
        self.max_pending_burst = max(self.max_pending_per_peer, cloud["max_pending_per_peer"] * config.replicas)
        self._tls = bool(cloud.get("tls_cert"))  # the edge's first frame is then a TLS record
        self._cloud = cloud
        self.replicas: list[_Replica] = []
        self._pending: dict = collections.defaultdict(collections.OrderedDict)  # peer -> {writer: accepted at}
        self._cap_timers: dict = {}  # peer -> the loop's TimerHandle of its next _enforce_cap
        self.handshakes_evicted = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_event: Optional[asyncio.Event] = None
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._tasks: set = set()
        self._start_replicas()

    # ---------------------------------------------------------------- replicas
    def _start_replicas(self) -> None:
        from pipesd.fleet.replica import replica_actor

        ray = import_ray()
        cls = replica_actor()
        c = self.config
        for i in range(c.replicas):
            actor = cls.options(num_cpus=c.replica_cpus).remote(i, self._cloud, c.model, c.threads, c.target_gguf)
            self.replicas.append(_Replica(i, actor))
        refs = [r.actor.load.remote() for r in self.replicas]
        try:
            loads = ray.get(refs, timeout=c.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._kill_actors()
            raise RuntimeError(f"the {c.replicas} replicas were not ready within {c.ready_timeout_s:g} s (each asks "
                               f"{c.replica_cpus:g} CPU; the cluster has {ray.cluster_resources().get('CPU', 0):g})")
        except ray.exceptions.RayError as e:
            self._kill_actors()
            raise RuntimeError(f"a replica failed to start: {e}") from None
        for r, load in zip(self.replicas, loads):
            self._update(r, load)

    def _update(self, r: _Replica, load: dict) -> None:
        addr, pid = tuple(load["address"]), load["pid"]
        if r.pid is not None and pid != r.pid:
            r.restarts += 1
            log.warning("replica %d restarted (pid %s -> %s), now on %s:%d", r.index, r.pid, pid, *addr)
            self._close_conns(r)  # any left belong to the dead process
        r.address, r.pid, r.load, r.live = addr, pid, load, True
        # The replica's word. A poll answered just before a drain began may clear the router's flag
        # for one period: a connection routed then is handed back by the replica (still lossless).
        r.draining = bool(load.get("draining"))

    def _down(self, r: _Replica, why: str) -> None:
        if r.live:
            log.warning("replica %d is down (%s): closing its %d connection(s)", r.index, why, len(r.conns))
        r.live = False
        self._close_conns(r)

    @staticmethod
    def _close_conns(r: _Replica) -> None:
        for w in list(r.conns):
            w.transport.abort()  # the edge sees the link drop at once: its offline path takes over
        r.conns.clear()

    async def _poll(self) -> None:
        """Read every replica's load() every ``poll_s``; a failed or late answer marks it down."""
        timeout = max(1.0, 10 * self.config.poll_s)

        async def one(r: _Replica) -> None:
            try:
                self._update(r, await asyncio.wait_for(r.actor.load.remote(), timeout))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RayActorError, ActorUnavailableError, a timeout
                self._down(r, type(e).__name__)

        while True:
            await asyncio.gather(*(one(r) for r in self.replicas))
            await asyncio.sleep(self.config.poll_s)

    def _ranked(self) -> list:
        """Live, non-draining replicas, least loaded first: connections spliced now (exact, the
        router's own) plus sessions open, then queued draft tokens (both from the last poll)."""
        live = [r for r in self.replicas if r.live and not r.draining and r.address]
        return sorted(live, key=lambda r: (len(r.conns) + r.load.get("sessions_open", 0),
                                           r.load.get("queued_tokens", 0), r.index))

    # ---------------------------------------------------------------- lifecycle
    async def serve(self) -> None:
        """Accept edges until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._on_edge, self.config.host, self.config.port)
        sock = server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        poller = asyncio.create_task(self._poll())
        self._started.set()
        log.info("fleet of %d replicas serving on %s:%d", len(self.replicas), *self.address)
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            if self.config.drain_grace_s > 0:
                await self._loop.run_in_executor(None, self.drain_all, self.config.drain_grace_s)
            poller.cancel()
            for h in self._cap_timers.values():
                h.cancel()
            for r in self.replicas:
                self._close_conns(r)
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2.0)
            self._kill_actors()
            if self.owns_ray:
                import ray

                ray.shutdown()

    def _kill_actors(self) -> None:
        import ray

        for r in self.replicas:
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:  # already gone
                pass

    def start_in_thread(self) -> tuple:
        """Serve from a background thread (tests); returns ``(host, port)``."""
        def run() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as e:
                self._start_error = e
                self._started.set()

        self._thread = threading.Thread(target=run, name="pipesd-fleet", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the fleet router did not start within 30 s")
        if self._start_error is not None:
            raise RuntimeError(f"the fleet router failed to start: {self._start_error}") from self._start_error
        return self.address

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, close every connection, kill the replicas (and Ray if ours). Idempotent."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s + self.config.drain_grace_s)

    # ---------------------------------------------------------------- draining and status
    def drain(self, index: int, grace_s: float = 30.0) -> dict:
        """Scale-down: route no new connection to replica ``index``, and let it finish (or hand
        back, by closing their connections) its open sessions within ``grace_s``. Blocking; any thread."""
        if not (isinstance(index, int) and 0 <= index < len(self.replicas)):
            raise ValueError(f"replica must be in [0, {len(self.replicas) - 1}], got {index!r}")
        import ray

        r = self.replicas[index]
        r.draining = True
        return ray.get(r.actor.drain.remote(float(grace_s)), timeout=grace_s + 30)

    def undrain(self, index: int) -> None:
        """Call a drain off: replica ``index`` takes new connections and sessions again."""
        import ray

        r = self.replicas[index]
        ray.get(r.actor.undrain.remote(), timeout=30)
        r.draining = False

    def drain_all(self, grace_s: float) -> list:
        """Drain every replica at once (SIGTERM with ``drain_grace_s``)."""
        import ray

        for r in self.replicas:
            r.draining = True
        refs = [r.actor.drain.remote(float(grace_s)) for r in self.replicas if r.live]
        try:
            return ray.get(refs, timeout=grace_s + 30)
        except ray.exceptions.RayError as e:
            log.warning("draining failed: %s", e)
            return []

    def status(self) -> dict:
        """The replicas with their sessions and load, as ``/fleet`` serves it (JSON-ready)."""
        reps = []
        for r in self.replicas:
            ld = dict(r.load)
            ld.pop("session_keys", None)
            reps.append(dict(ld, replica=r.index, live=r.live, draining=r.draining, restarts=r.restarts,
                             connections=len(r.conns), connections_routed=r.connections_routed,
                             address=f"{r.address[0]}:{r.address[1]}" if r.address else None))
        return {"address": f"{self.address[0]}:{self.address[1]}", "replicas": reps,
                "live": sum(r.live for r in self.replicas), "handshakes_evicted": self.handshakes_evicted}

    # ---------------------------------------------------------------- connections
    async def _on_edge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._route(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        except Exception:
            log.exception("routing a connection failed")
            writer.transport.abort()
        finally:
            self._tasks.discard(task)

    def _admit_pending(self, peer: str, writer) -> None:
        """A new connection is pending until the router has seen the edge's first frame (or the
        replica's first reply): the per-peer cap, by the edge's real address, applies to those."""
        self._pending[peer][writer] = self._loop.time()
        self._enforce_cap(peer)

    def _enforce_cap(self, peer: str) -> None:
        """Over ``max_pending_per_peer``, close that peer's oldest pending connection, but only one
        pending for ``hello_grace_s`` already: the router accepts a burst of connections before it
        reads any of them, so a young one is not yet known to be silent. (Evicting at accept, as
        before, closed real edges whose Hello was in the socket buffer: 64 edges behind one address
        connecting at once lost 56.) A flood of silent sockets still holds at most the cap once
        the grace is over, and at most ``max_pending_burst`` ever; a real edge leaves pending as
        soon as its Hello is through, so it is evicted only if that takes over the grace."""
        pend = self._pending.get(peer)
        now = self._loop.time()
        while pend and len(pend) > self.max_pending_per_peer:
            old, since = next(iter(pend.items()))
            if len(pend) <= self.max_pending_burst and now - since < self.config.hello_grace_s:
                if peer not in self._cap_timers:  # one timer per peer, however many arrive meanwhile
                    self._cap_timers[peer] = self._loop.call_at(since + self.config.hello_grace_s, self._cap_due, peer)
                return
            del pend[old]
            self.handshakes_evicted += 1
            log.info("closing a pending handshake from %s to make room (max_pending_per_peer %d)", peer,
                     self.max_pending_per_peer)
            old.transport.abort()
        if not pend:
            self._pending.pop(peer, None)

    def _cap_due(self, peer: str) -> None:
        self._cap_timers.pop(peer, None)
        self._enforce_cap(peer)

    def _done_pending(self, peer: str, writer) -> None:
        pend = self._pending.get(peer)
        if pend is not None:
            pend.pop(writer, None)
            if not pend and peer not in self._cap_timers:
                self._pending.pop(peer, None)

    async def _route(self, reader, writer) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, (tuple, list)) and peername else str(peername)
        self._admit_pending(peer, writer)
        try:
            up = None
            for r in self._ranked():
                r.conns.add(writer)  # counted at once: edges routed while this one connects see it
                try:
                    ur, uw = await asyncio.wait_for(asyncio.open_connection(*r.address),
                                                    self.config.connect_timeout_s)
                except (OSError, asyncio.TimeoutError) as e:
                    r.conns.discard(writer)
                    self._down(r, f"connect: {e}")  # until its next load() answers
                    continue
                up = (r, ur, uw)
                break
            if up is None or writer.transport.is_closing():
                if up is not None:  # the edge side was closed (evicted, or the edge left) meanwhile
                    up[0].conns.discard(writer)
                    up[2].transport.abort()
                else:
                    log.warning("no live replica for a connection from %s: closing it (the edge retries)", peer)
                writer.transport.abort()
                return
            r, ur, uw = up
            r.connections_routed += 1
            done = lambda: self._done_pending(peer, writer)  # noqa: E731
            first = _FirstFrame(self._tls)

            def edge_bytes(data: bytes) -> bool:
                if first.feed(data):
                    done()  # the edge's Hello (or ClientHello) is through: it is the replica's turn
                    return True
                return False

            try:
                await splice(reader, writer, ur, uw, done, edge_bytes)
            finally:
                r.conns.discard(writer)
                uw.transport.abort()
                writer.transport.abort()
        finally:
            self._done_pending(peer, writer)


class _FirstFrame:
    """Counts the edge's first bytes until its first frame is whole, decoding nothing: the Hello
    (a 4-byte big-endian length, then that many bytes) or, with TLS, the first record (a 5-byte
    header ending in a 2-byte length: the ClientHello). Then the edge has spoken."""

    def __init__(self, tls: bool) -> None:
        self.header = 5 if tls else 4
        self.head = b""
        self.seen = 0

    def feed(self, data: bytes) -> bool:
        """Whether the first frame is whole, with ``data`` (the next bytes) counted."""
        if len(self.head) < self.header:
            self.head += data[: self.header - len(self.head)]
        self.seen += len(data)
        if len(self.head) < self.header:
            return False
        return self.seen >= self.header + int.from_bytes(self.head[-2:] if self.header == 5 else self.head, "big")


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch=None) -> None:
    """Copy until ``src`` ends; ``watch(data)`` sees each chunk until it returns True."""
    while True:
        data = await src.read(1 << 16)
        if not data:
            return
        dst.write(data)
        if watch is not None and watch(data):
            watch = None
        await dst.drain()


async def splice(er: asyncio.StreamReader, ew: asyncio.StreamWriter, ur: asyncio.StreamReader,
                 uw: asyncio.StreamWriter, on_first_reply=None, edge_watch=None) -> None:
    """Copy bytes edge -> replica and replica -> edge until either side ends (then both pumps
    stop; the caller closes the sockets). ``on_first_reply``: called at the replica's first bytes;
    ``edge_watch(data)``: sees the edge's chunks until it returns True."""
    first = None if on_first_reply is None else (lambda _data: on_first_reply() or True)
    tasks = [asyncio.create_task(_pump(er, uw, edge_watch)), asyncio.create_task(_pump(ur, ew, first))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
