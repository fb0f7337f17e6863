"""Wire codec (round trips, hostile input), link emulation (virtual clock), connections."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesd.transport import codec, conn
from pipesd.transport import messages as M
from pipesd.transport.codec import FrameReader, ProtocolError, decode_frame, encode, encoded_size
from pipesd.transport.link import BandwidthTrace, LinkEmulator, LinkProfile, link_preset, trace_path


def _q(n, k, rng):
    p = rng.random((n, k)).astype(np.float32) + 0.01
    return rng.integers(0, 1000, (n, k)).astype(np.int32), (p / p.sum(1, keepdims=True)).astype(np.float32)


def samples():
    rng = np.random.default_rng(0)
    qi, qp = _q(5, 4, rng)
    return [
        M.Hello(1, "sekrit", "edge-1"),
        M.HelloAck(1, "cloud", 4096, "abcd", 8, 4096, 256),
        M.OpenSession(3, np.array([1, 2, 3], np.int32), 0.7, 40, 0.9, 0.05, 12345, "abcd", 64),
        M.SessionOpened(3),
        M.DraftBatch(3, 2, 17, np.array([5, 6, 7, 8, 9], np.int32), np.full(5, 0.5, np.float32), True, False, qi, qp, 1.5),
        M.DraftBatch(3, 0, 0, np.zeros(0, np.int32), np.zeros(0, np.float32), True, True),
        M.Verdict(3, 2, 17, 22, 3, 99, True, 21, False, 5, 0.012, 1.5),
        M.CloseSession(3),
        M.Error(M.E_AUTH, "nope", 7),
    ]


def _eq(a, b):
    assert type(a) is type(b)
    for k, v in a.__dict__.items():
        w = b.__dict__[k]
        if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
            if v is None or w is None:
                assert v is None and w is None
            else:
                np.testing.assert_array_equal(np.asarray(v), np.asarray(w))
        elif isinstance(v, float):
            assert w == pytest.approx(v, rel=1e-6)
        else:
            assert v == w, k


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frame = encode(msg)
    assert len(frame) == encoded_size(msg)
    _eq(msg, decode_frame(frame))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 20), k=st.integers(1, 6), sid=st.integers(0, 2**32 - 1), epoch=st.integers(0, 2**32 - 1),
       pos=st.integers(0, 2**32 - 1), verify=st.booleans(), bonus=st.booleans(), with_q=st.booleans())
def test_draft_round_trip_property(n, k, sid, epoch, pos, verify, bonus, with_q):
    rng = np.random.default_rng(n * 7 + k)
    qi, qp = _q(n, k, rng) if with_q else (None, None)
    msg = M.DraftBatch(sid, epoch, pos, rng.integers(0, 50000, n).astype(np.int32),
                       rng.random(n).astype(np.float32), verify, bonus, qi, qp, 0.25)
    _eq(msg, decode_frame(encode(msg)))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(data):
    try:
        FrameReader(max_frame_bytes=1 << 16).feed(data)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(idx=st.integers(0, len(samples()) - 1), pos=st.integers(0, 10_000), val=st.integers(0, 255),
       cut=st.integers(0, 10_000))
def test_mutated_and_truncated_frames(idx, pos, val, cut):
    frame = bytearray(encode(samples()[idx]))
    frame[pos % len(frame)] = val
    for f in (bytes(frame), bytes(frame[: cut % len(frame)])):
        try:
            decode_frame(f)
        except ProtocolError:
            pass


def test_huge_declared_length_refused_before_allocation():
    r = FrameReader(max_frame_bytes=1 << 20)
    with pytest.raises(ProtocolError) as e:
        r.feed(b"\xff\xff\xff\xf0\x05")
    assert e.value.code == M.E_LIMIT


@pytest.mark.parametrize("bad", ["nan_prob", "neg_prob", "q_sum", "neg_token", "flags"])
def test_bad_fields_rejected(bad):
    tokens = np.array([1, 2], np.int32)
    probs = np.array([0.5, 0.5], np.float32)
    qi, qp = np.array([[1, 2], [3, 4]], np.int32), np.array([[0.5, 0.5], [0.9, 0.1]], np.float32)
    if bad == "nan_prob":
        probs[0] = np.nan
    elif bad == "neg_prob":
        probs[0] = -0.5
    elif bad == "q_sum":
        qp[1] = [0.9, 0.9]
    elif bad == "neg_token":
        tokens[0] = -4
    frame = bytearray(encode(M.DraftBatch(1, 0, 0, tokens, probs, True, False, qi, qp)))
    if bad == "flags":
        frame[5 + 12] = 0x80
    with pytest.raises(ProtocolError):
        decode_frame(bytes(frame))


def test_frame_reader_random_chunking():
    msgs = samples() * 3
    blob = b"".join(encode(m) for m in msgs)
    rng = np.random.default_rng(1)
    r, out, i = FrameReader(), [], 0
    while i < len(blob):
        j = i + int(rng.integers(1, 40))
        out += r.feed(blob[i:j])
        i = j
    assert len(out) == len(msgs)
    for a, b in zip(msgs, out):
        _eq(a, b)


# --------------------------------------------------------------------------- link model
def test_link_schedule_serialises_and_delays():
    up = LinkProfile(8e6, delay_s=0.010, per_message_s=0.001)  # 1 byte per microsecond
    em = LinkEmulator(up, LinkProfile(8e6), clock=lambda: 0.0)
    end1, at1 = em.uplink_schedule(1000, 0.0)
    assert end1 == pytest.approx(0.002) and at1 == pytest.approx(0.012)
    end2, at2 = em.uplink_schedule(1000, 0.0005)  # offered while the first is on the wire
    assert end2 == pytest.approx(0.004) and at2 == pytest.approx(0.014)
    end3, _ = em.uplink_schedule(1000, 1.0)  # idle link: starts at once
    assert end3 == pytest.approx(1.002)


def test_trace_integrates_across_bandwidth_changes():
    tr = BandwidthTrace([(0.0, 8e6), (1.0, 16e6)])  # 1 MB/s then 2 MB/s, period 2 s
    assert tr.transmit_end(0.0, 8e6 * 0.5) == pytest.approx(0.5)
    # 1.5 MB from t=0.5: 0.5 MB in the first segment, then 1 MB at 2 MB/s
    assert tr.transmit_end(0.5, 8 * 1.5e6) == pytest.approx(1.5)
    assert tr.bandwidth_at(2.5) == 8e6  # loops
    prof = LinkProfile(1.0, trace=tr)
    assert prof.tx_end(0.0, 500_000) == pytest.approx(0.5)


def test_trace_csv_and_presets(tmp_path):
    up = BandwidthTrace.from_csv(trace_path("paper_s4_up"))
    assert min(up.bws) == 10e6 and max(up.bws) == 80e6
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,bandwidth_bps\n0,1e6\n5,abc\n")
    with pytest.raises(ValueError, match=":3"):
        BandwidthTrace.from_csv(bad)
    for name in ("lan", "wifi", "4g", "slow", "paper", "paper-s4"):
        a, b = link_preset(name)
        assert a.bandwidth_bps > 0 and b.bandwidth_bps > 0
    with pytest.raises(ValueError, match="preset"):
        link_preset("moon")
    with pytest.raises(ValueError, match="bandwidth_bps"):
        LinkProfile(0.0)
    with pytest.raises(ValueError, match="delay_s"):
        LinkProfile(1e6, delay_s=-1)


# --------------------------------------------------------------------------- connections
class _EchoServer:
    """Handshake, then echo every frame back (tiny asyncio server on loopback)."""

    def __init__(self, token="tok"):
        self.token = token
        self.ready = threading.Event()
        self.loop = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        self.ready.set()
        await self.stop.wait()
        srv.close()

    async def _handle(self, reader, writer):
        info = M.HelloAck(1, "echo", 100, "fp", 1, 1, 1)
        try:
            await conn.serve_handshake(reader, writer, expected_token=self.token, server_info=info, timeout_s=5)
            while True:
                msg = await conn.read_message(reader)
                await conn.write_message(writer, msg)
        except Exception:
            writer.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)


def test_connection_handshake_and_frames_both_ways():
    srv = _EchoServer()
    try:
        c = conn.EdgeConnection.connect("127.0.0.1", srv.port, auth_token="tok")
        assert c.hello_ack.server_name == "echo"
        for m in samples()[3:]:
            c.send(m)
            _eq(m, c.recv(5.0))
        assert c.bytes_sent > 0 and c.bytes_received > 0 and c.messages_sent == len(samples()) - 3 + 1
        c.close()
        with pytest.raises(ConnectionError, match="authentication"):
            conn.EdgeConnection.connect("127.0.0.1", srv.port, auth_token="wrong")
    finally:
        srv.close()


def test_emulated_link_preserves_order():
    srv = _EchoServer()
    try:
        link = LinkEmulator(LinkProfile(5e6, 0.002, 0.0005), LinkProfile(20e6, 0.002))
        c = conn.EdgeConnection.connect("127.0.0.1", srv.port, auth_token="tok", link=link)
        for i in range(20):
            c.send(M.SessionOpened(i))
        got = [c.recv(5.0).session_id for _ in range(20)]
        assert got == list(range(20))
        c.close()
    finally:
        srv.close()


def test_unreachable_cloud_is_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ConnectionError, match="cannot reach"):
        conn.EdgeConnection.connect("127.0.0.1", port, timeout_s=2)
