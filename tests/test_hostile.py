"""Hostile input: structured frame fuzzing of the codec, every server handler under a barrage of
hostile messages (hypothesis), wrong auth tokens, and the atheris fuzz target (bounded run).

test_codec.py covers random bytes, random bodies and byte-level mutations of valid frames;
here the frames are built field by field (huge counts, NaN/inf/negative probabilities,
unknown flags), and the server is attacked over real loopback connections. After each
barrage a healthy client must still get exactly the target's greedy output.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipesd.cloud.identities import HandshakeGate
from pipesd.edge import EdgeClient
from pipesd.sampling import SamplingParams
from pipesd.transport import codec, conn
from pipesd.transport import messages as M
from pipesd.transport.codec import ProtocolError

from runtime_helpers import reference_greedy, running_server, tiny_pair, wait_until

VOCAB = 48
TOKEN = "tok"
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
COUNT = st.one_of(st.integers(0, 6), st.sampled_from([2**16, 2**20, 2**20 + 1, 2**31, 2**32 - 1]))
WIDTH = st.one_of(st.integers(0, 5), st.sampled_from([2**20, 2**20 + 1, 2**32 - 1]))


def _decoded_or_protocol_error(body: bytes, tag: int):
    try:
        return codec.decode(body, tag)
    except ProtocolError as e:
        assert e.code in (M.E_BAD_FRAME, M.E_BAD_FIELD, M.E_LIMIT)
        return None


def _bounded_decode(body: bytes, tag: int):
    """Decode under tracemalloc: memory must stay within a small multiple of the frame."""
    tracemalloc.start()
    try:
        msg = _decoded_or_protocol_error(body, tag)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 + 4 * len(body), f"decoding a {len(body)}-byte body peaked at {peak} bytes"
    return msg


# --------------------------------------------------------------------------- codec, field by field
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.integers(0, 255), sent_at=st.floats(allow_nan=True, allow_infinity=True), n=COUNT, k=WIDTH,
       ints=st.lists(st.integers(-2**31, 2**31 - 1), max_size=24), floats=st.lists(FLOATS, max_size=24),
       tail=st.binary(max_size=8))
def test_structured_draft_frames(flags, sent_at, n, k, ints, floats, tail):
    head = codec.SCHEMAS[M.DraftBatch].head.pack(7, 1, 3, flags, sent_at, n, k)  # padding included
    arrays = np.array(ints, "<i4").tobytes() + np.array(floats, "<f4").tobytes()
    msg = _bounded_decode(head + arrays + tail, M.T_DRAFT)
    if msg is None:
        return
    # What decodes is sane: the server can trust these without re-checking types or finiteness.
    assert np.isfinite(msg.sent_at)
    assert len(msg.tokens) == len(msg.probs) == n and (n == 0 or msg.tokens.min() >= 0)
    assert np.all((msg.probs >= 0) & (msg.probs <= 1 + codec.PROB_SLACK))
    if msg.q_ids is not None:
        assert msg.q_ids.shape == msg.q_probs.shape == (n - msg.hint, k) and 1 <= k <= codec.MAX_Q_WIDTH
        assert np.all(np.isfinite(msg.q_probs)) and (n == 0 or msg.q_ids.min() >= 0)
        assert np.all(np.abs(msg.q_probs.sum(1, dtype=np.float64) - 1) <= codec.Q_SUM_TOL)


@settings(max_examples=200, deadline=None)
@given(temp=st.floats(allow_nan=True, allow_infinity=True), top_k=st.integers(-2**31, 2**31 - 1),
       top_p=st.floats(allow_nan=True, allow_infinity=True), min_p=st.floats(allow_nan=True, allow_infinity=True),
       n=COUNT, ids=st.lists(st.integers(-2**31, 2**31 - 1), max_size=8), fp=st.binary(max_size=8))
def test_structured_open_frames(temp, top_k, top_p, min_p, n, ids, fp):
    head = codec.SCHEMAS[M.OpenSession].head.pack(1, temp, top_k, top_p, min_p, 5, 16, n)
    body = head + np.array(ids, "<i4").tobytes() + struct.pack("<H", len(fp)) + fp
    msg = _bounded_decode(body, M.T_OPEN)
    if msg is None:
        return
    assert np.isfinite([msg.temperature, msg.top_p, msg.min_p]).all()
    assert msg.temperature >= 0 and msg.top_k >= 0 and 0 <= msg.top_p <= 1 and 0 <= msg.min_p <= 1
    assert len(msg.prompt_ids) == n and (n == 0 or msg.prompt_ids.min() >= 0)


def test_dense_q_with_no_tokens_allocates_nothing():
    """Found by these properties: an empty dense-q batch of width 2**20 built a 4 MiB arange."""
    body = codec.SCHEMAS[M.DraftBatch].head.pack(1, 0, 0, codec.F_HAS_Q | codec.F_Q_DENSE, 0.0, 0, 2**20)
    msg = _bounded_decode(body, M.T_DRAFT)
    assert msg is not None and msg.q_ids.shape == (0, 2**20)
    assert codec.decode_frame(codec.encode(msg)).q_ids.shape == (0, 2**20)  # still round-trips


# --------------------------------------------------------------------------- the server under fire
@pytest.fixture(scope="module")
def pair():
    return tiny_pair(VOCAB)


@pytest.fixture(scope="module")
def server(pair):
    with running_server(pair[1], auth_token=TOKEN, max_draft_in_flight=64, max_sessions_per_client=8) as s:
        yield s


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


SIDS = st.sampled_from([0, 1, 2, 3, 2**32 - 1])  # 3 is also the healthy client's session id
TOKS = st.integers(0, 2**31 - 1).map(lambda t: t if t < 2 * VOCAB else t % 1000)  # mostly near the vocab edge


@st.composite
def hostile_drafts(draw):
    n = draw(st.integers(0, 6))
    toks = np.array(draw(st.lists(TOKS, min_size=n, max_size=n)), np.int32)
    probs = np.array(draw(st.lists(st.one_of(st.floats(0, 1), FLOATS), min_size=n, max_size=n)), np.float32)
    qi = qp = None
    if n and draw(st.booleans()):
        k = draw(st.integers(1, 4))
        qi = np.array(draw(st.lists(TOKS, min_size=n * k, max_size=n * k)), np.int32).reshape(n, k)
        qp = np.array(draw(st.lists(FLOATS, min_size=n * k, max_size=n * k)), np.float32).reshape(n, k)
        if draw(st.booleans()):  # a proper distribution, to reach the server's own checks
            qp = np.full((n, k), 1.0 / k, np.float32)
    return M.DraftBatch(session_id=draw(SIDS), epoch=draw(st.integers(0, 3)),
                        first_pos=draw(st.sampled_from([0, 1, 5, 63, 2**31])), tokens=toks, probs=probs,
                        verify=draw(st.booleans()), q_ids=qi, q_probs=qp, sent_at=draw(st.floats(0, 1e9)))


hostile_opens = st.builds(M.OpenSession, session_id=SIDS,
                          prompt_ids=st.lists(TOKS, min_size=0, max_size=6).map(lambda x: np.array(x, np.int32)),
                          temperature=st.sampled_from([0.0, 0.0, 0.7, 1e-40, 1e-7, 1e30]), top_k=st.integers(0, 100),
                          top_p=st.sampled_from([1.0, 0.5, 1e-9]), min_p=st.sampled_from([0.0, 0.2, 0.999]),
                          seed=st.integers(0, 2**64 - 1),
                          tokenizer_fingerprint=st.sampled_from(["", "other-tokenizer"]),
                          max_new_tokens=st.sampled_from([0, 1, 8, 2**32 - 1]))
wrong_direction = st.one_of(
    st.builds(M.Hello, version=st.integers(0, 3), auth_token=st.just(TOKEN)),
    st.builds(M.HelloAck, version=st.just(1), server_name=st.just("x"), vocab_size=st.just(VOCAB),
              tokenizer_fingerprint=st.just(""), max_sessions=st.just(1), max_prompt_tokens=st.just(1),
              max_draft_in_flight=st.just(1)),
    st.builds(M.Verdict, session_id=SIDS, epoch=st.just(0), start_pos=st.just(0), end_pos=st.just(1),
              accepted=st.just(1), token=st.just(-1), rejected=st.just(False), verified_len=st.just(1)),
    st.builds(M.SessionOpened, session_id=SIDS), st.builds(M.Error, code=st.integers(0, 9), message=st.just("?"),
                                                session_id=st.just(-1)))
hostile_frames = st.one_of(hostile_drafts().map(codec.encode), hostile_opens.map(codec.encode),
                           st.builds(M.CloseSession, session_id=SIDS).map(codec.encode),
                           wrong_direction.map(codec.encode),
                           # Raw frames: random payloads under a consistent length (a shorter frame
                           # would just be waited for: that is the vanish-mid-frame case of
                           # test_faults.py), lengths over the limit, the empty frame.
                           st.binary(min_size=1, max_size=40).map(lambda b: codec.HEADER.pack(len(b)) + b),
                           st.tuples(st.integers((8 << 20) + 1, 2**32 - 1), st.binary(max_size=8)).map(
                               lambda t: codec.HEADER.pack(t[0]) + t[1]),
                           st.just(codec.HEADER.pack(0)))


class Attacker:
    """One raw connection, re-made after the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.c = None
        self.reconnects = 0

    def conn(self) -> conn.EdgeConnection:
        if self.c is None or self.c.closed:
            if self.c is not None:
                self.c.close()
                self.reconnects += 1
            self.c = conn.EdgeConnection.connect("127.0.0.1", self.port, auth_token=TOKEN, tls=False)
        return self.c

    def close(self) -> None:
        if self.c is not None:
            self.c.close()


