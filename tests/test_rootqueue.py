"""The root-task queue pops exactly in priority order, whatever order entries arrive in."""

from __future__ import annotations

import heapq
import random

from shoal.scheduler.rootqueue import RootQueue


def drain(q, n):
    return [q.pop() for _ in range(n)]


def test_pops_in_priority_order_for_mixed_arrivals():
    rng = random.Random(1)
    q, ref = RootQueue(), []
    n = 0
    task = object()
    for step in range(3000):
        if rng.random() < 0.6 or not ref:
            # Mostly in order (a map), sometimes more urgent, sometimes a put-back.
            n += 1
            p = (0 if rng.random() < 0.9 else -1, n if rng.random() < 0.8 else rng.randrange(n), step)
            q.push(*p, task)
            heapq.heappush(ref, p)
        else:
            assert q.pop()[:3] == heapq.heappop(ref)
        assert len(q) == len(ref) and bool(q) == bool(ref)
    while ref:
        assert q.pop()[:3] == heapq.heappop(ref)
    assert not q and len(q) == 0


def test_runs_in_either_order_stay_out_of_the_heap():
    q = RootQueue()
    for i in reversed(range(100)):  # as transitions make a graph part ready
        q.push(0, 1, i, None)
    assert q.pop()[:3] == (0, 1, 0)
    for i in reversed(range(100)):  # the next part
        q.push(0, 2, i, None)
    assert [e[:3] for e in drain(q, 99)] == [(0, 1, i) for i in range(1, 100)]
    assert not q._heap
    q.push(-1, 3, 0, None)  # a more urgent graph: the heap
    assert q.pop()[:3] == (-1, 3, 0)
    assert [e[2] for e in drain(q, 100)] == list(range(100))


def test_the_same_task_queued_twice_never_compares_tasks():
    class Task:  # not orderable
        pass

    t = Task()
    q = RootQueue()
    q.push(0, 1, 5, t)
    q.push(0, 1, 5, t)  # put back while a stale entry is still queued
    q.push(0, 1, 5, t)
    assert [e[-1] for e in drain(q, 3)] == [t, t, t]
