"""Workloads shared by the pytest-benchmark suite (``test_bench_*.py``) and ``run.py``.

Every Python-thread transfer moves the same records (position, token, prob) from a producer
thread to a consumer thread, bounded at ``CAPACITY`` in flight, and checks that all arrived
in order. Producers back off with ``time.sleep(0)`` when the container is full (the ring's
documented usage; ``queue.Queue`` blocks by itself).
"""
from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np

from pipesd import _native
from pipesd.ring import TokenRing
from pipesd.scheduling import plan_batches, plan_batches_reference

CAPACITY = 4096
BATCH = 256
PLAN_COSTS = (0.01, 0.004, 0.0005)  # g, s, c: a link-bound-ish edge, many batches in the plan


# ----------------------------------------------------------------------------- scheduler
def plan_native(n: int):
    return plan_batches(n, *PLAN_COSTS)


def plan_reference(n: int):
    return plan_batches_reference(n, *PLAN_COSTS)


def plan_core_seconds(n: int, reps: int) -> float:
    """The C++ planner alone, timed in C++ (no Python call overhead)."""
    return _native.plan_timing(n, *PLAN_COSTS, reps)


# ----------------------------------------------------------------------------- ring, C++ threads
def ring_cpp(n_records: int, capacity: int = 1024, topk: int = 0, batch: int = BATCH) -> float:
    """Records/s from a producer std::thread to a consumer std::thread (checked)."""
    r = _native.ring_selftest(n_records, capacity, topk, batch, 0)
    assert r["ok"], r["first_error"]
    return r["records_per_s"]


# ----------------------------------------------------------------------------- Python threads
def _run(producer, consumer) -> float:
    got: list = []
    t = threading.Thread(target=lambda: got.append(consumer()))
    t0 = time.perf_counter()
    t.start()
    n = producer()
    t.join()
    dt = time.perf_counter() - t0
    assert got[0] == n, (got[0], n)
    return n / dt


def ring_python(n: int, topk: int = 0) -> float:
    ring = TokenRing(CAPACITY, topk)
    ids = np.arange(topk, dtype=np.int32) if topk else None
    probs = np.full(topk, 1.0 / topk, dtype=np.float32) if topk else None

    def producer():
        push = ring.push
        sleep = time.sleep
        for i in range(n):
            while not push(i, i, 0.5, ids, probs):
                sleep(0)
        ring.close()
        return n

    def consumer():
        count, expect = 0, 0
        pop = ring.pop_batch
        while (b := pop(BATCH, 1.0)) is not None:
            k = len(b)
            if k:
                assert b.position[0] == expect
                expect += k
                count += k
        return count

    return _run(producer, consumer)


_END = object()


def queue_single(n: int) -> float:
    q: queue.Queue = queue.Queue(maxsize=CAPACITY)

    def producer():
        put = q.put
        for i in range(n):
            put((i, i, 0.5))
        put(_END)
        return n

    def consumer():
        count = 0
        get = q.get
        while (x := get()) is not _END:
            assert x[0] == count
            count += 1
        return count

    return _run(producer, consumer)


def queue_batched(n: int) -> float:
    """queue.Queue, consumer takes one blocking get then up to BATCH-1 get_nowait."""
    q: queue.Queue = queue.Queue(maxsize=CAPACITY)

    def producer():
        put = q.put
        for i in range(n):
            put((i, i, 0.5))
        put(_END)
        return n

    def consumer():
        count = 0
        get, get_nowait = q.get, q.get_nowait
        while True:
            items = [get()]
            try:
                for _ in range(BATCH - 1):
                    items.append(get_nowait())
            except queue.Empty:
                pass
            for x in items:
                if x is _END:
                    return count
                assert x[0] == count
                count += 1

    return _run(producer, consumer)


def deque_condition(n: int) -> float:
    """collections.deque + threading.Condition, bounded, batch pops, notify only on edges."""
    d: collections.deque = collections.deque()
    cv = threading.Condition()
    state = {"closed": False}

    def producer():
        for i in range(n):
            with cv:
                while len(d) >= CAPACITY:
                    cv.wait()
                was_empty = not d
                d.append((i, i, 0.5))
                if was_empty:
                    cv.notify_all()
        with cv:
            state["closed"] = True
            cv.notify_all()
        return n

    def consumer():
        count = 0
        while True:
            with cv:
                while not d and not state["closed"]:
                    cv.wait()
                if not d:
                    return count
                was_full = len(d) >= CAPACITY
                k = min(BATCH, len(d))
                items = [d.popleft() for _ in range(k)]
                if was_full:
                    cv.notify_all()
            for x in items:
                assert x[0] == count
                count += 1

    return _run(producer, consumer)


PYTHON_TRANSFERS = {
    "ring (pop_batch)": ring_python,
    "queue.Queue (get)": queue_single,
    "queue.Queue (batched get)": queue_batched,
    "deque+Condition (batch pop)": deque_condition,
}