PROBE = 999


def _fire(att: Attacker, frames: list[bytes], opened_sids: set) -> list:
    """Send ``frames``, then a probe Open; return what came back before the probe's answer (or the close)."""
    c = att.conn()
    for f in frames:
        try:
            c.sock.sendall(f)
        except OSError:
            break
    got = []
    try:
        c.send(M.OpenSession(session_id=PROBE, prompt_ids=np.array([1, 2], np.int32), max_new_tokens=4))
        while True:
            msg = c.recv(10)
            assert msg is not None, "the server did not answer within 10 s"
            if isinstance(msg, M.SessionOpened) and msg.session_id == PROBE:
                break
            got.append(msg)
        c.send(M.CloseSession(session_id=PROBE))
        for sid in opened_sids:  # keep under max_sessions_per_client
            c.send(M.CloseSession(session_id=sid))
    except (conn.ConnectionClosed, ProtocolError):
        got.append("closed")
    return got


@pytest.mark.timeout(240)
def test_server_handlers_under_a_hostile_barrage(pair, server):
    srv, url = server
    port = _port(url)
    ref = reference_greedy(pair[2], [5, 6, 7], 12)
    # A healthy raw client holds session 3 (a sid the attacker also uses) mid-generation.
    healthy = conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=False)
    healthy.send(M.OpenSession(session_id=3, prompt_ids=np.array([5, 6, 7], np.int32), max_new_tokens=12))
    assert isinstance(healthy.recv(10), M.SessionOpened)
    healthy.send(M.DraftBatch(session_id=3, epoch=0, first_pos=0, tokens=np.array(ref[:3], np.int32),
                              probs=np.ones(3, np.float32), verify=True))
    v = healthy.recv(10)
    assert isinstance(v, M.Verdict) and v.accepted == 3
    att = Attacker(port)
    seen = {"errors": 0, "closed": 0, "verdicts": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(frames=st.lists(hostile_frames, min_size=1, max_size=4))
    def barrage(frames):
        opened = {0, 1, 2, 3, 2**32 - 1}
        for msg in _fire(att, frames, opened):
            if msg == "closed":
                seen["closed"] += 1
            elif isinstance(msg, M.Error):
                seen["errors"] += 1
                assert msg.code in (M.E_BAD_FRAME, M.E_BAD_FIELD, M.E_LIMIT, M.E_UNKNOWN_SESSION, M.E_TOKENIZER,
                                    M.E_VERSION, M.E_AUTH), msg
            elif isinstance(msg, M.Verdict):
                seen["verdicts"] += 1
            else:
                assert isinstance(msg, M.SessionOpened) and msg.session_id in opened, msg

    try:
        barrage()
    finally:
        att.close()
    assert seen["errors"] > 0
    # Session 3 of the healthy client is untouched: it finishes with exactly the target's tokens.
    healthy.send(M.DraftBatch(session_id=3, epoch=0, first_pos=3, tokens=np.array(ref[3:12], np.int32),
                              probs=np.ones(9, np.float32), verify=True))
    v = healthy.recv(10)
    # (the previous verdict's bonus equals ref[3], so the batch's first token is trimmed)
    assert isinstance(v, M.Verdict) and (v.start_pos, v.accepted, v.verified_len) == (4, 8, 12) and v.finished
    healthy.close()
    with EdgeClient(url, pair[0], auth_token=TOKEN) as e:
        assert e.generate([1, 2, 3], 8).token_ids == reference_greedy(pair[2], [1, 2, 3], 8)
    assert srv.stats.protocol_errors > 0


@settings(max_examples=25, deadline=None)
@given(token=st.text(max_size=40).filter(lambda t: t != TOKEN), version=st.sampled_from([M.PROTOCOL_VERSION, 0, 2]))
def test_wrong_tokens_and_versions_are_refused(server, token, version):
    srv, url = server
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
        s.sendall(codec.encode(M.Hello(version=version, auth_token=token, client_name="x")))
        r = codec.FrameReader()
        msgs = []
        while not msgs:
            chunk = s.recv(4096)
            assert chunk, "closed without an Error frame"
            msgs = r.feed(chunk)
        assert isinstance(msgs[0], M.Error)
        assert msgs[0].code == (M.E_AUTH if version == M.PROTOCOL_VERSION else M.E_VERSION)
        assert s.recv(4096) == b""  # and closed


def test_session_of_another_client_is_invisible(server):
    """Same sid on two connections: two different sessions; neither can touch the other's."""
    srv, url = server
    a = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token=TOKEN, tls=False)
    b = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token=TOKEN, tls=False)
    for c in (a, b):
        c.send(M.OpenSession(session_id=4, prompt_ids=np.array([1, 2], np.int32), max_new_tokens=8))
        assert isinstance(c.recv(10), M.SessionOpened)
    b.send(M.DraftBatch(session_id=4, epoch=0, first_pos=0, tokens=np.array([999], np.int32),
                        probs=np.ones(1, np.float32), verify=True))  # b breaks its own 4
    assert isinstance(b.recv(10), M.Error)
    b.send(M.CloseSession(session_id=4))
    a.send(M.DraftBatch(session_id=4, epoch=0, first_pos=0, tokens=np.array([1], np.int32),
                        probs=np.ones(1, np.float32), verify=True))  # a's 4 lives on
    assert isinstance(a.recv(10), M.Verdict)
    a.close()
    b.close()


