"""The cloud server against raw, scripted and hostile clients."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from pipesd.edge import EdgeClient
from pipesd.transport import conn
from pipesd.transport import messages as M
from pipesd.transport.codec import encode

from runtime_helpers import reference_greedy, running_server, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def server(pair):
    with running_server(pair[1], auth_token="tok", max_draft_in_flight=64) as s:
        yield s


def _port(url):
    return int(url.rsplit(":", 1)[1])


def _open(c, sid, prompt):
    c.send(M.OpenSession(session_id=sid, prompt_ids=np.array(prompt, np.int32), max_new_tokens=32))
    msg = c.recv(10)
    assert isinstance(msg, M.SessionOpened), msg
    return msg


def _batch(sid, epoch, first, toks, verify=True):
    return M.DraftBatch(session_id=sid, epoch=epoch, first_pos=first, tokens=np.array(toks, np.int32),
                        probs=np.full(len(toks), 0.9, np.float32), verify=verify)


def test_wrong_token_refused(server):
    srv, url = server
    with pytest.raises(ConnectionError, match="authentication"):
        conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token="bad")


def test_stale_epoch_batches_are_dropped(pair, server):
    srv, url = server
    ref = reference_greedy(pair[2], [1, 2, 3], 6)
    c = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token="tok")
    _open(c, 1, [1, 2, 3])
    wrong = (ref[0] + 1) % 48
    c.send(_batch(1, 0, 0, [wrong, 5]))
    v = c.recv(10)
    assert isinstance(v, M.Verdict) and v.accepted == 0 and v.token == ref[0] and v.rejected
    stale_before = srv.stats.stale_batches
    c.send(_batch(1, 0, 2, [7, 8]))  # built on the rejected token: old epoch
    c.send(_batch(1, 1, 1, [ref[1], ref[2]]))  # the corrected stream
    v = c.recv(10)
    assert isinstance(v, M.Verdict) and v.epoch == 1 and v.accepted == 2 and v.start_pos == 1
    assert srv.stats.stale_batches == stale_before + 1
    # A replayed (duplicate) batch is dropped too; a gap is an error for that session only.
    dup_before = srv.stats.duplicate_batches
    c.send(_batch(1, 1, 1, [ref[1], ref[2]]))
    c.send(_batch(1, 1, 9, [1]))
    e = c.recv(10)
    assert isinstance(e, M.Error) and "gap" in e.message
    assert srv.stats.duplicate_batches == dup_before + 1
    c.close()


@pytest.mark.parametrize("frame", [
    b"\x00\x00\x00\x05\x63garb",  # unknown type
    b"\x00\x00\x00\x02\x05\x00",  # truncated draft batch
    b"\xff\xff\xff\xff\x05",  # absurd length
], ids=["unknown-type", "truncated", "huge-length"])
def test_malformed_frames_close_only_that_connection(pair, server, frame):
    srv, url = server
    c = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token="tok")
    c.sock.sendall(frame)
    msg = c.recv(10)
    assert isinstance(msg, M.Error)
    c.close()
    # The server keeps serving others, exactly.
    with EdgeClient(url, pair[0], auth_token="tok") as e:
        assert e.generate([1, 2, 3], 6).token_ids == reference_greedy(pair[2], [1, 2, 3], 6)


def test_hostile_fields_get_an_error_frame(server):
    srv, url = server
    c = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token="tok")
    c.send(M.OpenSession(session_id=5, prompt_ids=np.array([1, 999], np.int32)))  # token outside the vocabulary
    assert isinstance(c.recv(10), M.Error)
    _open(c, 6, [1, 2])
    c.send(_batch(6, 0, 0, [12345]))  # draft id outside the vocabulary
    assert isinstance(c.recv(10), M.Error)
    c.send(_batch(77, 0, 0, [1]))  # unknown session
    e = c.recv(10)
    assert isinstance(e, M.Error) and e.code == M.E_UNKNOWN_SESSION
    _open(c, 8, [1, 2])
    c.send(_batch(8, 0, 0, [1] * 65, verify=False))  # more drafts in flight than allowed
    assert isinstance(c.recv(10), M.Error)
    c.close()


def test_sessions_are_bound_to_their_connection(server):
    srv, url = server
    a = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token="tok")
    b = conn.EdgeConnection.connect("127.0.0.1", _port(url), auth_token="tok")
    _open(a, 1, [1, 2])
    b.send(_batch(1, 0, 0, [3]))  # b does not own a's session 1
    e = b.recv(10)
    assert isinstance(e, M.Error) and e.code == M.E_UNKNOWN_SESSION
    a.close()
    b.close()


def test_client_vanishing_mid_batch_frees_its_sessions(pair, server):
    srv, url = server
    open_before = srv.stats.sessions_open
    s = socket.create_connection(("127.0.0.1", _port(url)))
    s.sendall(encode(M.Hello(version=M.PROTOCOL_VERSION, auth_token="tok", client_name="")))
    s.recv(4096)
    s.sendall(encode(M.OpenSession(session_id=1, prompt_ids=np.array([1, 2], np.int32))))
    time.sleep(0.2)
    frame = encode(_batch(1, 0, 0, [1, 2, 3, 4]))
    s.sendall(frame[: len(frame) // 2])  # half a frame, then gone
    s.close()
    deadline = time.monotonic() + 10
    while srv.stats.sessions_open > open_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.stats.sessions_open == open_before
    with EdgeClient(url, pair[0], auth_token="tok") as e:
        assert e.generate([1, 2, 3], 6).token_ids == reference_greedy(pair[2], [1, 2, 3], 6)
