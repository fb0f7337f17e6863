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
    """Order, epochs and flags survive two Python threads with rollbacks mid-stream."""
    ring = TokenRing(64, 2)
    n, every = 60_000, 1000
    got = []

    def consumer():
        while (b := ring.pop_batch(256, 1.0)) is not None:
            got.append((b.position.copy(), b.flags.copy(), b.epoch.copy()))

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(n):
        while not ring.push(i, i, 0.5, [i, i + 1], [0.5, 0.25], flags=(i * 2654435761) & 0xFFFFFFFF):
            time.sleep(0)
        if (i + 1) % every == 0:
            ring.bump_epoch()
    ring.close()
    t.join(30)
    assert not t.is_alive()
    pos, flags, ep = (np.concatenate([g[k] for g in got]) for k in range(3))
    assert (np.diff(pos) > 0).all()  # order kept, nothing duplicated
    assert (ep == pos // every).all()  # each record carries the epoch it was pushed in
    assert (flags == ((pos.astype(np.uint64) * 2654435761) & 0xFFFFFFFF).astype(np.uint32)).all()
    assert len(pos) + ring.stale_dropped == n


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
    assert b.epoch.dtype == np.uint32 and b.topk_count.dtype == np.int32 and b.flags.dtype == np.uint32
    assert b.flags.shape == (1,) and b.flags.tolist() == [0]
    assert b.topk_ids.shape == (1, 3) and b.topk_ids.dtype == np.int32
    assert b.topk_probs.shape == (1, 3) and b.topk_probs.dtype == np.float32
    empty = ring.pop_batch(4, 0.0)
    assert len(empty) == 0 and empty.topk_ids.shape == (0, 3)
    assert empty.flags.shape == (0,) and empty.flags.dtype == np.uint32


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


# ----------------------------------------------------------------------------------- flags
import pipesd.ring as ring_mod  # noqa: E402
from pipesd.ring import FLAG_HINT, FLAG_STOP, FLAG_VERIFY  # noqa: E402


def test_flag_constants():
    assert (FLAG_VERIFY, FLAG_STOP, FLAG_HINT) == (1, 2, 4)
    assert {"FLAG_VERIFY", "FLAG_STOP", "FLAG_HINT"} <= set(ring_mod.__all__)
    for name in ("FLAG_VERIFY", "FLAG_STOP", "FLAG_HINT"):
        assert name in ring_mod.__doc__


def test_flags_round_trip_try_pop_and_pop_batch():
    ring = TokenRing(16, 2)
    assert ring.push(0, 10, 0.5)  # no flags: 0
    assert ring.push(1, 11, 0.5, [7, 8], [0.75, 0.25], flags=FLAG_VERIFY)
    assert ring.push(2, 12, 0.5, None, None, FLAG_VERIFY | FLAG_STOP)  # 6th positional
    assert ring.push(3, 13, 0.5, flags=FLAG_HINT)
    assert ring.push(4, 14, 0.5, flags=2**32 - 1)  # every bit is carried
    assert ring.push(5, 15, 0.5, flags=np.uint32(FLAG_STOP))
    rec = ring.try_pop()
    assert rec.flags == 0 and rec.position == 0
    rec = ring.try_pop()
    assert isinstance(rec.flags, int) and rec.flags == FLAG_VERIFY
    pos, tok, prob, ep, ids, probs = rec[:6]  # leading fields unpack as before
    assert (pos, tok, prob, ep) == (1, 11, 0.5, 0) and ids.tolist() == [7, 8]
    assert rec[-1] == rec.flags
    b = ring.pop_batch(16, 0.0)
    assert b.position.tolist() == [2, 3, 4, 5]
    assert b.flags.dtype == np.uint32 and b.flags.shape == (4,)
    assert b.flags.tolist() == [FLAG_VERIFY | FLAG_STOP, FLAG_HINT, 2**32 - 1, FLAG_STOP]
    assert (b.flags & FLAG_VERIFY).astype(bool).tolist() == [True, False, True, False]


def test_flags_default_zero_everywhere():
    ring = TokenRing(8, 1)
    ring.push(0, 0, 0.5)
    ring.push(1, 1, 0.5, [3], [1.0])
    assert ring.try_pop().flags == 0
    assert ring.pop_batch(8, 0.0).flags.tolist() == [0]


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "1"])
def test_flags_out_of_range_refused(bad):
    ring = TokenRing(8, 0)
    with pytest.raises(TypeError):
        ring.push(0, 0, 0.5, flags=bad)
    assert len(ring) == 0  # nothing was pushed


def test_flags_survive_slot_reuse():
    ring = TokenRing(4, 0)
    for rnd in range(6):
        want = [(FLAG_VERIFY << (i % 3)) if rnd % 2 == 0 else 0 for i in range(4)]
        for i in range(4):
            assert ring.push(i, i, 0.5, flags=want[i])
        assert ring.pop_batch(4, 0.0).flags.tolist() == want  # no stale flags from the slot's last record


