"""The native SPSC ring: order, no loss or duplication across threads, epochs, edges."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipesd import _native
from pipesd.ring import TokenRing


def test_cpp_threads_millions_of_records_in_order():
    r = _native.ring_selftest(2_000_000, 1024, 0)
    assert r["ok"] and r["delivered"] == 2_000_000 and r["errors"] == 0
    r = _native.ring_selftest(300_000, 64, 8)  # with top-k payloads, small ring: constant wrap-around
    assert r["ok"] and r["delivered"] == 300_000 and r["errors"] == 0


def test_python_threads_order_nothing_lost_or_duplicated():
    ring = TokenRing(256, 4)
    n = 200_000
    got = []

    def consumer():
        while True:
            b = ring.pop_batch(128, 1.0)
            if b is None:
                return
            got.append(b.position.copy())
            assert (b.token == (b.position * 3) % 1000).all()
            assert (b.topk_ids[:, 0] == b.position % 7).all()

    t = threading.Thread(target=consumer)
    t.start()
    ids = np.zeros(1, dtype=np.int32)
    probs = np.ones(1, dtype=np.float32)
    for i in range(n):
        ids[0] = i % 7
        while not ring.push(i, (i * 3) % 1000, 0.5, ids, probs):
            time.sleep(0)  # full: let the consumer have the GIL (a bare spin convoys on it)
    ring.close()
    t.join(30)
    assert not t.is_alive()
    allpos = np.concatenate(got)
    assert len(allpos) == n
    assert (allpos == np.arange(n)).all()


def test_full_and_empty_edges_and_wraparound():
    ring = TokenRing(4, 2)
    assert ring.try_pop() is None
    assert len(ring.pop_batch(8, 0.0)) == 0  # timeout: an empty batch, not None
    for i in range(4):
        assert ring.push(i, i, 0.9)
    assert not ring.push(4, 4, 0.9)  # full: False, never blocks
    assert len(ring) == 4
    b = ring.pop_batch(3, 0.1)
    assert b.position.tolist() == [0, 1, 2]
    for i in range(4, 7):  # wraps around the end of the storage
        assert ring.push(i, i, 0.9, np.array([i, i + 1], np.int32), np.array([0.7, 0.3], np.float32))
    b = ring.pop_batch(10, 0.1)
    assert b.position.tolist() == [3, 4, 5, 6]
    assert b.topk_count.tolist() == [0, 2, 2, 2]
    assert b.topk_ids[1].tolist() == [4, 5] and b.topk_ids[0].tolist() == [0, 0]
    np.testing.assert_allclose(b.topk_probs[3], [0.7, 0.3])


def test_epoch_bump_drops_stale_records():
    ring = TokenRing(16, 0)
    for i in range(5):
        ring.push(i, i, 0.5)
    assert ring.bump_epoch() == 1 and ring.epoch == 1
    ring.push(3, 33, 0.5)
    b = ring.pop_batch(16, 0.1)
    assert b.position.tolist() == [3] and b.token.tolist() == [33] and b.epoch.tolist() == [1]


def test_close_wakes_a_blocked_consumer():
    ring = TokenRing(8, 0)
    out = []
    t = threading.Thread(target=lambda: out.append(ring.pop_batch(4, 30.0)))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # blocked (without the GIL: this thread keeps running)
    ring.close()
    t.join(5)
    assert not t.is_alive() and out == [None]
    assert not ring.push(0, 0, 0.5)  # closed: pushes refused


def test_records_left_at_close_are_drained_first():
    ring = TokenRing(8, 0)
    ring.push(0, 1, 0.5)
    ring.close()
    assert ring.pop_batch(4, 0.1).position.tolist() == [0]
    assert ring.pop_batch(4, 0.1) is None


@pytest.mark.parametrize("cap", [0, 1, 3, 6, 100])
def test_capacity_must_be_power_of_two(cap):
    with pytest.raises(ValueError, match="capacity"):
        TokenRing(cap, 0)


def test_topk_validation():
    with pytest.raises(ValueError, match="topk_max"):
        TokenRing(8, 300)
    ring = TokenRing(8, 2)
    with pytest.raises(ValueError, match="topk_max"):
        ring.push(0, 0, 0.5, np.zeros(3, np.int32), np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        ring.push(0, 0, 0.5, np.zeros(2, np.int32), None)


# ----------------------------------------------------------------------------- more ring checks
import math  # noqa: E402

from pipesd.ring import MAX_RING_CAPACITY, TokenBatch, TokenRecord  # noqa: E402


@pytest.mark.parametrize("cap,topk,batch,bump", [(2, 0, 1, 0), (16, 3, 256, 997), (4, 64, 3, 13), (1024, 8, 256, 0)])
def test_cpp_threads_edge_configurations(cap, topk, batch, bump):
    # Tiny rings (constant full/empty transitions), top-k padding, epoch bumps mid-stream.
    r = _native.ring_selftest(200_000, cap, topk, batch, bump)
    assert r["ok"], r["first_error"]
    assert r["delivered"] + r["dropped"] == 200_000
    if bump == 0:
        assert r["delivered"] == 200_000 and r["dropped"] == 0


def test_python_threads_with_epoch_bumps():
    ring = TokenRing(64, 2)
    n, every = 60_000, 1000
    got_pos, got_epoch = [], []

    def consumer():
        while (b := ring.pop_batch(256, 1.0)) is not None:
            got_pos.append(b.position.copy())
            got_epoch.append(b.epoch.copy())

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(n):
        while not ring.push(i, i, 0.5, [i, i + 1], [0.5, 0.25]):
            time.sleep(0)
        if (i + 1) % every == 0:
            ring.bump_epoch()
    ring.close()
    t.join(30)
    assert not t.is_alive()
    pos, ep = np.concatenate(got_pos), np.concatenate(got_epoch)
    assert (np.diff(pos) > 0).all()  # order kept, nothing duplicated
    assert (ep == pos // every).all()  # each record carries the epoch it was pushed in
    assert len(pos) + ring.stale_dropped == n  # nothing lost: delivered or dropped as stale


def test_try_pop_record_and_batch_layout():
    ring = TokenRing(8, 3)
    assert ring.push(7, 42, 0.25, [5, 6], [0.5, 0.125])
    rec = ring.try_pop()
    assert isinstance(rec, TokenRecord)
    assert (rec.position, rec.token, rec.prob, rec.epoch) == (7, 42, 0.25, 0)
    assert rec.topk_ids.tolist() == [5, 6] and rec.topk_probs.tolist() == [0.5, 0.125]
    ring.push(8, 43, 0.5)
    b = ring.pop_batch(4, 0.0)
    assert isinstance(b, TokenBatch) and len(b) == 1
    assert b.position.dtype == np.int64 and b.token.dtype == np.int32 and b.prob.dtype == np.float32
    assert b.epoch.dtype == np.uint32 and b.topk_count.dtype == np.int32
    assert b.topk_ids.shape == (1, 3) and b.topk_ids.dtype == np.int32
    assert b.topk_probs.shape == (1, 3) and b.topk_probs.dtype == np.float32
    empty = ring.pop_batch(4, 0.0)
    assert len(empty) == 0 and empty.topk_ids.shape == (0, 3)


def test_pop_batch_takes_what_is_there_up_to_max_n():
    ring = TokenRing(16, 0)
    for i in range(5):
        ring.push(i, i, 0.5)
    assert ring.pop_batch(3, math.inf).position.tolist() == [0, 1, 2]  # data ready: no wait
    assert ring.pop_batch(100, 60.0).position.tolist() == [3, 4]  # fewer than max_n: returns at once
    assert len(ring) == 0


def test_blocked_pop_batch_returns_when_one_record_arrives():
    ring = TokenRing(16, 0)
    out = []
    t = threading.Thread(target=lambda: out.append(ring.pop_batch(10, 60.0)))
    t.start()
    t.join(0.05)
    ring.push(1, 2, 0.5)
    t.join(10)  # liveness bound, not a timing check: it must not wait for max_n or the timeout
    assert not t.is_alive()
    assert out[0].position.tolist() == [1]


def test_pop_batch_releases_the_gil():
    ring = TokenRing(8, 0)
    entered = threading.Event()
    out = []

    def consumer():
        entered.set()
        out.append(ring.pop_batch(1, 20.0))

    t = threading.Thread(target=consumer)
    t.start()
    entered.wait()
    count = 0
    for _ in range(200_000):  # pure-Python work: needs the GIL while the consumer waits
        count += 1
    assert t.is_alive()  # still inside pop_batch, yet this thread ran
    ring.close()
    t.join(10)
    assert not t.is_alive() and out == [None] and count == 200_000


def test_second_concurrent_consumer_is_refused():
    ring = TokenRing(8, 0)
    t = threading.Thread(target=lambda: ring.pop_batch(1, 20.0))
    t.start()
    refused = False
    for _ in range(2000):
        try:
            ring.try_pop()
        except RuntimeError as e:
            refused = "single-consumer" in str(e)
            break
        threading.Event().wait(0.001)
    ring.close()
    t.join(10)
    assert refused and not t.is_alive()


def test_epoch_property_bump_and_stale_counter():
    ring = TokenRing(8, 0)
    assert ring.epoch == 0
    for i in range(3):
        ring.push(i, i, 0.5)
    assert ring.bump_epoch() == 1
    assert ring.bump_epoch() == 2 and ring.epoch == 2
    assert ring.try_pop() is None
    assert ring.stale_dropped == 3 and len(ring) == 0
    ring.push(9, 9, 0.5)
    assert ring.try_pop().epoch == 2


@pytest.mark.parametrize("cap", [-4, 2 * MAX_RING_CAPACITY, 2.0, "8", True, None])
def test_capacity_validation_more(cap):
    with pytest.raises(ValueError, match="capacity"):
        TokenRing(cap, 0)


@pytest.mark.parametrize("k", [-1, 257, 1.0, None])
def test_topk_max_bounds(k):
    with pytest.raises(ValueError, match="topk_max"):
        TokenRing(8, k)


def test_valid_extremes_and_properties():
    ring = TokenRing(2, 256)
    assert ring.capacity == 2 and ring.topk_max == 256 and len(ring) == 0 and not ring.closed
    ids = np.arange(256, dtype=np.int64)  # cast to int32 on push
    assert ring.push(0, 1, 0.5, ids, np.full(256, 1 / 256))
    assert ring.pop_batch(2, 0.0).topk_ids[0].tolist() == list(range(256))
    assert "TokenRing(capacity=2" in repr(ring)


def test_topk_argument_validation():
    ring = TokenRing(8, 2)
    with pytest.raises(ValueError, match="differ in length"):
        ring.push(0, 0, 0.5, [1, 2], [0.5])
    with pytest.raises(ValueError, match="together"):
        ring.push(0, 0, 0.5, None, [0.5])
    with pytest.raises(ValueError, match="1-D"):
        ring.push(0, 0, 0.5, np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32))
    assert ring.push(0, 0, 0.5, [], [])  # an empty top-k is fine
    assert len(ring) == 1
    k0 = TokenRing(8, 0)
    with pytest.raises(ValueError, match="topk_max"):
        k0.push(0, 0, 0.5, [1], [1.0])


@pytest.mark.parametrize("max_n,timeout", [(0, 0.1), (-1, 0.1), (1, -0.5), (1, math.nan)])
def test_pop_batch_argument_validation(max_n, timeout):
    ring = TokenRing(8, 0)
    with pytest.raises(ValueError):
        ring.pop_batch(max_n, timeout)


def test_push_after_close_is_refused_and_state_reported():
    ring = TokenRing(8, 0)
    ring.close()
    assert ring.closed
    assert not ring.push(1, 1, 0.5)
    assert ring.pop_batch(4, 0.0) is None
    assert ring.try_pop() is None
