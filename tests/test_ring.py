"""The native SPSC ring: order, no loss or duplication across threads, epochs, edges."""
from __future__ import annotations

import threading

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
            pass
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
