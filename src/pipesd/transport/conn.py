"""Connections: blocking sockets + threads on the edge, asyncio streams on the cloud.

One persistent TCP connection per edge carries every session both ways. The edge side does
all link emulation (:mod:`pipesd.transport.link`): ``send`` blocks for the uplink
transmission time and a pacer thread writes the frame to the socket when it would arrive;
a reader thread stamps each incoming frame with its emulated delivery time and ``recv``
hands it out then. The cloud sees a plain socket, in emulation and in production alike.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import os
import queue
import select
import socket
import ssl
import threading
import time
from typing import Callable, Optional, Union

from pipesd.transport import codec
from pipesd.transport import messages as M
from pipesd.transport.codec import HEADER, ProtocolError
from pipesd.transport.link import LinkEmulator

__all__ = ["EdgeConnection", "ConnectionClosed", "HandshakeError", "read_message", "write_message",
           "serve_handshake", "HELLO_MAX_BYTES", "WRITE_TIMEOUT_S", "client_ssl_context", "server_ssl_context"]

HELLO_MAX_BYTES = 4096
"""Frame limit while waiting for a Hello (before the peer is authenticated)."""

WRITE_TIMEOUT_S = 30.0
"""How long the edge's send may wait for the cloud to take bytes (its socket buffer full)
before the connection counts as lost: a cloud that stops reading cannot block a send forever."""


class ConnectionClosed(ConnectionError):
    """The peer closed the connection, it broke, or it was closed locally."""


class _WriteTimeout(OSError):
    """No byte could be written for the write timeout (the peer stopped reading)."""


def _send_all(sock: socket.socket, data, timeout_s: float) -> None:
    """``sendall`` with a deadline per wait for room, without touching the socket's timeout
    (a reader thread blocks on the same socket): non-blocking sends, ``poll`` for room."""
    view = memoryview(data)
    poller = None  # made only when the buffer is full: the common send is one system call
    while view:
        try:
            n = sock.send(view, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n:
            view = view[n:]
            continue
        if poller is None:
            fd = sock.fileno()
            if fd < 0:
                raise OSError("the socket is closed")
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        if not poller.poll(timeout_s * 1e3):
            raise _WriteTimeout(f"the cloud took no data for write_timeout_s={timeout_s:g} s (it stopped reading)")


class HandshakeError(ConnectionError):
    """The cloud refused the connection (``code``: ``messages.E_*``) or did not complete the handshake."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- TLS
def server_ssl_context(cert: Optional[str], key: Optional[str] = None) -> Optional[ssl.SSLContext]:
    """The cloud's TLS settings from a PEM certificate (chain) and key file; None when ``cert`` is None.

    TLS 1.2 or newer. Raises ``ValueError`` naming the files when they cannot be loaded.
    """
    if not cert:
        if key:
            raise ValueError("a TLS key was given without a certificate (tls_cert / --tls-cert)")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS certificate {cert!r} / key {key!r}: {e}") from None
    return ctx


