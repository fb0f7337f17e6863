"""Connections: blocking sockets + threads on the edge, asyncio streams on the cloud.

One persistent TCP connection per edge carries every session both ways. The edge side does
all link emulation (see :mod:`pipesd.transport.link`): ``send`` blocks for the uplink
transmission time and a pacer thread writes the frame when it would arrive; a reader thread
stamps incoming frames with their emulated delivery time and ``recv`` hands them out then.
"""
from __future__ import annotations

import asyncio
import heapq
import hmac
import queue
import socket
import threading
import time
from typing import Optional

from pipesd.transport import codec
from pipesd.transport import messages as M
from pipesd.transport.codec import HEADER, ProtocolError

__all__ = ["EdgeConnection", "ConnectionClosed", "read_message", "write_message", "serve_handshake"]


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or it broke)."""


class EdgeConnection:
    """The edge's end of the wire. ``send`` is thread-safe; ``recv`` is for one thread at a time."""

    def __init__(self, sock: socket.socket, link=None, max_frame_bytes: int = codec.MAX_FRAME_BYTES) -> None:
        self.sock = sock
        self.link = link
        self.max_frame_bytes = max_frame_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.hello_ack: Optional[M.HelloAck] = None
        self._send_lock = threading.Lock()
        self._inbox: "queue.Queue" = queue.Queue()
        self._held: Optional[tuple] = None  # (deliver_at, msg) not yet due
        self._closed = threading.Event()
        self._pacer_q: list = []
        self._pacer_cv = threading.Condition()
        self._seq = 0
        self._reader = threading.Thread(target=self._read_loop, name="pipesd-edge-reader", daemon=True)
        self._reader.start()
        self._pacer = None
        if link is not None:
            self._pacer = threading.Thread(target=self._pace_loop, name="pipesd-edge-pacer", daemon=True)
            self._pacer.start()

    @classmethod
    def connect(cls, host: str, port: int, *, auth_token: str = "", client_name: str = "", link=None,
                timeout_s: float = 10.0) -> "EdgeConnection":
        """Connect and handshake; raises ConnectionError with the cloud's reason on refusal."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise ConnectionError(f"cannot reach the cloud at {host}:{port}: {e}") from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = cls(sock, link)
        c.send(M.Hello(M.PROTOCOL_VERSION, auth_token, client_name))
        try:
            msg = c.recv(timeout_s)
        except ConnectionClosed:
            msg = None
        if isinstance(msg, M.HelloAck):
            c.hello_ack = msg
            return c
        c.close()
        if isinstance(msg, M.Error):
            raise ConnectionError(f"the cloud refused the connection: {msg.message}")
        raise ConnectionError("the cloud did not complete the handshake")

    # -- sending ----------------------------------------------------------------------
    def send(self, msg) -> None:
        data = codec.encode(msg)
        if self._closed.is_set():
            raise ConnectionClosed("connection closed")
        with self._send_lock:
            if self.link is None:
                try:
                    self.sock.sendall(data)
                except OSError as e:
                    self._closed.set()
                    raise ConnectionClosed(str(e)) from None
            else:
                tx_end, deliver_at = self.link.uplink_schedule(len(data), self.link.clock())
                self.link.sleep_until(tx_end)
                with self._pacer_cv:
                    self._seq += 1
                    heapq.heappush(self._pacer_q, (deliver_at, self._seq, data))
                    self._pacer_cv.notify()
            self.bytes_sent += len(data)
            self.messages_sent += 1

    def _pace_loop(self) -> None:
        link = self.link
        while not self._closed.is_set():
            with self._pacer_cv:
                while not self._pacer_q and not self._closed.is_set():
                    self._pacer_cv.wait(0.1)
                if self._closed.is_set():
                    return
                deliver_at, _, data = self._pacer_q[0]
                wait = deliver_at - link.clock()
                if wait > 0:
                    self._pacer_cv.wait(min(wait, 0.05))
                    continue
                heapq.heappop(self._pacer_q)
            try:
                self.sock.sendall(data)
            except OSError:
                self._closed.set()
                self._inbox.put(None)
                return

    # -- receiving --------------------------------------------------------------------
    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionClosed("the cloud closed the connection")
            buf += chunk
        return bytes(buf)

    def _read_loop(self) -> None:
        try:
            while not self._closed.is_set():
                (n,) = HEADER.unpack(self._read_exact(HEADER.size))
                codec.check_length(n, self.max_frame_bytes)
                body = self._read_exact(n)
                msg = codec.decode(body[0], memoryview(body)[1:])
                self.bytes_received += HEADER.size + n
                due = 0.0
                if self.link is not None:
                    due = self.link.downlink_schedule(HEADER.size + n, self.link.clock())
                self._inbox.put((due, msg))
        except (ConnectionClosed, OSError, ProtocolError) as e:
            self._inbox.put(e if isinstance(e, ProtocolError) else None)
        finally:
            self._closed.set()

    def recv(self, timeout_s: float) -> Optional[object]:
        """The next message, or None after ``timeout_s``; raises ConnectionClosed when closed."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._held is None:
                try:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return None
                if item is None:
                    self._inbox.put(None)  # keep reporting the closure
                    raise ConnectionClosed("the connection to the cloud is closed")
                if isinstance(item, ProtocolError):
                    self._inbox.put(None)
                    raise ConnectionClosed(f"protocol error from the cloud: {item}")
                self._held = item
            due, msg = self._held
            if self.link is not None:
                wait = due - self.link.clock()
                if wait > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    time.sleep(min(wait, left))
                    continue
            self._held = None
            return msg

    def close(self) -> None:
        if self._pacer is not None:
            # let frames already on the emulated wire arrive (bounded)
            end = time.monotonic() + 2.0
            while self._pacer_q and time.monotonic() < end and not self._closed.is_set():
                time.sleep(0.005)
        self._closed.set()
        with self._pacer_cv:
            self._pacer_cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ----------------------------------------------------------------------------- cloud side
