"""The continuation rule (protocol 2), scripted against a real server with raw frames.

Every full acceptance of [a, b) carries the target's token t_b. The edge's draft at b survives,
with everything after it, only if it equals t_b; otherwise both sides bump the epoch. These
tests script each way the server can learn which case it is in, and check that verdicts stay
the target's greedy tokens and epochs stay in step.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipesd.transport import conn
from pipesd.transport import messages as M

from runtime_helpers import reference_greedy, running_server, tiny_pair

PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def server(pair):
    with running_server(pair[1], max_draft_in_flight=64) as s:
        yield s


@pytest.fixture(scope="module")
def ref(pair):
    return reference_greedy(pair[2], PROMPT, 16)


def _batch(sid, epoch, first, toks, verify=False):
    return M.DraftBatch(session_id=sid, epoch=epoch, first_pos=first, tokens=np.array(toks, np.int32),
                        probs=np.full(len(toks), 0.9, np.float32), verify=verify)


class _Edge:
    def __init__(self, server, sid: int) -> None:
        srv, url = server
        self.srv, self.sid = srv, sid
        self.c = conn.EdgeConnection.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.c.send(M.OpenSession(session_id=sid, prompt_ids=np.array(PROMPT, np.int32), max_new_tokens=16))
        assert isinstance(self.c.recv(10), M.SessionOpened)

    def send(self, epoch, first, toks, verify=False):
        self.c.send(_batch(self.sid, epoch, first, toks, verify))

    def verdict(self) -> M.Verdict:
        v = self.c.recv(10)
        assert isinstance(v, M.Verdict), v
        return v

    def close(self):
        self.c.close()


def _wrong(t: int) -> int:
    return (t + 1) % 48


def test_full_acceptance_carries_the_bonus(server, ref):
    e = _Edge(server, 1)
    e.send(0, 0, ref[0:3], verify=True)
    v = e.verdict()
    assert (v.start_pos, v.end_pos, v.accepted, v.rejected) == (0, 3, 3, False)
    assert v.token == ref[3] and v.verified_len == 4
    e.close()


def test_matching_pending_draft_keeps_the_epoch(server, ref):
    e = _Edge(server, 3)
    e.send(0, 0, ref[0:3], verify=True)
    # The draft at the bonus position and past it: pending when the verdict is applied, or
    # arriving just after it (then trimmed on arrival); either way the outcome is the same.
    e.send(0, 3, ref[3:6], verify=False)
    v = e.verdict()
    assert v.accepted == 3 and v.token == ref[3] and v.epoch == 0
    assert v.settled in (M.SETTLED_KEPT, M.SETTLED_NONE)  # pending (kept) or not yet arrived
    # Same epoch: the drafts past the bonus survive and verify in epoch 0.
    e.send(0, 6, ref[6:8], verify=True)
    v2 = e.verdict()
    assert v2.epoch == 0 and v2.start_pos == 4 and v2.accepted == 4 and v2.token == ref[8]
    e.close()


def test_mismatching_pending_draft_moves_the_epoch(server, ref):
    e = _Edge(server, 5)
    e.send(0, 0, ref[0:3], verify=True)
    e.send(0, 3, [_wrong(ref[3]), 5, 6])
    v = e.verdict()
    assert v.accepted == 3 and v.token == ref[3] and not v.rejected
    assert v.settled in (M.SETTLED_VOID, M.SETTLED_NONE)  # pending (void) or not yet arrived
    stale = server[0].stats.stale_batches
    e.send(0, 6, [7], verify=True)  # old epoch: dropped (whichever way the server learned)
    e.send(1, 4, ref[4:6], verify=True)  # the edge's next epoch, from after the bonus
    v2 = e.verdict()
    assert v2.epoch == 1 and v2.start_pos == 4 and v2.accepted == 2 and v2.token == ref[6]
    assert server[0].stats.stale_batches > stale
    e.close()


def test_late_matching_draft_is_trimmed(server, ref):
    """The verdict finds nothing pending; the edge's matching draft at b arrives later."""
    e = _Edge(server, 6)
    e.send(0, 0, ref[0:2], verify=True)
    v = e.verdict()
    assert v.token == ref[2] and v.verified_len == 3 and v.settled == M.SETTLED_NONE
    e.send(0, 2, ref[2:5], verify=True)  # starts at the bonus position, equal to it
    v2 = e.verdict()
    assert (v2.epoch, v2.start_pos, v2.end_pos, v2.accepted) == (0, 3, 5, 2) and v2.token == ref[5]
    e.close()


def test_late_mismatching_draft_moves_the_epoch(server, ref):
    e = _Edge(server, 7)
    e.send(0, 0, ref[0:2], verify=True)
    assert e.verdict().token == ref[2]
    e.send(0, 2, [_wrong(ref[2]), 9], verify=True)  # differs from the bonus: void
    e.send(0, 4, [1], verify=True)  # and everything after it in that epoch
    e.send(1, 3, ref[3:5], verify=True)
    v = e.verdict()
    assert (v.epoch, v.start_pos, v.accepted) == (1, 3, 2) and v.token == ref[5]
    e.close()


def test_next_epoch_from_the_edge_is_adopted(server, ref):
    """The edge saw the mismatch itself and never sent its draft at b."""
    e = _Edge(server, 8)
    e.send(0, 0, ref[0:2], verify=True)
    assert e.verdict().token == ref[2]
    e.send(1, 3, ref[3:6], verify=True)
    v = e.verdict()
    assert (v.epoch, v.start_pos, v.accepted) == (1, 3, 3) and v.token == ref[6]
    e.close()