def client_ssl_context(ca: Optional[str] = None, *, insecure: bool = False) -> ssl.SSLContext:
    """The edge's TLS settings: verify the cloud's certificate against ``ca`` (a PEM file), else
    the system's trusted CAs, and its name against the host connected to.

    ``insecure=True`` skips both checks: the stream is encrypted but anyone on the path can
    impersonate the cloud. For testing with a self-signed certificate only.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS CA file {ca!r}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_from_env() -> Optional[ssl.SSLContext]:
    """``tls=None``: TLS when ``PIPESD_TLS_CA`` (a CA file), ``PIPESD_TLS=1`` or ``PIPESD_TLS_INSECURE=1`` is set."""
    ca = os.environ.get("PIPESD_TLS_CA") or None
    insecure = os.environ.get("PIPESD_TLS_INSECURE", "") not in ("", "0")
    if ca or insecure or os.environ.get("PIPESD_TLS", "") not in ("", "0"):
        return client_ssl_context(ca, insecure=insecure)
    return None


class _TlsSocket:
    """TLS over a blocking socket, for one reading and one writing thread at once.

    An ``ssl.SSLSocket`` must not be read and written from two threads concurrently (OpenSSL
    state is shared; CPython issues 76714, 137583), and the edge does exactly that. Here the
    TLS state lives in an ``SSLObject`` over memory buffers, touched only under a short lock,
    and the raw socket is read and written outside it, so a blocked read never blocks a send.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: Optional[str]) -> None:
        self.raw = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._lock = threading.Lock()  # the SSLObject and its buffers
        self._wlock = threading.Lock()  # the raw socket's write side: records leave in order

    def __getattr__(self, name):  # settimeout, setsockopt, fileno, getsockname, ...
        return getattr(self.raw, name)

    def handshake(self) -> None:
        while True:
            with self._lock:
                try:
                    self._obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            data = self.raw.recv(65536)
            if not data:
                raise ConnectionClosed("the peer closed the connection during the TLS handshake")
            with self._lock:
                self._in.write(data)

    def version(self) -> Optional[str]:
        return self._obj.version()

    def getpeercert(self):
        return self._obj.getpeercert()

    def _flush(self) -> None:
        with self._wlock:
            with self._lock:
                data = self._out.read()
            if data:
                self.raw.sendall(data)

    def sendall(self, data, timeout_s: Optional[float] = None) -> None:
        with self._wlock:
            with self._lock:
                self._obj.write(data)
                out = self._out.read()
            if timeout_s is None:
                self.raw.sendall(out)
            else:
                _send_all(self.raw, out, timeout_s)

    def recv_into(self, view, n: int) -> int:
        while True:
            with self._lock:
                try:
                    data = self._obj.read(n)
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLZeroReturnError:  # the peer closed TLS cleanly
                    return 0
                flush = self._out.pending > 0  # e.g. a key update answer
            if flush:
                self._flush()
            if data is not None:
                view[: len(data)] = data
                return len(data)
            chunk = self.raw.recv(65536)
            if not chunk:
                return 0
            with self._lock:
                self._in.write(chunk)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()