def test_stale_records_dropped_whatever_their_flags():
    ring = TokenRing(16, 0)
    ring.push(0, 0, 0.5)
    ring.push(1, 1, 0.5, flags=FLAG_VERIFY)
    ring.push(2, 2, 0.5, flags=FLAG_STOP | FLAG_VERIFY)
    ring.bump_epoch()
    ring.push(1, 7, 0.5, flags=FLAG_STOP)
    b = ring.pop_batch(16, 0.0)
    assert b.position.tolist() == [1] and b.token.tolist() == [7]
    assert b.flags.tolist() == [FLAG_STOP] and b.epoch.tolist() == [1]
    assert ring.stale_dropped == 3
    ring.push(3, 3, 0.5, flags=FLAG_VERIFY)
    ring.bump_epoch()
    assert ring.try_pop() is None and ring.stale_dropped == 4


def test_native_push_and_bound_pusher_agree():
    # TokenRing.push goes through _native.TokenRing.pusher() (a self-less callable: cheaper);
    # the plain method stays, with the same signature and checks.
    raw = _native.TokenRing(8, 2)
    p = raw.pusher()
    assert raw.push(0, 1, 0.5, [1, 2], [0.5, 0.5], FLAG_VERIFY)
    assert p(1, 2, 0.5, [3], [1.0], flags=FLAG_STOP)
    assert p(2, 3, 0.5)
    assert raw.push(3, 4, 0.5, flags=FLAG_HINT)
    for call in (raw.push, p):
        with pytest.raises(ValueError, match="together"):
            call(9, 9, 0.5, None, [0.5])
        with pytest.raises(ValueError, match="topk_max"):
            call(9, 9, 0.5, [1, 2, 3], [0.1, 0.1, 0.1])
        with pytest.raises(TypeError):
            call(9, 9, 0.5, flags=-1)
    b = TokenBatch(*raw.pop_batch(8, 0.0))
    assert b.position.tolist() == [0, 1, 2, 3]
    assert b.flags.tolist() == [FLAG_VERIFY, FLAG_STOP, 0, FLAG_HINT]
    assert b.topk_count.tolist() == [2, 1, 0, 0]


def test_bound_pusher_keeps_its_ring_alive():
    import gc

    p = _native.TokenRing(4, 0).pusher()  # the only reference to the ring is inside p
    gc.collect()
    assert p(5, 6, 0.5, flags=3)
    assert p(6, 7, 0.5)
    ring = TokenRing(4, 0)
    push = ring.push
    del ring
    gc.collect()
    assert push(1, 1, 0.5, flags=FLAG_VERIFY)  # bound method keeps wrapper and ring alive


# ------------------------------------------------------------------------- blocking wait
def test_blocked_consumer_sleeps_instead_of_spinning():
    # A property, not a benchmark: the consumer sleeps on a condition variable (woken by push
    # or close, each nap capped at 1 ms), so a ~0.3 s wait costs a tiny fraction of its wall
    # time in CPU (it used to spin/yield/nap at 2..200 us). The bound is generous on purpose.
    ring = TokenRing(8, 0)
    res = {}

    def consumer():
        w0, c0 = time.perf_counter(), time.thread_time()
        res["b"] = ring.pop_batch(4, 0.3)
        res["cpu"], res["wall"] = time.thread_time() - c0, time.perf_counter() - w0

    t = threading.Thread(target=consumer)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert len(res["b"]) == 0  # timed out: an empty batch
    assert res["wall"] >= 0.25
    assert res["cpu"] < 0.5 * res["wall"], res


def test_push_wakes_a_sleeping_consumer_well_before_its_timeout():
    ring = TokenRing(8, 0)
    res = {}

    def consumer():
        w0 = time.perf_counter()
        res["b"] = ring.pop_batch(4, 5.0)
        res["wall"] = time.perf_counter() - w0

    t = threading.Thread(target=consumer)
    t.start()
    time.sleep(0.05)  # the consumer is asleep by now
    assert ring.push(3, 4, 0.5, flags=FLAG_VERIFY)
    t.join(10)
    assert not t.is_alive()
    assert res["b"].position.tolist() == [3] and res["b"].flags.tolist() == [FLAG_VERIFY]
    assert res["wall"] < 2.0, res  # woken by the push, not by the 5 s timeout


def test_many_sleep_wake_cycles_lose_nothing():
    # Ping-pong across the sleep/wake handshake: each record is pushed while the consumer is
    # (about to be) asleep; every one must arrive, in order, and close must end the loop.
    ring = TokenRing(4, 0)
    n = 300
    got = []

    def consumer():
        while (b := ring.pop_batch(4, 5.0)) is not None:
            got.extend(b.position.tolist())

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(n):
        assert ring.push(i, i, 0.5)
        if i % 3 == 0:
            time.sleep(0.0005)
    ring.close()
    t.join(30)
    assert not t.is_alive()
    assert got == list(range(n))