def test_no_draft_at_bonus_continues_in_the_epoch(server, ref):
    """The edge had not drafted b (or dropped its matching draft unsent)."""
    e = _Edge(server, 9)
    e.send(0, 0, ref[0:2], verify=True)
    assert e.verdict().token == ref[2]
    e.send(0, 3, ref[3:5], verify=True)
    v = e.verdict()
    assert (v.epoch, v.start_pos, v.accepted) == (0, 3, 2) and v.token == ref[5]
    # An epoch the edge could not have reached is still an error for that session.
    e.send(5, 6, [1], verify=True)
    err = e.c.recv(10)
    assert isinstance(err, M.Error) and "ahead" in err.message
    e.close()


def test_nothing_verified_while_the_bonus_is_unconfirmed(server, ref):
    """An empty verify request while the check is open would answer into an epoch the edge
    may have left; the server answers only after the next batch settles it."""
    e = _Edge(server, 10)
    e.send(0, 0, ref[0:2], verify=True)
    assert e.verdict().token == ref[2]
    # A replay of the empty request at the old position: a duplicate, no verdict.
    e.c.send(M.DraftBatch(session_id=10, epoch=0, first_pos=2, tokens=np.zeros(0, np.int32),
                          probs=np.zeros(0, np.float32), verify=True))
    assert e.c.recv(0.5) is None
    e.send(0, 3, [], verify=True)  # target-per-token style: "give me the next one"
    v = e.verdict()
    assert (v.epoch, v.start_pos, v.accepted, v.token) == (0, 3, 0, ref[3])
    e.close()


# --------------------------------------------------------------------------- hints
def test_hint_codec_round_trip_and_errors():
    from pipesd.transport import codec

    m = M.DraftBatch(session_id=1, epoch=0, first_pos=5, tokens=np.array([3, 4, 5], np.int32),
                     probs=np.full(3, 0.5, np.float32), verify=True, q_ids=np.array([[1, 2], [3, 4]], np.int32),
                     q_probs=np.array([[0.5, 0.5], [0.25, 0.75]], np.float32), sent_at=1.0, hint=True)
    data = codec.encode(m)
    (back,) = codec.FrameReader().feed(data)
    assert back.hint and back.tokens.tolist() == [3, 4, 5] and back.q_ids.shape == (2, 2)
    with pytest.raises(ValueError, match="n-hint=2"):  # a hint's q has one row fewer than tokens
        codec.encode(M.DraftBatch(session_id=1, epoch=0, first_pos=5, tokens=np.array([3, 4, 5], np.int32),
                                  probs=np.full(3, 0.5, np.float32), q_ids=np.zeros((3, 2), np.int32),
                                  q_probs=np.full((3, 2), 0.5, np.float32), hint=True))
    with pytest.raises(ValueError, match="with flag hint, n must be >= 1"):
        codec.encode(M.DraftBatch(session_id=1, epoch=0, first_pos=5, tokens=np.zeros(0, np.int32),
                                  probs=np.zeros(0, np.float32), hint=True))
    # A hint-only frame with a dense q (no rows) decodes without allocating rows.
    one = codec.encode(M.DraftBatch(session_id=1, epoch=0, first_pos=5, tokens=np.array([3], np.int32),
                                    probs=np.full(1, 0.5, np.float32), hint=True))
    assert codec.FrameReader().feed(one)[0].hint


def test_greedy_hint_is_compared_with_the_bonus(server, ref):
    e = _Edge(server, 11)
    e.send(0, 0, ref[0:2], verify=True)
    v1 = e.verdict()
    assert v1.token == ref[2] and v1.epoch == 0
    # The draft at the bonus position as a hint (no q), then more drafts: kept when it matches.
    e.c.send(M.DraftBatch(session_id=11, epoch=0, first_pos=2, tokens=np.array(ref[2:5], np.int32),
                          probs=np.full(3, 0.9, np.float32), verify=True, hint=True))
    v2 = e.verdict()
    assert (v2.epoch, v2.start_pos, v2.end_pos, v2.accepted, v2.token) == (0, 3, 5, 2, ref[5])
    # A hint that differs from the bonus at 5 voids itself and what follows it: no verdict for
    # that batch, and the edge's next epoch goes on from 6.
    e.c.send(M.DraftBatch(session_id=11, epoch=0, first_pos=5, tokens=np.array([_wrong(ref[5]), 1, 2], np.int32),
                          probs=np.full(3, 0.9, np.float32), verify=True, hint=True))
    e.send(1, 6, ref[6:8], verify=True)
    v3 = e.verdict()
    assert (v3.epoch, v3.start_pos, v3.accepted, v3.token) == (1, 6, 2, ref[8])
    e.close()


def test_a_hint_is_never_verified_across(server, ref):
    """Requests that arrive together still stop at a hint: its bonus settles it, one verdict each."""
    srv, url = server
    c = conn.EdgeConnection.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
    c.send(M.OpenSession(session_id=13, prompt_ids=np.array(PROMPT, np.int32), temperature=1.0, seed=3,
                         max_new_tokens=16))
    assert isinstance(c.recv(10), M.SessionOpened)
    q1 = (np.array([[1, 2]], np.int32), np.array([[0.5, 0.5]], np.float32))
    c.send(M.DraftBatch(session_id=13, epoch=0, first_pos=0, tokens=np.array([1], np.int32),
                        probs=np.full(1, 0.5, np.float32), verify=True, q_ids=q1[0], q_probs=q1[1]))
    c.send(M.DraftBatch(session_id=13, epoch=0, first_pos=1, tokens=np.array([2], np.int32),
                        probs=np.full(1, 0.5, np.float32), verify=True, hint=True))
    v1 = c.recv(10)
    assert isinstance(v1, M.Verdict) and v1.start_pos == 0 and v1.end_pos <= 1  # never across the hint at 1
    c.close()