class _Eof:
    """Queued after the last frame: why the stream ended."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Wake:
    """Queued by :meth:`EdgeConnection.wake`: the receiver holding ``token`` returns at once."""

    __slots__ = ("token",)

    def __init__(self, token: object) -> None:
        self.token = token


class EdgeConnection:
    """The edge's end of the wire.

    ``send`` is thread-safe (a send thread plus the occasional Open/Close from another
    thread); ``recv`` is for one receiving thread. Counters: ``bytes_sent``,
    ``bytes_received`` (whole frames), ``messages_sent``, ``messages_received``.
    ``write_timeout_s``: the longest a write waits for the cloud to take bytes; then the
    connection is closed as lost (:data:`WRITE_TIMEOUT_S`).
    """

    def __init__(self, sock: socket.socket, link: Optional[LinkEmulator] = None,
                 max_frame_bytes: int = codec.MAX_FRAME_BYTES, write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        if not (isinstance(write_timeout_s, (int, float)) and write_timeout_s > 0):
            raise ValueError(f"write_timeout_s must be a number > 0, got {write_timeout_s!r}")
        self.sock = sock
        self.link = link
        self.write_timeout_s = float(write_timeout_s)
        self.max_frame_bytes = max_frame_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.hello_ack: Optional[M.HelloAck] = None
        self.handshake_rtt_s: Optional[float] = None  # Hello -> HelloAck, set by connect()
        self._send_lock = threading.Lock()
        self._inbox: "queue.Queue" = queue.Queue()
        self._held: Optional[tuple] = None  # (deliver_at, msg) taken from the inbox, not yet due
        self._eof: Optional[_Eof] = None
        self._closed = threading.Event()
        self._out: collections.deque = collections.deque()  # (deliver_at, frame) on the emulated uplink
        self._out_cv = threading.Condition()
        self._draining = False
        self._reader = threading.Thread(target=self._read_loop, name="pipesd-edge-reader", daemon=True)
        self._reader.start()
        self._pacer: Optional[threading.Thread] = None
        if link is not None:
            self._pacer = threading.Thread(target=self._pace_loop, name="pipesd-edge-pacer", daemon=True)
            self._pacer.start()

    @classmethod
    def connect(cls, host: str, port: int, *, auth_token: str = "", client_name: str = "",
                link: Optional[LinkEmulator] = None, timeout_s: float = 10.0,
                max_frame_bytes: int = codec.MAX_FRAME_BYTES,
                tls: Union[bool, ssl.SSLContext, None] = None, tls_ca: Optional[str] = None,
                tls_insecure: bool = False, write_timeout_s: float = WRITE_TIMEOUT_S) -> "EdgeConnection":
        """Connect to the cloud and do the Hello/HelloAck handshake.

        Raises ``ConnectionError`` when the cloud cannot be reached, :class:`HandshakeError`
        (a ``ConnectionError`` with ``.code``) when it refuses (bad token, wrong version: its
        Error frame's text is in the message) or does not answer within ``timeout_s``.

        TLS: ``tls=True`` (or a ``tls_ca`` file, or ``tls_insecure``) wraps the connection with
        :func:`client_ssl_context`; an ``ssl.SSLContext`` is used as given; ``False`` is plain
        TCP; ``None`` (default) reads ``PIPESD_TLS_CA`` / ``PIPESD_TLS`` / ``PIPESD_TLS_INSECURE``
        from the environment, else plain TCP. A failed certificate check is a
        :class:`HandshakeError` with code ``E_AUTH``. ``write_timeout_s``: see the class.
        """
        if not (isinstance(write_timeout_s, (int, float)) and write_timeout_s > 0):
            raise ValueError(f"write_timeout_s must be a number > 0, got {write_timeout_s!r}")
        if isinstance(tls, ssl.SSLContext):
            ctx: Optional[ssl.SSLContext] = tls
        elif tls or tls_ca or tls_insecure:
            ctx = client_ssl_context(tls_ca, insecure=tls_insecure)
        elif tls is None:
            ctx = _tls_from_env()
        else:
            ctx = None
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise ConnectionError(f"cannot reach the cloud at {host}:{port}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            tsock = _TlsSocket(sock, ctx, host if ctx.check_hostname else None)
            try:
                tsock.handshake()  # still under the connect timeout
            except ssl.SSLCertVerificationError as e:
                sock.close()
                raise HandshakeError(M.E_AUTH, f"the cloud at {host}:{port} failed the TLS certificate check: "
                                               f"{e.verify_message or e}") from None
            except (OSError, ConnectionClosed) as e:
                sock.close()
                raise HandshakeError(M.E_BAD_FRAME, f"TLS handshake with the cloud at {host}:{port} failed: {e} "
                                                    "(does it serve TLS? `pipesd serve --tls-cert`)") from None
            sock = tsock
        sock.settimeout(None)
        c = cls(sock, link, max_frame_bytes, write_timeout_s)
        closed: Optional[ConnectionClosed] = None
        t_hello = time.perf_counter()
        try:
            try:
                c.send(M.Hello(version=M.PROTOCOL_VERSION, auth_token=auth_token, client_name=client_name))
            except ConnectionClosed:
                pass  # the cloud spoke or left first: recv says why
            msg = c.recv(timeout_s)
        except ProtocolError as e:
            c.close()
            raise HandshakeError(e.code, f"bad answer from the cloud at {host}:{port}: {e}") from None
        except ConnectionClosed as e:
            msg, closed = None, e
        except BaseException:
            c.close()
            raise
        if isinstance(msg, M.HelloAck) and msg.version == M.PROTOCOL_VERSION:
            c.hello_ack = msg
            c.handshake_rtt_s = time.perf_counter() - t_hello  # a round trip (emulated link included)
            return c
        c.close()
        if isinstance(msg, M.Error):
            raise HandshakeError(msg.code, f"the cloud at {host}:{port} refused the connection: {msg.message} "
                                           f"(code {msg.code})")
        if isinstance(msg, M.HelloAck):
            raise HandshakeError(M.E_VERSION, f"the cloud at {host}:{port} speaks protocol version {msg.version}, "
                                              f"this edge {M.PROTOCOL_VERSION}")
        if closed is not None:
            # Closed without an Error frame: a cloud over its pending-handshake caps evicts silently,
            # and a TLS cloud drops plain TCP; the edge cannot tell which.
            why = ("the cloud may be over its pending-handshake cap (--max-pending-per-peer, "
                   "--max-pending-handshakes: retry later)")
            if ctx is None:
                why += ", or it serves TLS (connect with tls=True or a CA, --tls-ca)"
            raise HandshakeError(M.E_BAD_FRAME, f"the cloud at {host}:{port} closed the connection during the "
                                                f"handshake ({closed}): {why}")
        if msg is None:
            raise HandshakeError(M.E_BAD_FRAME, f"the cloud at {host}:{port} did not complete the handshake "
                                                f"within {timeout_s} s")
        raise HandshakeError(M.E_BAD_FRAME, f"the cloud at {host}:{port} answered the hello with "
                                            f"{type(msg).__name__}")

    def __enter__(self) -> "EdgeConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed (locally or by the peer)."""
        return self._closed.is_set()

    # -- sending ----------------------------------------------------------------------
    def send(self, msg: M.Message) -> None:
        """Send ``msg``. With a link emulator, blocks for its uplink transmission time.

        Raises ``ValueError``/``TypeError`` for an unencodable message and
        :class:`ConnectionClosed` when the connection is closed.
        """
        data = codec.encode(msg)
        with self._send_lock:
            if self._closed.is_set():
                raise ConnectionClosed("the connection to the cloud is closed")
            if self.link is None:
                try:
                    self._write(data)
                except OSError as e:
                    self._lost(e)
                    raise ConnectionClosed(f"sending to the cloud failed: {e}") from None
            else:
                tx_end, deliver_at = self.link.uplink_schedule(len(data), self.link.clock())
                self.link.sleep_until(tx_end)
                with self._out_cv:
                    self._out.append((deliver_at, data))
                    self._out_cv.notify()
            self.bytes_sent += len(data)
            self.messages_sent += 1

    def _write(self, data: bytes) -> None:
        """Write a whole frame, waiting at most ``write_timeout_s`` for room each time."""
        if isinstance(self.sock, _TlsSocket):
            self.sock.sendall(data, self.write_timeout_s)
        else:
            _send_all(self.sock, data, self.write_timeout_s)

    def _lost(self, e: OSError) -> None:
        """A write failed. After a timeout part of a frame may be out and the peer is still
        there: shut the socket down, so the reader thread ends and ``recv`` reports the loss
        (after another failure the peer is gone; what it sent first can still be read)."""
        self._closed.set()
        if isinstance(e, _WriteTimeout):
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pace_loop(self) -> None:
        """Write emulated-uplink frames to the socket at their delivery times, in order."""
        clock = self.link.clock
        while True:
            with self._out_cv:
                while not self._out:
                    if self._draining or self._closed.is_set():
                        return
                    self._out_cv.wait()
                if self._closed.is_set():
                    return
                deliver_at, data = self._out[0]
                wait = deliver_at - clock()
                if wait > 0:
                    self._out_cv.wait(wait)
                    continue
                self._out.popleft()
            try:
                self._write(data)
            except OSError as e:
                self._lost(e)
                return

    # -- receiving --------------------------------------------------------------------
    def _read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionClosed("the cloud closed the connection")
            got += k
        return buf

    def _read_loop(self) -> None:
        link = self.link
        end: BaseException = ConnectionClosed("the connection to the cloud is closed")
        try:
            while True:
                (n,) = HEADER.unpack(self._read_exact(HEADER.size))
                codec.check_length(n, self.max_frame_bytes)  # before allocating n bytes
                payload = self._read_exact(n)
                arrival = link.clock() if link is not None else 0.0
                msg = codec.decode_payload(payload)
                self.bytes_received += HEADER.size + n
                self.messages_received += 1
                due = link.downlink_schedule(HEADER.size + n, arrival) if link is not None else 0.0
                self._inbox.put((due, msg))
        except ProtocolError as e:
            end = e
        except ConnectionClosed as e:
            end = e
        except OSError as e:
            if not self._closed.is_set():
                end = ConnectionClosed(f"the connection to the cloud broke: {e}")
        finally:
            self._closed.set()
            with self._out_cv:
                self._out_cv.notify_all()
            self._inbox.put(_Eof(end))

    def wake(self, token: object) -> None:
        """Make a ``recv(..., wake_token=token)`` blocked now (or the next one) return None at
        once: how a run's receive thread is told to stop without waiting out its poll. A wake
        nobody was waiting for is dropped by the next ``recv`` with another token."""
        self._inbox.put(_Wake(token))

    def recv(self, timeout_s: float, wake_token: object = None) -> Optional[M.Message]:
        """The next message, or None after ``timeout_s`` (or on a :meth:`wake` with ``wake_token``).

        Messages that arrived before the connection ended are still handed out; then it raises
        :class:`ProtocolError` once if the cloud sent a malformed frame, and
        :class:`ConnectionClosed` from then on.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._held is None:
                if self._eof is not None:
                    raise ConnectionClosed(f"the connection to the cloud is closed ({self._eof.error})")
                try:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return None
                if isinstance(item, _Wake):
                    if wake_token is not None and item.token is wake_token:
                        return None
                    continue  # a stale wake, meant for a receiver that already left
                if isinstance(item, _Eof):
                    self._eof = item
                    if isinstance(item.error, ProtocolError):
                        raise ProtocolError(item.error.code, f"malformed frame from the cloud: {item.error}")
                    raise ConnectionClosed(str(item.error))
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

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Close. Frames still on the emulated uplink are delivered first (up to ``flush_timeout_s``)."""
        if self._pacer is not None:
            with self._out_cv:
                self._draining = True
                self._out_cv.notify_all()
            self._pacer.join(flush_timeout_s)
        self._closed.set()
        with self._out_cv:
            self._out_cv.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(1.0)


# ----------------------------------------------------------------------------- cloud side
async def read_message(reader: asyncio.StreamReader, max_frame_bytes: int = codec.MAX_FRAME_BYTES) -> M.Message:
    """Read one message. Raises :class:`ProtocolError` on a bad frame (the stream is then out of
    sync: answer with an Error and close) and ``asyncio.IncompleteReadError`` when the peer left."""
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    codec.check_length(n, max_frame_bytes)  # before reading (allocating) n bytes
    return codec.decode_payload(await reader.readexactly(n))


async def write_message(writer: asyncio.StreamWriter, msg: M.Message) -> int:
    """Write one message and drain; returns the bytes written."""
    data = codec.encode(msg)
    writer.write(data)
    await writer.drain()
    return len(data)


async def _close(writer: asyncio.StreamWriter, timeout_s: float = 2.0) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout_s)
    except Exception:  # already broken or reset: nothing left to close
        pass


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