def test_tiny_temperature_is_refused(server):
    """1e-40 passes SamplingParams (finite, >= 0) but logits / 1e-40 overflow to inf: refused at open."""
    srv, url = server
    c = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token=TOKEN, tls=False)
    c.send(M.OpenSession(session_id=1, prompt_ids=np.array([1, 2], np.int32), temperature=1e-40))
    e = c.recv(10)
    assert isinstance(e, M.Error) and e.code == M.E_BAD_FIELD and "temperature" in e.message
    c.close()


# --------------------------------------------------------------------------- atheris (coverage-guided)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed (pip install 'pipesd[fuzz]')")
def test_fuzz_target_runs_clean(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pipesd.transport.fuzz_decoder", "-runs=2000", "-seed=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Done 2000 runs" in p.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_fuzz_properties_on_the_seeds():
    """The fuzz target's checks themselves, on its seeds and a few mutations (no atheris needed)."""
    from pipesd.transport.fuzz_decoder import check_input, seed_frames

    for f in seed_frames():
        check_input(f)
        check_input(f[:-1])
        check_input(bytes([f[4]]) + f[5:])


# --------------------------------------------------------------------------- limits
def test_token_bucket_throttles_without_refusing(pair):
    """Over max_tokens_per_s the server stops reading the client (TCP backpressure): slower, never wrong."""
    ref = reference_greedy(pair[2], [1, 2, 3], 40)
    with running_server(pair[1], auth_token=TOKEN, max_tokens_per_s=400.0, tokens_burst=16) as (srv, url):
        c = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token=TOKEN, tls=False)
        c.send(M.OpenSession(session_id=1, prompt_ids=np.array([1, 2, 3], np.int32), max_new_tokens=40))
        assert isinstance(c.recv(10), M.SessionOpened)
        for i in range(0, 40, 10):  # 40 tokens against a burst of 16: the rest waits for the bucket
            c.send(M.DraftBatch(session_id=1, epoch=0, first_pos=i, tokens=np.array(ref[i:i + 10], np.int32),
                                probs=np.ones(10, np.float32), verify=i == 30))
        v = c.recv(30)
        assert isinstance(v, M.Verdict) and v.accepted == 40 and v.finished
        assert srv.stats.throttled_s > 0 and srv.stats.protocol_errors == 0
        c.close()


