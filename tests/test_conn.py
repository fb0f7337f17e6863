"""Connections on loopback: EdgeConnection (threads) against a tiny asyncio server using serve_handshake.

No durations are asserted except lower bounds the link model guarantees (a slow machine only
makes things later).
"""
from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import numpy as np
import pytest

from pipesd.transport import codec, conn
from pipesd.transport import messages as M
from pipesd.transport.codec import ProtocolError, encode
from pipesd.transport.conn import ConnectionClosed, EdgeConnection, HandshakeError
from pipesd.transport.link import LinkEmulator, LinkProfile

TOKEN = "tok-\u00e9"
INFO = M.HelloAck(version=M.PROTOCOL_VERSION, server_name="test-cloud", vocab_size=100, tokenizer_fingerprint="fp",
                  max_sessions=4, max_prompt_tokens=1024, max_draft_in_flight=64)


def sample_messages():
    qi = np.array([[4, 9], [1, 0]], np.int32)
    qp = np.array([[0.5, 0.5], [0.75, 0.25]], np.float32)
    return [
        M.OpenSession(session_id=3, prompt_ids=np.array([1, 2, 3], np.int32), temperature=0.7, top_k=40, top_p=0.9,
                      min_p=0.05, seed=12345, tokenizer_fingerprint="fp", max_new_tokens=64),
        M.SessionOpened(session_id=3),
        M.DraftBatch(session_id=3, epoch=2, first_pos=17, tokens=np.array([5, 6], np.int32),
                     probs=np.array([0.5, 1.0], np.float32), verify=True, q_ids=qi, q_probs=qp, sent_at=1.5),
        M.DraftBatch(session_id=3, epoch=0, first_pos=0, tokens=np.zeros(0, np.int32), probs=np.zeros(0, np.float32),
                     verify=True),
        M.Verdict(session_id=3, epoch=2, start_pos=17, end_pos=22, accepted=3, token=99, rejected=True,
                  verified_len=21, finished=False, target_forwards=5, verify_s=0.012, echo_sent_at=1.5),
        M.CloseSession(session_id=3),
        M.Error(code=M.E_UNKNOWN_SESSION, message="no such session", session_id=9),
    ]


def same(a, b):
    assert type(a) is type(b)
    for k, v in a.__dict__.items():
        w = b.__dict__[k]
        if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
            np.testing.assert_array_equal(np.asarray(v), np.asarray(w), err_msg=k)
        else:
            assert v == w, k


class Server:
    """An asyncio server on loopback in a background thread.

    ``behaviour(reader, writer, hello)`` runs after a successful handshake (default: echo every
    frame), reading and writing as the cloud does (``conn.read_message`` / ``conn.write_message``).
    ``events`` records what happened, for assertions; ``echoed`` the bytes and messages echoed.
    """

    def __init__(self, behaviour=None, info=INFO, handshake_timeout_s=5.0, raw=None):
        self.behaviour = behaviour or self.echo
        self.info = info
        self.handshake_timeout_s = handshake_timeout_s
        self.raw = raw  # raw(reader, writer) replaces the handshake entirely
        self.events: list = []
        self.echoed = {"bytes": 0, "messages": 0}
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        self.ready.set()
        await self.stop.wait()
        srv.close()
        await srv.wait_closed()

    async def _handle(self, reader, writer):
        if self.raw is not None:
            try:
                await self.raw(reader, writer)
            finally:
                writer.close()
            return
        try:
            hello = await conn.serve_handshake(reader, writer, expected_token=TOKEN, server_info=self.info,
                                               timeout_s=self.handshake_timeout_s)
        except (ProtocolError, ConnectionClosed) as e:
            self.events.append(("refused", getattr(e, "code", None), str(e)))
            return
        self.events.append(("hello", hello))
        try:
            await self.behaviour(reader, writer, hello)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.events.append(("eof",))
        finally:
            writer.close()  # synchronous: also runs when the task is cancelled at shutdown

    async def echo(self, reader, writer, hello):
        while True:
            msg = await conn.read_message(reader)
            self.echoed["bytes"] += await conn.write_message(writer, msg)
            self.echoed["messages"] += 1

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(srv, **kw):
    return EdgeConnection.connect("127.0.0.1", srv.port, auth_token=kw.pop("auth_token", TOKEN), **kw)


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# --------------------------------------------------------------------------- handshake
def test_handshake_ok():
    with Server() as srv, connect(srv, client_name="edge-7") as c:
        same(INFO, c.hello_ack)
        assert wait_for(lambda: srv.events)
        kind, hello = srv.events[0]
        assert kind == "hello" and hello.client_name == "edge-7" and hello.auth_token == TOKEN


@pytest.mark.parametrize("token", ["wrong", "", TOKEN + "x", "t" * 256])
def test_wrong_token_is_refused_clearly(token):
    with Server() as srv:
        with pytest.raises(HandshakeError, match="authentication failed") as e:
            connect(srv, auth_token=token)
        assert e.value.code == M.E_AUTH and isinstance(e.value, ConnectionError)
        assert wait_for(lambda: srv.events) and srv.events[0][:2] == ("refused", M.E_AUTH)


