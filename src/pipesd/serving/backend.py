"""Runs OpenAI requests on one :class:`pipesd.edge.EdgeClient`, one generation at a time.

Why one at a time: an EdgeClient drives one draft model, whose KV cache follows one
sequence, over one connection; the client already serialises ``generate`` calls with its
own lock. This module keeps the waiting in the event loop (an ``asyncio.Lock``), not in
worker threads, so queued requests never starve the server's thread pool, and bounds the
queue (429 when full, 503 after ``queue_timeout_s``).

Each generation runs on its own thread, which iterates ``EdgeClient.stream`` and posts the
verified text pieces, then the :class:`~pipesd.edge.Generation`, to an asyncio queue. The
thread, not the request, releases the lock, once the generation has ended and its cloud
session is closed, so outputs never mix. A request that stops reading early (a stop string,
a client that hung up) calls :meth:`Job.cancel`: the generation ends at its next draft step
or verdict (``finish_reason`` ``"cancelled"``, counted in ``EdgeBackend.cancelled``) and the
next request starts then, not after ``max_tokens``.

When the connection to the cloud is lost, the next request reconnects through ``connect``
(when given); while that fails requests get 503.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

from pipesd.serving.schemas import APIError

log = logging.getLogger("pipesd.serving")

__all__ = ["EdgeBackend", "Job"]

_END = "end"
_PIECE = "piece"
_ERROR = "error"


def classify(e: BaseException) -> APIError:
    """An OpenAI-shaped error for an exception raised by a generation."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ConnectionError):
        return APIError(503, f"the cloud is unreachable: {e}", type="server_error", code="cloud_unreachable")
    if isinstance(e, TimeoutError):
        return APIError(503, f"the cloud did not answer in time: {e}", type="server_error", code="cloud_timeout")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, RuntimeError):  # the cloud refused or reported an error
        return APIError(502, str(e), type="server_error", code="cloud_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


class Job:
    """One generation: its events arrive on an asyncio queue from the worker thread."""

    def __init__(self, timeout_s: float) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timeout_s = timeout_s
        self._result: Optional[tuple[str, Any]] = None
        self.cancel_event = threading.Event()  # the generation's cancel flag (EdgeClient.stream(cancel=))
        self.cancel_reason = ""
        self.cancelled_at = 0.0  # monotonic time of the cancel (for the log)

    def cancel(self, reason: str) -> None:
        """End the generation early (``reason``, for the log: "stop string", "client gone").
        A no-op once it has ended; safe to call more than once."""
        if self._result is None and not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancelled_at = time.monotonic()
            self.cancel_event.set()

    async def next(self) -> tuple[str, Any]:
        """``("piece", str)``, then ``("end", Generation)`` or ``("error", APIError)``."""
        if self._result is not None:
            return self._result
        try:
            kind, value = await asyncio.wait_for(self.queue.get(), self.timeout_s)
        except asyncio.TimeoutError:
            kind, value = _ERROR, APIError(504, f"the generation produced nothing for {self.timeout_s:.0f} s",
                                           type="server_error", code="timeout")
        if kind != _PIECE:
            self._result = (kind, value)
        return kind, value

    async def result(self):
        """Skip the remaining pieces; the Generation (or raise the APIError)."""
        while True:
            kind, value = await self.next()
            if kind == _END:
                return value
            if kind == _ERROR:
                raise value


class EdgeBackend:
    """Owns the EdgeClient (and its reconnection) for the HTTP app."""

    def __init__(self, client, *, connect: Optional[Callable[[], Any]] = None, metrics=None,
                 max_waiting: int = 32, queue_timeout_s: float = 600.0) -> None:
        self.client = client
        self.connect = connect
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.waiting = 0
        self.generations = 0
        self.cancelled = 0  # generations ended early by Job.cancel (their finish_reason "cancelled")
        self._lock: Optional[asyncio.Lock] = None
        self._live: set = set()  # jobs whose generation has not ended (cancel_all)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:  # created in the server's event loop
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def connected(self) -> bool:
        c = self.client
        conn = getattr(c, "conn", None)
        return c is not None and not getattr(conn, "closed", False)

    @property
    def busy(self) -> bool:
        return self._lock is not None and self._lock.locked()

    async def _ensure_client(self) -> None:
        """Reconnect when the connection was lost (the lock is held)."""
        if self.connected:
            return
        if self.connect is None:
            raise APIError(503, "the connection to the cloud is lost and this server cannot reconnect",
                           type="server_error", code="cloud_unreachable")
        old, self.client = self.client, None
        if old is not None:
            try:
                await asyncio.to_thread(old.close)
            except Exception:  # already broken
                pass
        try:
            self.client = await asyncio.to_thread(self.connect)
        except Exception as e:
            raise APIError(503, f"the cloud is unreachable: {e}", type="server_error",
                           code="cloud_unreachable") from None
        log.info("reconnected to the cloud")

    async def try_reconnect(self) -> bool:
        """For /health: reconnect when idle and disconnected; True when connected."""
        if self.connected or self.connect is None or self.busy:
            return self.connected
        async with self.lock:
            try:
                await self._ensure_client()
            except APIError:
                return False
        return self.connected

    async def start(self, prompt_ids: Sequence[int], max_tokens: int, sampling, config) -> Job:
        """Wait for the client, then start a generation; raises APIError (429/503)."""
        if self.waiting >= self.max_waiting:
            raise APIError(429, f"too many requests waiting ({self.waiting}); try again later",
                           type="rate_limit_error", code="queue_full")
        lock = self.lock
        self.waiting += 1
        try:
            await asyncio.wait_for(lock.acquire(), self.queue_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"the server was busy for {self.queue_timeout_s:.0f} s", type="server_error",
                           code="busy") from None
        finally:
            self.waiting -= 1
        try:
            await self._ensure_client()
        except BaseException:
            lock.release()
            raise
        loop = asyncio.get_running_loop()
        job = Job(timeout_s=config.verdict_timeout_s + 30.0)
        self._live.add(job)
        client = self.client
        self.generations += 1

        def post(kind: str, value) -> None:
            try:
                loop.call_soon_threadsafe(job.queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        def work() -> None:
            try:
                for piece in client.stream(list(prompt_ids), max_tokens, sampling, config=config,
                                           cancel=job.cancel_event):
                    post(_PIECE, piece)
                gen = client.last_generation
                if gen.finish_reason == "cancelled":
                    self.cancelled += 1
                    log.info("generation cancelled (%s) after %d of %d tokens, %.0f ms after the cancel",
                             job.cancel_reason, len(gen.token_ids), max_tokens,
                             (time.monotonic() - job.cancelled_at) * 1e3 if job.cancelled_at else 0.0)
                if self.metrics is not None:
                    try:
                        self.metrics.observe_generation(gen)
                    except Exception:
                        log.exception("metrics.observe_generation failed")
                post(_END, gen)
            except BaseException as e:
                err = classify(e)
                if err.status >= 500:
                    log.warning("generation failed: %s", e)
                post(_ERROR, err)
            finally:
                self._live.discard(job)
                try:
                    loop.call_soon_threadsafe(lock.release)
                except RuntimeError:
                    pass

        threading.Thread(target=work, name="pipesd-openai-gen", daemon=True).start()
        return job

    def cancel_all(self, reason: str) -> None:
        """Cancel every generation in progress (the server is shutting down): each ends at its
        next draft step or verdict, closes its cloud session, and its response ends at once."""
        for job in list(self._live):
            job.cancel(reason)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