def test_inflight_bytes_and_connection_limits(pair):
    with running_server(pair[1], auth_token=TOKEN, max_inflight_bytes_per_client=100, max_clients=2) as (srv, url):
        port = _port(url)
        a = conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=False)
        for sid in (1, 2):
            a.send(M.OpenSession(session_id=sid, prompt_ids=np.array([1, 2], np.int32), max_new_tokens=64))
            assert isinstance(a.recv(10), M.SessionOpened)
        a.send(M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.ones(10, np.int32),
                            probs=np.ones(10, np.float32)))  # 80 bytes held
        a.send(M.DraftBatch(session_id=2, epoch=0, first_pos=0, tokens=np.ones(5, np.int32),
                            probs=np.ones(5, np.float32)))  # +40 > 100: refused
        e = a.recv(10)
        assert isinstance(e, M.Error) and e.code == M.E_LIMIT and e.session_id == 2
        assert "max_inflight_bytes_per_client" in e.message
        b = conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=False)
        with pytest.raises(conn.HandshakeError) as ex:  # a third connection
            conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=False)
        assert ex.value.code == M.E_LIMIT and "connections" in str(ex.value)
        assert srv.stats.clients_refused == 1
        a.send(M.DraftBatch(session_id=1, epoch=0, first_pos=10, tokens=np.ones(0, np.int32),
                            probs=np.ones(0, np.float32), verify=True))  # session 1 still fine
        assert isinstance(a.recv(10), M.Verdict)
        a.close()
        b.close()