async def read_message(reader: asyncio.StreamReader, max_frame_bytes: int = codec.MAX_FRAME_BYTES):
    """One message; ProtocolError on a bad frame, IncompleteReadError when the peer left."""
    head = await reader.readexactly(HEADER.size)
    (n,) = HEADER.unpack(head)
    codec.check_length(n, max_frame_bytes)
    body = await reader.readexactly(n)
    return codec.decode(body[0], memoryview(body)[1:])


async def write_message(writer: asyncio.StreamWriter, msg) -> None:
    writer.write(codec.encode(msg))
    await writer.drain()


async def serve_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, expected_token: str,
                          server_info: M.HelloAck, timeout_s: float = 10.0) -> M.Hello:
    """Expect Hello; check version and token (constant-time); answer HelloAck or Error."""
    try:
        hello = await asyncio.wait_for(read_message(reader, 64 << 10), timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(M.E_BAD_FRAME, "no hello within the handshake timeout") from None
    if not isinstance(hello, M.Hello):
        await _refuse(writer, M.E_BAD_FRAME, "the first frame must be a hello")
        raise ProtocolError(M.E_BAD_FRAME, "the first frame was not a hello")
    if hello.version != M.PROTOCOL_VERSION:
        await _refuse(writer, M.E_VERSION, f"protocol version {hello.version} not supported "
                                           f"(server speaks {M.PROTOCOL_VERSION})")
        raise ProtocolError(M.E_VERSION, "wrong protocol version")
    if not hmac.compare_digest(hello.auth_token.encode(), expected_token.encode()):
        await _refuse(writer, M.E_AUTH, "authentication failed")
        raise ProtocolError(M.E_AUTH, "bad auth token")
    await write_message(writer, server_info)
    return hello


async def _refuse(writer: asyncio.StreamWriter, code: int, message: str) -> None:
    try:
        await asyncio.wait_for(write_message(writer, M.Error(code, message)), 2.0)
    except Exception:
        pass
