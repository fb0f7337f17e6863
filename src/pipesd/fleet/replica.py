"""One verifier replica: today's :class:`~pipesd.cloud.CloudServer` inside a Ray actor.

Each replica owns its target, its sessions and KV caches and its batched verification across
those sessions; the router (:mod:`pipesd.fleet.router`) only splices bytes to it. The server runs
its asyncio loop in a thread of the actor process, so the actor's methods (load, metrics, drain)
are answered while it verifies. Ray restarts a dead replica (``max_restarts=-1``); the restarted
one listens on a new port, which the router reads from :meth:`ReplicaServer.load`.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from typing import Any, Optional

__all__ = ["ReplicaServer", "replica_actor", "node_host"]


def node_host() -> str:
    """The address a replica listens on: loopback when Ray runs on this host only, else the node IP
    (so a router on another node can reach it)."""
    if _single_node():
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


def _single_node() -> bool:
    try:
        import ray

        return len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    except Exception:
        return True


class ReplicaServer:
    """A :class:`~pipesd.cloud.CloudServer` with the fleet's handles. Plain Python, so tests and
    the actor share it; :func:`replica_actor` wraps it for Ray.

    ``cloud``: :class:`~pipesd.cloud.CloudConfig` fields (host and port are the replica's own:
    port 0). ``model``/``threads``/``target_gguf``: as for ``pipesd serve``.
    """

    def __init__(self, index: int, cloud: dict, model: Optional[str] = None, threads: Optional[int] = None,
                 target_gguf: Optional[str] = None, host: Optional[str] = None) -> None:
        from pipesd.cloud import CloudConfig, CloudServer
        from pipesd.fingerprint import tokenizer_fingerprint
        from pipesd.launch import load_target
        from pipesd.transport import messages as M

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.index = index
        self.started_at = time.time()
        self.draining = False
        target = load_target(model, threads, gguf=target_gguf)
        cfg = CloudConfig(**dict(cloud, host=host or node_host(), port=0))
        self.server = CloudServer(target, cfg, tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer))
        plain = self.server._dispatch

        def dispatch(client, msg) -> None:
            # Draining: a new session is handed back, not refused. Its connection closes, so the
            # edge's offline path reconnects through the router (to a live replica) and re-opens.
            if self.draining and isinstance(msg, M.OpenSession):
                client.alive = False
                client.writer.close()
                return
            plain(client, msg)

        self.server._dispatch = dispatch  # the server stays today's; only this instance is wrapped
        self.server.start_in_thread()

    # ---------------------------------------------------------------- handles
    def ping(self) -> bool:
        return True

    def address(self) -> tuple:
        return tuple(self.server.address)

    def _snapshot(self) -> dict:
        """Sessions and queued draft tokens, read on the server's loop (a consistent view)."""
        def read() -> dict:
            sessions = [(c.peer, s.sid) for c in self.server._clients for s in c.sessions.values()]
            queued = sum(len(s.proto.pending) for c in self.server._clients for s in c.sessions.values())
            return {"sessions": sessions, "queued_tokens": queued, "clients": len(self.server._clients)}

        loop = self.server._loop
        if loop is None or loop.is_closed():
            return {"sessions": [], "queued_tokens": 0, "clients": 0}

        async def on_loop() -> dict:
            return read()

        return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(5.0)

    def load(self) -> dict:
        """What the router routes on, and what ``/fleet`` shows: address, sessions open, queued
        draft tokens, busy seconds, verifications, draining."""
        snap = self._snapshot()
        st = self.server.stats
        return {"replica": self.index, "address": list(self.address()), "pid": os.getpid(),
                "sessions_open": st.sessions_open, "sessions_opened": st.sessions_opened,
                "clients": snap["clients"], "queued_tokens": snap["queued_tokens"], "busy_s": st.busy_s,
                "verifications": st.verifications, "batched_launches": st.batched_launches,
                "max_batch": st.max_batch, "draining": self.draining, "started_at": self.started_at,
                "session_keys": [f"{p}#{sid}" for p, sid in snap["sessions"]]}

    def stats(self) -> dict:
        return asdict(self.server.stats)

    def metrics(self) -> list:
        """The per-server metric families (:class:`pipesd.metrics.CloudCollector`), picklable."""
        from pipesd.metrics import CloudCollector

        return list(CloudCollector(self.server).collect())

    def drain(self, grace_s: float = 30.0) -> dict:
        """Stop taking new sessions (an OpenSession closes its connection: the edge reconnects to
        another replica); wait up to ``grace_s`` for the open sessions to finish, then close every
        connection still open (its edges reconnect elsewhere and re-verify their unverified
        suffix). Returns how many sessions were open at the start and how many were cut."""
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.draining = True
        start = self.server.stats.sessions_open
        deadline = time.monotonic() + grace_s
        while self.server.stats.sessions_open > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = self.server.stats.sessions_open
        loop = self.server._loop
        if loop is not None and not loop.is_closed():
            def close_all() -> None:
                for c in list(self.server._clients):
                    c.alive = False
                    c.writer.close()
            loop.call_soon_threadsafe(close_all)
        return {"replica": self.index, "sessions_at_start": start, "sessions_cut": cut}

    def undrain(self) -> None:
        """Take new sessions again (a drain called off)."""
        self.draining = False

    def stop(self) -> None:
        self.server.stop()


_ACTOR: Any = None


def replica_actor():
    """The Ray actor class of :class:`ReplicaServer` (made once; Ray imported here, not at import time).

    ``max_restarts=-1``: Ray restarts a dead replica forever; ``max_task_retries=0``: a call to a
    dead one fails at once (the router then treats it as down) instead of waiting for the restart.
    ``max_concurrency``: ``load`` and ``metrics`` are answered while a ``drain`` waits.
    """
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=4)(ReplicaServer)
    return _ACTOR