# --------------------------------------------------------------------------- handshake bursts
def test_a_burst_of_edges_from_one_address_all_get_in_while_silent_sockets_stay_capped(pair):
    """64 edges behind one address (a NAT, a load test) connecting at the same instant: the server
    accepts them all before it reads any Hello, so the per-peer cap evicting at accept closed
    36-56 of them. Only a connection still silent after hello_grace_s is evicted now; silent
    sockets are cut back to the cap all the same."""
    n, ids = 64, np.array([1, 2, 3], np.int32)
    with running_server(pair[1], auth_token=TOKEN, max_pending_handshakes=128, handshake_timeout_s=60) as (srv, url):
        port, cap = _port(url), srv.config.max_pending_per_peer
        silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2 * cap)]
        go, opened, errors, conns = threading.Barrier(n), [], [], []

        def edge() -> None:
            try:
                go.wait(30)
                c = conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=False, timeout_s=30)
                conns.append(c)
                c.send(M.OpenSession(session_id=1, prompt_ids=ids, max_new_tokens=4))
                opened.append(c.recv(30))
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        ts = [threading.Thread(target=edge) for _ in range(n)]
        try:
            # the server has taken the silent ones in first: they are the oldest
            assert wait_until(lambda: srv._gate.pending() + srv.stats.handshakes_evicted == len(silent))
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert not errors, errors[:3]
            assert len(opened) == n and all(isinstance(m, M.SessionOpened) for m in opened)
            # past the grace the silent ones are cut back to the cap, and no real edge was evicted
            assert wait_until(lambda: srv._gate.pending("127.0.0.1") == cap, 10)
            assert srv.stats.handshakes_evicted == len(silent) - cap
            assert all(_closed(s) for s in silent[:len(silent) - cap])  # the oldest ones went
        finally:
            for c in conns:
                c.close()
            for s in silent:
                s.close()