async def serve_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, expected_token: str,
                          server_info: M.HelloAck, timeout_s: float = 10.0,
                          accept: Optional[Callable[[M.Hello], None]] = None) -> M.Hello:
    """Cloud side of the handshake: expect a Hello, check version and token, answer HelloAck.

    The token comparison is constant-time (``hmac.compare_digest`` of SHA-256 digests, so the
    length does not leak either). ``accept``, when given, replaces the token check: it is called
    with the Hello and refuses it by raising :class:`ProtocolError` (the cloud's identities and
    connection limits). On failure it sends an Error frame, closes the stream and raises
    :class:`ProtocolError` (code ``E_VERSION``, ``E_AUTH``, ``E_LIMIT``, ``E_BAD_FRAME``, ...) or
    :class:`ConnectionClosed` when the peer left without a Hello.
    """
    try:
        hello = await asyncio.wait_for(read_message(reader, HELLO_MAX_BYTES), timeout_s)
    except asyncio.TimeoutError:
        err = ProtocolError(M.E_BAD_FRAME, f"no hello within {timeout_s} s")
    except ProtocolError as e:
        err = e
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        await _close(writer)
        raise ConnectionClosed(f"the edge left during the handshake: {e}") from None
    else:
        if not isinstance(hello, M.Hello):
            err = ProtocolError(M.E_BAD_FRAME, f"the first frame must be a Hello, got {type(hello).__name__}")
        elif hello.version != M.PROTOCOL_VERSION:
            err = ProtocolError(M.E_VERSION, f"protocol version {hello.version} is not supported "
                                             f"(this cloud speaks {M.PROTOCOL_VERSION})")
        else:
            try:
                if accept is not None:
                    accept(hello)
                elif not hmac.compare_digest(_token_digest(hello.auth_token), _token_digest(expected_token)):
                    raise ProtocolError(M.E_AUTH, "authentication failed: wrong auth token")
            except ProtocolError as e:
                err = e
            else:
                await write_message(writer, server_info)
                return hello
    try:
        await asyncio.wait_for(write_message(writer, M.Error(code=err.code, message=str(err))), 2.0)
    except Exception:  # the peer may already be gone; the refusal stands
        pass
    await _close(writer)
    raise err
