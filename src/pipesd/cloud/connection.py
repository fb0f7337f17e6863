"""One edge connection on the cloud: its sessions, its limits, and replies that never block.

The verifier and the other clients never wait on a slow reader: :meth:`ClientConn.send` queues
a frame and returns. A client with more than ``max_send_buffer_bytes`` unread, or whose socket
does not drain within ``write_timeout_s``, is dropped with a logged reason (its read loop then
frees its sessions). A token bucket over prompt and draft tokens throttles (stops reading),
never refuses.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from pipesd.transport import codec
from pipesd.transport import messages as M

log = logging.getLogger("pipesd.cloud")

__all__ = ["ClientConn", "TokenBucket"]


class TokenBucket:
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


class ClientConn:
    """An authenticated edge connection (``config``: the server's CloudConfig, ``stats``: its
    CloudStats; ``identity``: the :class:`pipesd.cloud.identities.Identity` that authenticated
    it). ``inflight_bytes`` sums its sessions' pending draft bytes; ``last_active`` is when it
    last sent a frame or lost its last session (idle timeout)."""

    def __init__(self, writer: asyncio.StreamWriter, peer: str, config, stats, identity=None) -> None:
        self.writer = writer
        self.peer = peer
        self.config = config
        self.stats = stats
        self.identity = identity
        self.sessions: dict = {}  # session id -> cloud.sessions.Session
        self.expired: dict = {}  # session id -> why the server closed it (recent ones: a later frame is told)
        self.last_active = time.monotonic()
        self.alive = True
        self.inflight_bytes = 0
        self.drain_task: Optional[asyncio.Task] = None
        rate = config.max_tokens_per_s
        self.bucket = TokenBucket(rate, config.tokens_burst) if rate > 0 else None

    def send(self, msg) -> None:
        """Queue ``msg`` without waiting for the peer to read it (see the module docstring)."""
        if not self.alive:
            return
        transport = self.writer.transport
        if transport.is_closing():
            self.alive = False
            return
        self.writer.write(codec.encode(msg))
        buffered = transport.get_write_buffer_size()
        if buffered > self.config.max_send_buffer_bytes:
            self.drop(f"{buffered} bytes of replies unread (max_send_buffer_bytes "
                      f"{self.config.max_send_buffer_bytes}): the client is not reading")
        elif self.drain_task is None and buffered > transport.get_write_buffer_limits()[1]:
            self.drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        """Watch replies that back up: the client must read them within ``write_timeout_s``."""
        try:
            await asyncio.wait_for(self.writer.drain(), self.config.write_timeout_s)
        except asyncio.TimeoutError:
            self.drop(f"replies not read within write_timeout_s ({self.config.write_timeout_s} s)")
        except (ConnectionError, RuntimeError):  # the connection is gone: the reader cleans up
            self.alive = False
        finally:
            self.drain_task = None

    def drop(self, reason: str) -> None:
        """Cut a misbehaving client off now (no flush); its read loop then frees its sessions."""
        if not self.alive:
            return
        self.alive = False
        log.warning("dropping client %s: %s", self.peer, reason, extra={"peer": self.peer})
        self.stats.clients_dropped += 1  # after the log line: whoever sees the count finds the reason
        self.writer.transport.abort()

    async def throttle(self, msg) -> None:
        """Wait (stop reading this client) while it or its identity is over its token rate."""
        if self.bucket is None and getattr(self.identity, "bucket", None) is None:
            return
        if isinstance(msg, M.DraftBatch):
            n = max(len(msg.tokens), 1 if msg.verify else 0)  # an empty verify still costs a target forward
        elif isinstance(msg, M.OpenSession):
            n = len(msg.prompt_ids)
        elif isinstance(msg, M.StreamRequest):
            n = msg.budget  # a target forward per streamed token, billed up front
        elif isinstance(msg, M.TreeRequest):
            n = len(msg.tokens) + 1  # a target forward per node and the root
        else:
            return
        shared = getattr(self.identity, "bucket", None)  # the identity's tokens/s quota, over all its connections
        wait = max(b.debit(n) for b in (self.bucket, shared) if b is not None)
        if wait > 0:
            self.stats.throttled_s += wait
            if self.identity is not None:
                self.identity.throttled_s += wait
            await asyncio.sleep(wait)