def _closed(s: socket.socket) -> bool:
    """The server closed this socket (abort: a reset; close: end of stream); it sent nothing."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_handshake_gate_lets_a_young_burst_pass_the_peer_cap_but_never_the_overall_cap(pair):
    gate = HandshakeGate(max_pending=6, max_per_peer=2, grace_s=1.0)
    assert gate.admit("b1", "B", now=0.0) == []  # another address, within its cap
    assert [gate.admit(f"a{i}", "A", now=0.1) for i in range(1, 6)] == [[]] * 5  # young: A passes its cap
    assert gate.next_expiry() == 1.1  # when A's oldest has been silent for the grace
    assert gate.admit("a6", "A", now=0.2) == ["a1"]  # over the overall cap: the over-cap peer gives first, not B
    assert gate.expire(1.0) == []  # still young
    assert gate.expire(1.15) == ["a2", "a3", "a4"]  # silent for the grace: cut back to the cap, oldest first
    assert (gate.pending("A"), gate.pending("B"), gate.next_expiry()) == (2, 1, None)
    gate.remove("a6")  # its Hello arrived: no longer pending
    assert gate.admit("a7", "A", now=5.0) == []
    assert gate.admit("a8", "A", now=5.0) == ["a5"]  # over the cap, and a5 is past the grace: it goes at once
    at_once = HandshakeGate(max_pending=6, max_per_peer=2, grace_s=0.0)  # no grace: the cap applies at admission
    assert [at_once.admit(k, "A", now=0.0) for k in ("x", "y", "z")] == [[], [], ["x"]]
    with pytest.raises(ValueError, match="hello_grace_s"):
        HandshakeGate(4, 2, grace_s=-1.0)
    with pytest.raises(ValueError, match="hello_grace_s"):
        running_server(pair[1], hello_grace_s=float("nan")).__enter__()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_server(pair, cert):
    with running_server(pair[1], auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1]) as s:
        yield s


def test_tls_end_to_end(pair, cert, tls_server, monkeypatch):
    srv, url = tls_server
    c = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token=TOKEN, tls_ca=cert[0])
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    c.close()
    # EdgeClient (and `pipesd generate --tls-ca`) pick the CA up from the environment.
    monkeypatch.setenv("PIPESD_TLS_CA", cert[0])
    with EdgeClient(url, pair[0], auth_token=TOKEN) as e:
        assert e.generate([1, 2, 3], 12).token_ids == reference_greedy(pair[2], [1, 2, 3], 12)
        g = e.generate([4, 5], 8, SamplingParams(temperature=0.8, seed=3))  # sampled mode: q travels too
        assert len(g.token_ids) == 8


def test_tls_refusals_are_clear(pair, cert, tls_server):
    srv, url = tls_server
    port = _port(url)
    with pytest.raises(conn.HandshakeError, match="certificate") as ex:  # not signed by a trusted CA
        conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=True)
    assert ex.value.code == M.E_AUTH
    with pytest.raises(conn.HandshakeError, match="TLS"):  # plain TCP to a TLS cloud
        conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls=False, timeout_s=5)
    c = conn.EdgeConnection.connect("127.0.0.1", port, auth_token=TOKEN, tls_insecure=True)  # testing only
    c.close()
    with pytest.raises(conn.HandshakeError, match="authentication"):  # TLS does not replace the token
        conn.EdgeConnection.connect("127.0.0.1", port, auth_token="bad", tls_ca=cert[0])
    with running_server(pair[1], auth_token=TOKEN) as (_, plain_url):  # TLS to a plain-TCP cloud
        with pytest.raises(conn.HandshakeError, match="TLS"):
            conn.EdgeConnection.connect("127.0.0.1", _port(plain_url), auth_token=TOKEN, tls_ca=cert[0], timeout_s=5)
    with pytest.raises(ValueError, match="certificate"):
        running_server(pair[1], tls_cert="/nonexistent.pem").__enter__()


def test_cli_tls_and_limit_arguments(cert):
    from pipesd.cli import build_parser

    a = build_parser().parse_args(["serve", "--tls-cert", cert[0], "--tls-key", cert[1], "--max-tokens-per-s", "500",
                                   "--max-clients", "10", "--max-send-buffer-mb", "2"])
    assert (a.tls_cert, a.tls_key, a.max_tokens_per_s, a.max_clients, a.max_send_buffer_mb) == \
        (cert[0], cert[1], 500.0, 10, 2.0)
    g = build_parser().parse_args(["generate", "x", "--cloud", "h:1", "--tls-ca", cert[0]])
    assert g.tls_ca == cert[0] and not g.tls_insecure


def test_serve_takes_the_hello_grace_and_refuses_a_negative_one():
    from pipesd.cli import _apply_security_args, build_parser
    from pipesd.cloud import CloudConfig

    cfg = CloudConfig()
    _apply_security_args(cfg, build_parser().parse_args(["serve", "--hello-grace-s", "0.25"]))
    assert cfg.hello_grace_s == 0.25
    r = subprocess.run([sys.executable, "-m", "pipesd", "serve", "--hello-grace-s", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--hello-grace-s" in r.stderr and "Traceback" not in r.stderr