def _raw_exchange(port, frames: bytes, timeout=5.0):
    """Send raw bytes, read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(frames)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk


@pytest.mark.parametrize("frames,code", [
    (encode(M.Hello(version=99, auth_token=TOKEN)), M.E_VERSION),
    (encode(M.SessionOpened(session_id=1)), M.E_BAD_FRAME),
    (b"\x00\x00\x00\x03\x01\xff\xff", M.E_BAD_FRAME),
    (struct.pack(">I", 1 << 20) + b"\x01", M.E_LIMIT),  # hello far over the handshake limit
])
def test_server_refuses_bad_hellos_with_an_error_frame_and_closes(frames, code):
    with Server() as srv:
        reply = _raw_exchange(srv.port, frames)
        err = codec.decode_frame(reply)  # exactly one frame, then EOF
        assert isinstance(err, M.Error) and err.code == code and err.session_id == -1
        assert wait_for(lambda: srv.events) and srv.events[0][:2] == ("refused", code)


def test_server_handshake_timeout():
    with Server(handshake_timeout_s=0.2) as srv:
        reply = _raw_exchange(srv.port, b"")
        err = codec.decode_frame(reply)
        assert isinstance(err, M.Error) and "no hello" in err.message


def test_edge_refuses_a_cloud_of_another_version():
    info = M.HelloAck(version=M.PROTOCOL_VERSION + 1, server_name="future", vocab_size=100, tokenizer_fingerprint="",
                      max_sessions=1, max_prompt_tokens=1, max_draft_in_flight=1)
    with Server(info=info) as srv:
        with pytest.raises(HandshakeError, match="version") as e:
            connect(srv)
        assert e.value.code == M.E_VERSION


def test_edge_handshake_with_a_silent_or_rude_cloud():
    async def silent(reader, writer):
        while await reader.read(4096):  # until the edge gives up and closes
            pass

    async def hang_up(reader, writer):
        writer.close()

    async def rude(reader, writer):
        writer.write(b"\x00\x00\x00\x02\x77\x00")  # unknown type
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    with Server(raw=silent) as srv:
        with pytest.raises(HandshakeError, match="did not complete"):
            connect(srv, timeout_s=0.3)
    with Server(raw=hang_up) as srv:
        with pytest.raises(HandshakeError, match="closed the connection during the handshake") as e:
            connect(srv)
        # both causes a silent close can have, not TLS alone
        assert "pending-handshake cap" in str(e.value) and "or it serves TLS" in str(e.value)
    with Server(raw=rude) as srv:
        with pytest.raises(HandshakeError, match="bad answer") as e:
            connect(srv)
        assert e.value.code == M.E_BAD_FRAME


def test_unreachable_cloud_is_a_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionError, match="cannot reach"):
        EdgeConnection.connect("127.0.0.1", port, auth_token="x", timeout_s=2)


# --------------------------------------------------------------------------- frames and counters
def test_frames_both_ways_and_byte_counters():
    msgs = sample_messages()
    with Server() as srv:
        with connect(srv) as c:
            for m in msgs:
                c.send(m)
                same(m, c.recv(5.0))
            assert c.recv(0.05) is None  # nothing more: timeout
            hello_bytes = len(encode(M.Hello(version=M.PROTOCOL_VERSION, auth_token=TOKEN, client_name="")))
            payload = sum(len(encode(m)) for m in msgs)
            assert c.bytes_sent == hello_bytes + payload and c.messages_sent == len(msgs) + 1
            assert c.bytes_received == len(encode(INFO)) + payload and c.messages_received == len(msgs) + 1
            assert srv.echoed == {"bytes": payload, "messages": len(msgs)}


def test_concurrent_senders():
    with Server() as srv, connect(srv) as c:
        def worker(base):
            for i in range(50):
                c.send(M.CloseSession(session_id=base + i))

        ts = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(3)]
        for t in ts:
            t.start()
        got = [c.recv(5.0).session_id for _ in range(150)]
        for t in ts:
            t.join()
        assert sorted(got) == sorted(k * 1000 + i for k in range(3) for i in range(50))
        for k in range(3):  # each thread's own messages stay in order
            mine = [g for g in got if g // 1000 == k]
            assert mine == sorted(mine)


def test_wake_ends_a_blocked_recv_and_a_stale_wake_is_dropped():
    """How a run's receive thread is stopped at the end of a generation without waiting out its
    poll; a wake left behind must not cut the next run's receive short."""
    with Server() as srv, connect(srv) as c:
        me, other, got = object(), object(), []
        t = threading.Thread(target=lambda: got.append(c.recv(60.0, wake_token=me)))
        t.start()
        c.wake(me)
        t.join(10.0)
        assert not t.is_alive() and got == [None]  # returned on the wake, not after 60 s
        c.wake(other)  # nobody waits with this token: stale
        c.send(M.CloseSession(session_id=9))
        assert c.recv(5.0, wake_token=me) == M.CloseSession(session_id=9)  # the stale wake was skipped
        c.wake(other)
        assert c.recv(0.05) is None  # a recv without a token is never woken: it times out


