"""One caller cannot lock out another: handshakes apart from authenticated connections,
identities with quotas, the idle timeout, and a verifier that serves identities in turn.

Real sockets on loopback against an in-process CloudServer (tiny random pair), plus the
``pipesd serve`` command for its flags; the ready-queue ordering is tested on its own.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipesd.cloud.identities import (DEFAULT_QUOTA, FairQueue, HandshakeGate, IdentityTable, load_identities,
                                     parse_identities)
from pipesd.edge import EdgeClient
from pipesd.metrics import CloudCollector
from pipesd.models import DraftModel
from pipesd.transport import conn
from pipesd.transport import messages as M
from pipesd.transport.codec import FrameReader

from runtime_helpers import reference_greedy, running_server, tiny_pair

TOKEN = "edge-token"
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def ref(pair):
    return reference_greedy(pair[2], PROMPT, 24)


def _wait(pred, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for: {what}"
        time.sleep(0.02)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _connect(url: str, token: str) -> conn.EdgeConnection:
    return conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token=token, tls=False)


def _open(c: conn.EdgeConnection, sid: int):
    c.send(M.OpenSession(session_id=sid, prompt_ids=np.array(PROMPT, np.int32), max_new_tokens=64))
    return c.recv(10)


# --------------------------------------------------------------------------- handshakes
def test_a_flood_of_silent_sockets_does_not_refuse_an_authenticated_edge(pair, ref):
    """300 sockets that never send a Hello used to take every one of the 256 connection slots."""
    with running_server(pair[1], auth_token=TOKEN) as (srv, url):
        flood = [socket.create_connection(("127.0.0.1", _port(url)), timeout=10) for _ in range(300)]
        try:
            _wait(lambda: srv.stats.handshakes_evicted >= 300 - srv.config.max_pending_per_peer,
                  what="the server to take in the flood")
            with EdgeClient(url, pair[0], auth_token=TOKEN) as client:
                assert client.generate(PROMPT, 24).token_ids == ref
            assert srv.stats.clients_refused == 0
            assert srv._gate.pending() <= srv.config.max_pending_per_peer  # the flood holds only its slots
        finally:
            for s in flood:
                s.close()


def test_the_handshake_gate_evicts_the_oldest_pending_connection():
    gate = HandshakeGate(max_pending=4, max_per_peer=2)
    assert gate.admit("a1", "A") == [] and gate.admit("a2", "A") == []
    assert gate.admit("a3", "A") == ["a1"]  # over the per-address cap: A's oldest goes, not the newcomer
    assert gate.admit("b1", "B") == [] and gate.admit("c1", "C") == []
    assert gate.admit("d1", "D") == ["a2"]  # over the overall cap: the oldest of all goes
    assert (gate.pending(), gate.pending("A"), gate.pending("B")) == (4, 1, 1)
    gate.remove("b1")
    gate.remove("b1")  # a handshake already over (or evicted) is ignored
    assert gate.pending() == 3 and gate.pending("B") == 0


def test_a_silent_socket_is_closed_at_the_handshake_deadline(pair):
    with running_server(pair[1], auth_token=TOKEN, handshake_timeout_s=0.3) as (srv, url):
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as s:
            frames = FrameReader()
            got = []
            while not got:
                data = s.recv(4096)
                assert data, "closed without an Error frame"
                got = frames.feed(data)
            assert isinstance(got[0], M.Error) and "no hello within 0.3 s" in got[0].message
        _wait(lambda: srv._gate.pending() == 0, what="the gate to forget it")


# --------------------------------------------------------------------------- identities
TOKENS_FILE = """\
# name    token        quota options
alice     tok-alice    sessions=3 connections=2 inflight_mb=0.0001   # a small quota
bob       tok-bob
"""


def test_tokens_file_lines_make_identities_with_quotas():
    alice, bob = parse_identities(TOKENS_FILE, "tokens.txt")
    assert (alice.name, alice.quota.max_sessions, alice.quota.max_connections) == ("alice", 3, 2)
    assert alice.quota.max_inflight_bytes == int(0.0001 * (1 << 20))
    assert alice.quota.max_tokens_per_s == DEFAULT_QUOTA.max_tokens_per_s
    assert bob.quota == DEFAULT_QUOTA
    assert "tok-alice" not in repr(alice)  # the token is never kept, only its digest
    table = IdentityTable("shared", [alice, bob])
    assert [i.name for i in table] == ["alice", "bob", "default"]
    assert table.authenticate("tok-bob").name == "bob" and table.authenticate("shared").name == "default"
    assert table.authenticate("tok-bo") is None and table.authenticate("") is None
    assert IdentityTable().authenticate("anything").name == "default"  # no token at all: anyone


@pytest.mark.parametrize("text, message", [
    ("alice\n", "tokens.txt:1: expected NAME TOKEN"),
    ("alice t1\nbob t2 sessions=x\n", "tokens.txt:2: sessions='x' is not an integer"),
    ("alice t1 color=red\n", "tokens.txt:1: unknown quota option 'color=red'"),
    ("alice t1 sessions=-1\n", "tokens.txt:1: sessions must be a finite number >= 0"),
    ("alice t1\n\n# c\nalice t2\n", "tokens.txt:4: identity 'alice' is already defined on line 1"),
    ("alice t1\nbob t1\n", "tokens.txt:2: identity 'bob' has the same token as line 1"),
    ("al ice=1 t\n", "tokens.txt:1: the second field must be the token"),
    ("a/b t1\n", "tokens.txt:1: identity name 'a/b'"),
])
def test_a_malformed_tokens_file_names_the_line(tmp_path, text, message):
    p = tmp_path / "tokens.txt"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        load_identities(str(p))
    assert str(e.value).startswith(f"{tmp_path}/{message}")


def test_serve_refuses_a_bad_tokens_file_before_loading_the_model(tmp_path):
    bad = tmp_path / "tokens.txt"
    bad.write_text("alice tok-a\nbob tok-b inflight=3\n")
    r = subprocess.run([sys.executable, "-m", "pipesd", "serve", "--port", "0", "--auth-tokens", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"pipesd: error: {bad}:2: unknown quota option 'inflight=3'" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipesd", "serve", "--idle-timeout-s", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--idle-timeout-s" in r.stderr


def test_one_identity_at_its_quotas_does_not_stop_another(pair, ref):
    ids = parse_identities(TOKENS_FILE)
    with running_server(pair[1], identities=ids, max_sessions=4, max_sessions_per_client=8) as (srv, url):
        a1, a2 = _connect(url, "tok-alice"), _connect(url, "tok-alice")
        with pytest.raises(conn.HandshakeError) as e:  # a third connection of alice's
            _connect(url, "tok-alice")
        assert e.value.code == M.E_LIMIT and "identity 'alice'" in str(e) and "quota connections=2" in str(e)
        for sid in (1, 2, 3):
            assert isinstance(_open(a1 if sid < 3 else a2, sid), M.SessionOpened)
        e = _open(a2, 4)  # the server has room for one more, alice's quota does not
        assert isinstance(e, M.Error) and e.code == M.E_LIMIT and "quota sessions=3" in e.message
        # bytes awaiting verification add up over alice's connections (80 + 80 > 104)
        a1.send(M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.array(ref[:10], np.int32),
                             probs=np.ones(10, np.float32)))
        alice = srv.identities.entries[0]
        _wait(lambda: alice.inflight_bytes == 80, what="a1's drafts to be held")
        a2.send(M.DraftBatch(session_id=3, epoch=0, first_pos=0, tokens=np.array(ref[:10], np.int32),
                             probs=np.ones(10, np.float32)))
        e = a2.recv(10)
        assert isinstance(e, M.Error) and e.code == M.E_LIMIT and e.session_id == 3
        assert "identity 'alice'" in e.message and "quota inflight_mb" in e.message
        with EdgeClient(url, pair[0], auth_token="tok-bob") as bob:  # bob is served all along
            assert bob.generate(PROMPT, 24).token_ids == ref
        with pytest.raises(conn.HandshakeError) as e:
            _connect(url, TOKEN)  # no such token here
        assert e.value.code == M.E_AUTH

        reg = CollectorRegistry()
        reg.register(CloudCollector(srv))
        text = generate_latest(reg).decode()
        assert 'pipesd_cloud_identity_connections{identity="alice"} 2.0' in text
        assert 'pipesd_cloud_identity_sessions{identity="alice"} 2.0' in text  # session 3 closed by the refusal
        assert 'pipesd_cloud_identity_refused_total{identity="alice",limit="sessions"} 1.0' in text
        assert 'pipesd_cloud_identity_refused_total{identity="alice",limit="connections"} 1.0' in text
        assert 'pipesd_cloud_identity_refused_total{identity="alice",limit="inflight_mb"} 1.0' in text
        assert 'pipesd_cloud_identity_tokens_verified_total{identity="bob"} 24.0' in text
        a1.close()
        a2.close()
        _wait(lambda: alice.connections == 0, what="alice's connections to be released")
        assert srv.stats.sessions_open == 0


def test_an_identity_token_rate_throttles_all_its_connections(pair, ref):
    ids = parse_identities("alice tok-alice tokens_per_s=400 tokens_burst=16\n")
    with running_server(pair[1], identities=ids) as (srv, url):
        conns = [_connect(url, "tok-alice") for _ in range(2)]
        for c in conns:  # 2 x 20 tokens through one bucket of 16: throttled, never refused
            assert isinstance(_open(c, 1), M.SessionOpened)
            c.send(M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.array(ref[:20], np.int32),
                                probs=np.ones(20, np.float32), verify=True))
        for c in conns:
            v = c.recv(30)
            assert isinstance(v, M.Verdict) and v.accepted == 20
            c.close()
        assert srv.identities.entries[0].throttled_s > 0 and srv.stats.protocol_errors == 0


def test_serve_with_a_tokens_file_binds_connections_to_identities(tmp_path):
    from pipesd.launch import start_server_subprocess, stop_process

    f = tmp_path / "tokens.txt"
    f.write_text("alice tok-alice connections=1\nbob tok-bob\n")
    proc, port = start_server_subprocess(None, auth_token="shared", extra=("--auth-tokens", str(f)))
    try:
        url = f"127.0.0.1:{port}"
        a = _connect(url, "tok-alice")
        with pytest.raises(conn.HandshakeError) as e:
            _connect(url, "tok-alice")
        assert e.value.code == M.E_LIMIT and "quota connections=1" in str(e)
        _connect(url, "tok-bob").close()
        _connect(url, "shared").close()  # $PIPESD_AUTH_TOKEN stays, as identity "default"
        a.close()
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- idle timeout
def test_an_idle_session_and_then_its_connection_are_closed_and_freed(pair, ref):
    with running_server(pair[1], auth_token=TOKEN, idle_timeout_s=0.5) as (srv, url):
        released = []
        release = srv.sessions.release
        srv.sessions.release = lambda s: (released.append(s.sid), release(s))
        c = _connect(url, TOKEN)
        assert isinstance(_open(c, 7), M.SessionOpened)
        e = c.recv(20)  # nothing sent: the session is given up
        assert isinstance(e, M.Error) and e.session_id == 7 and e.code == M.E_LIMIT
        assert "idle" in e.message and "idle_timeout_s 0.5" in e.message
        assert released == [7] and srv.stats.sessions_open == 0 and srv.stats.idle_sessions_closed == 1
        c.send(M.DraftBatch(session_id=7, epoch=0, first_pos=0, tokens=np.array(ref[:2], np.int32),
                            probs=np.ones(2, np.float32), verify=True))
        e = c.recv(10)  # a later frame is told why the session is gone
        assert isinstance(e, M.Error) and e.code == M.E_UNKNOWN_SESSION and "idle" in e.message
        _wait(lambda: srv.stats.idle_connections_closed == 1, what="the idle connection to be closed")
        with pytest.raises(conn.ConnectionClosed):
            c.recv(10)
        _wait(lambda: not srv._clients and srv.identities.entries[0].connections == 0, what="the slot to be freed")
        c.close()


# --------------------------------------------------------------------------- a fair verifier
def _ready(name: str, i: int):
    return SimpleNamespace(client=SimpleNamespace(identity=SimpleNamespace(name=name)), sid=(name, i))


def test_a_launch_takes_ready_sessions_round_robin_across_identities():
    """A has 40 sessions ready before B's one: B's is still in the next launch of 32."""
    q = FairQueue()
    for i in range(40):
        q.put_nowait(_ready("A", i))
    q.put_nowait(_ready("B", 0))
    launch = [q.get_nowait() for _ in range(32)]
    assert ("B", 0) in [s.sid for s in launch]
    assert [s.sid for s in launch if s.sid[0] == "A"] == [("A", i) for i in range(31)]  # FIFO within A
    assert q.qsize() == 9 and q.by_identity() == {"A": 9}


def test_identities_take_turns_one_session_at_a_time():
    q = FairQueue()
    for name, n in (("A", 3), ("B", 2), ("C", 1)):
        for i in range(n):
            q.put_nowait(_ready(name, i))
    order = [q.get_nowait().sid for _ in range(6)]
    assert order == [("A", 0), ("B", 0), ("C", 0), ("A", 1), ("B", 1), ("A", 2)]
    assert q.empty()


def test_two_identities_generating_together_stay_exact(pair, ref):
    """The fair queue changes only which sessions share a launch; each output stays the target's."""
    ids = parse_identities("alice tok-alice\nbob tok-bob\n")
    with running_server(pair[1], identities=ids) as (srv, url):
        assert isinstance(srv._ready, FairQueue)
        out = {}

        def run(name: str, token: str, k: int) -> None:
            draft = DraftModel(pair[0].model, wire_topk=8)  # a draft runner per client (its own cache)
            with EdgeClient(url, draft, auth_token=token) as c:
                out[(name, k)] = c.generate(PROMPT, 24).token_ids

        threads = [threading.Thread(target=run, args=(n, f"tok-{n}", k)) for n in ("alice", "bob") for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(out) == 6 and all(v == ref for v in out.values())
        assert {i.name: i.verifications > 0 for i in srv.identities} == {"alice": True, "bob": True}


def test_two_identities_sampling_together_match_the_target_distribution():
    """Sessions of two identities share launches (round-robin); pooled samples still follow the
    target's exact marginals (chi-square per position)."""
    from pipesd.edge import EdgeConfig, TriggerConfig
    from pipesd.sampling import SamplingParams
    from test_runtime_lossless import _chi2_pvalue, _exact_marginals

    vocab, depth, n, prompt = 12, 3, 750, [1, 2]
    draft, target, target_m = tiny_pair(vocab=vocab, noise=0.6, wire_topk=4)
    exact = _exact_marginals(target_m, prompt, SamplingParams(1.0, 0, 1.0), depth)
    per = {0: np.zeros((depth, vocab)), 1: np.zeros((depth, vocab))}  # one array per thread
    ids = parse_identities("alice tok-alice\nbob tok-bob\n")
    with running_server(target, identities=ids) as (srv, url):
        def run(token: str, k: int) -> None:
            counts, seed0 = per[k], k * 100_000
            cfg = EdgeConfig.for_method("pipesd", trigger=TriggerConfig(0.2, 0.3, 4))
            with EdgeClient(url, DraftModel(draft.model, wire_topk=4), cfg, auth_token=token) as c:
                for i in range(n):
                    g = c.generate(prompt, depth, SamplingParams(1.0, 0, 1.0, 0.0, seed=seed0 + i))
                    for d, t in enumerate(g.token_ids):
                        counts[d, t] += 1

        threads = [threading.Thread(target=run, args=(f"tok-{name}", k)) for k, name in enumerate(("alice", "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        counts = per[0] + per[1]
        assert counts.sum() == 2 * n * depth
        assert srv.stats.max_batch >= 2  # the identities did share launches
    for d in range(depth):
        p = _chi2_pvalue(counts[d], exact[d])
        assert p > 1e-3, f"position {d}: sampled distribution differs from the target's (chi2 p={p:.2e})"
