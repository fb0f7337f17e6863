"""Run the app with uvicorn: in the foreground (the CLI) or on a thread (tests, notebooks).

The listening socket is bound here, before uvicorn starts, so ``port=0`` works and the
URL is known (and printed) once the server accepts requests.
"""
from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import Callable, Optional

import uvicorn

__all__ = ["ServerThread", "serve", "start_in_thread"]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn, cancelling the app's generations when the shutdown begins (SIGINT, SIGTERM,
    :meth:`ServerThread.stop`): a stream in progress then ends at once (``finish_reason``
    ``"cancelled"``) instead of running on through the graceful-shutdown wait."""

    async def shutdown(self, sockets=None) -> None:
        backend = getattr(getattr(self.config.app, "state", None), "backend", None)
        if backend is not None and hasattr(backend, "cancel_all"):
            backend.cancel_all("server shutting down")
        await super().shutdown(sockets)


def _server(app, log_level: str) -> uvicorn.Server:
    level = str(log_level).lower()
    if level not in ("critical", "error", "warning", "info", "debug", "trace"):
        level = "warning"
    cfg = uvicorn.Config(app, log_level=level, access_log=level in ("debug", "info", "trace"),
                         timeout_graceful_shutdown=5, lifespan="on")
    return _Server(cfg)


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; ``on_ready(url)`` runs once requests are accepted."""
    sock = _bind(host, port)
    server = _server(app, log_level)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            on_ready(_url(sock))
        await task

    # uvicorn re-raises the signal that stopped it once it is done; a handler of ours turns
    # that into a normal return (exit status 0) instead of death by SIGTERM.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        asyncio.run(main())
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class ServerThread:
    """A uvicorn server on a background thread; :meth:`stop` shuts it down (bounded)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self._sock = _bind(host, port)
        self.url = _url(self._sock)
        self.server = _server(app, log_level)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="pipesd-edge-server", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by start()
            self._error = e

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the edge server failed to start: {self._error}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the edge server did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # a stuck request: stop waiting for it
            self.server.force_exit = True
            self._thread.join(5.0)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 30.0,
                    log_level: str = "warning") -> ServerThread:
    """Start ``app`` on a thread; returns the running :class:`ServerThread` (``.url``, ``.stop()``)."""
    return ServerThread(app, host, port, log_level=log_level).start(timeout_s)