def test_messages_before_the_peer_closed_are_delivered_then_closed():
    async def say_and_leave(reader, writer, hello):
        await conn.write_message(writer, M.Error(code=M.E_INTERNAL, message="going away"))
        await conn.write_message(writer, M.SessionOpened(session_id=5))

    with Server(say_and_leave) as srv:
        c = connect(srv)
        first, second = c.recv(5.0), c.recv(5.0)
        assert isinstance(first, M.Error) and first.message == "going away"
        assert second == M.SessionOpened(session_id=5)
        for _ in range(2):  # keeps reporting the closure
            with pytest.raises(ConnectionClosed):
                c.recv(5.0)
        assert wait_for(lambda: c.closed)
        with pytest.raises(ConnectionClosed):
            c.send(M.CloseSession(session_id=5))
        c.close()


def test_malformed_frame_from_the_cloud():
    async def garble(reader, writer, hello):
        await conn.write_message(writer, M.SessionOpened(session_id=1))
        writer.write(b"\x00\x00\x00\x02\x63\x00")
        await writer.drain()
        await asyncio.sleep(5)

    with Server(garble) as srv:
        c = connect(srv)
        assert c.recv(5.0) == M.SessionOpened(session_id=1)
        with pytest.raises(ProtocolError, match="malformed frame from the cloud"):
            c.recv(5.0)
        with pytest.raises(ConnectionClosed):
            c.recv(5.0)
        c.close()


def test_oversized_frame_from_the_cloud_is_refused_before_reading_it():
    async def big(reader, writer, hello):
        await conn.write_message(writer, M.OpenSession(session_id=1, prompt_ids=np.zeros(5000, np.int32)))
        await asyncio.sleep(5)

    with Server(big) as srv:
        c = connect(srv, max_frame_bytes=4096)
        with pytest.raises(ProtocolError) as e:
            c.recv(5.0)
        assert e.value.code == M.E_LIMIT
        c.close()


def test_send_after_close_and_unencodable_messages():
    with Server() as srv:
        c = connect(srv)
        with pytest.raises(ValueError):
            c.send(M.SessionOpened(session_id=-1))
        c.send(M.SessionOpened(session_id=1))  # the connection survived the refused message
        assert c.recv(5.0) == M.SessionOpened(session_id=1)
        c.close()
        c.close()  # idempotent
        with pytest.raises(ConnectionClosed):
            c.send(M.SessionOpened(session_id=2))
        with pytest.raises(ConnectionClosed):
            c.recv(1.0)


# --------------------------------------------------------------------------- emulated link
def test_emulated_link_preserves_order_both_ways():
    link = LinkEmulator(LinkProfile(5e6, 0.002, 0.0005), LinkProfile(20e6, 0.002))
    rng = np.random.default_rng(0)
    msgs = []
    for i in range(30):
        n = int(rng.integers(0, 200))
        msgs.append(M.DraftBatch(session_id=1, epoch=0, first_pos=i, tokens=rng.integers(0, 1000, n).astype(np.int32),
                                 probs=np.full(n, 0.5, np.float32)))
    with Server() as srv, connect(srv, link=link) as c:
        for m in msgs:
            c.send(m)
        got = [c.recv(5.0) for _ in msgs]
    assert [g.first_pos for g in got] == list(range(30))
    for a, b in zip(msgs, got):
        same(a, b)
    assert link.up_messages == 31 and link.down_messages == 31  # + hello / hello ack


def test_emulated_link_lower_bounds():
    """Only lower bounds: the model can make things later, never earlier."""
    up = LinkProfile(1e6, delay_s=0.03, per_message_s=0.001)
    down = LinkProfile(1e6, delay_s=0.02)
    with Server() as srv, connect(srv, link=LinkEmulator(up, down)) as c:
        msg = M.OpenSession(session_id=1, prompt_ids=np.zeros(600, np.int32))  # ~2.5 KB: 20 ms at 1 Mbit/s each way
        size = len(encode(msg))
        t0 = time.monotonic()
        c.send(msg)
        t_sent = time.monotonic()
        assert c.recv(10.0) is not None
        t_back = time.monotonic()
    tx_up, tx_down = 0.001 + 8 * size / 1e6, 8 * size / 1e6
    assert t_sent - t0 >= tx_up * 0.999  # send blocks for the transmission
    assert t_back - t0 >= tx_up + 0.03 + tx_down + 0.02 - 1e-3


def test_send_returns_before_delivery_and_close_flushes_the_wire():
    """The sender is free once the frame has left; propagation happens in the pacer."""
    got = []

    async def record(reader, writer, hello):
        while True:
            got.append(await conn.read_message(reader))

    link = LinkEmulator(LinkProfile(1e9, delay_s=0.3), LinkProfile(1e9))
    with Server(record) as srv:
        c = connect(srv, link=link)
        c.send(M.CloseSession(session_id=42))
        pending = len(c._out)  # still on the emulated wire (0.3 s of propagation left)
        c.close()  # delivers what is on the wire before closing
        assert wait_for(lambda: got)
    assert pending == 1 and got == [M.CloseSession(session_id=42)]
