"""Placement policies on hand-built records: no state machine involved."""

from __future__ import annotations

from collections import Counter

import pytest

from shoal.scheduler.placement import LocalityPolicy, RandomPolicy
from shoal.scheduler.records import SchedulerTask, TaskState, WorkerRecord


def worker(wid: int, nthreads: int = 1, processing: int = 0) -> WorkerRecord:
    ws = WorkerRecord(wid, f"w{wid}", f"tcp://w{wid}", nthreads, 0, {}, 0.0)
    for i in range(processing):
        ws.processing.add(SchedulerTask(1000 * wid + i, f"busy-{wid}-{i}", None, (0, 0, 0)))
    return ws


_ids = iter(range(10**6))


def task(key="t", deps=()) -> SchedulerTask:
    ts = SchedulerTask(next(_ids), key, None, (0, 0, 0))
    ts.dependencies = list(deps)
    return ts


def held(key: str, nbytes: int, *holders: WorkerRecord) -> SchedulerTask:
    """A dependency in memory on ``holders``."""
    ts = task(key)
    ts.state = TaskState.MEMORY
    ts.nbytes = nbytes
    ts.who_has = set(holders)
    for ws in holders:
        ws.has_what.add(ts)
    return ts


# -- LocalityPolicy ---------------------------------------------------------------------------


def test_locality_root_task_goes_to_least_loaded_worker():
    w1, w2, w3 = worker(1, processing=3), worker(2, processing=1), worker(3, processing=2)
    assert LocalityPolicy().choose(task(), {w1, w2, w3}) is w2


def test_locality_load_is_relative_to_threads():
    busy_big = worker(1, nthreads=8, processing=4)  # load 0.5
    idle_small = worker(2, nthreads=1, processing=1)  # load 1.0
    assert LocalityPolicy().choose(task(), [idle_small, busy_big]) is busy_big


def test_locality_ties_break_on_lowest_worker_id_whatever_the_order():
    ws = [worker(i) for i in (5, 3, 9, 4)]
    pol = LocalityPolicy()
    for order in (ws, ws[::-1], sorted(ws, key=lambda w: w.wid)):
        assert pol.choose(task(), order).wid == 3
        assert pol.choose(task(), set(order)).wid == 3


def test_locality_prefers_holder_of_most_input_bytes():
    w1, w2, w3 = worker(1), worker(2), worker(3)
    small = held("small", 100, w1)
    big = held("big", 1000, w2)
    assert LocalityPolicy().choose(task("t", [small, big]), {w1, w2, w3}) is w2


def test_locality_sums_bytes_over_inputs():
    w1, w2 = worker(1), worker(2)
    deps = [held("a", 400, w1), held("b", 400, w1), held("c", 700, w2)]
    assert LocalityPolicy().choose(task("t", deps), [w1, w2]) is w1  # 800 > 700


def test_locality_replicated_input_counts_for_every_holder():
    w1, w2 = worker(1), worker(2, processing=5)
    shared = held("shared", 500, w1, w2)
    only2 = held("only2", 10, w2)
    # w2 holds 510 bytes of inputs, w1 500: bytes beat load
    assert LocalityPolicy().choose(task("t", [shared, only2]), [w1, w2]) is w2


def test_locality_equal_bytes_break_on_load_then_wid():
    w1, w2, w3 = worker(1, processing=2), worker(2), worker(3)
    deps = [held("a", 50, w1), held("b", 50, w2), held("c", 50, w3)]
    assert LocalityPolicy().choose(task("t", deps), [w1, w2, w3]) is w2
    w2.processing.add(task("x"))
    assert LocalityPolicy().choose(task("t", deps), [w1, w2, w3]) is w3


def test_locality_zero_byte_inputs_still_count():
    w1, w2 = worker(1, processing=4), worker(2)
    dep = held("empty", 0, w1)
    assert LocalityPolicy().choose(task("t", [dep]), [w1, w2]) is w1


def test_locality_ignores_holders_that_are_not_candidates():
    holder, w2, w3 = worker(1), worker(2, processing=1), worker(3)
    dep = held("a", 10**6, holder)
    assert LocalityPolicy().choose(task("t", [dep]), [w2, w3]) is w3


def test_locality_input_without_holders_falls_back_to_load():
    w1, w2 = worker(1, processing=1), worker(2)
    dep = task("gone")
    assert LocalityPolicy().choose(task("t", [dep]), [w1, w2]) is w2


@pytest.mark.parametrize("kind", ["set", "list", "dict_values", "generator", "frozenset"])
def test_locality_accepts_any_iterable_of_candidates(kind):
    w1, w2 = worker(1, processing=1), worker(2)
    dep = held("a", 10, w1)
    pools = {
        "set": lambda: {w1, w2},
        "list": lambda: [w1, w2],
        "dict_values": lambda: {1: w1, 2: w2}.values(),
        "generator": lambda: (w for w in (w1, w2)),
        "frozenset": lambda: frozenset((w1, w2)),
    }
    pol = LocalityPolicy()
    assert pol.choose(task("root"), pools[kind]()) is w2
    assert pol.choose(task("t", [dep]), pools[kind]()) is w1


def test_locality_does_not_change_its_inputs():
    w1, w2 = worker(1), worker(2, processing=2)
    dep = held("a", 10, w2)
    ts = task("t", [dep])
    cands = [w1, w2]
    before = (list(cands), set(dep.who_has), len(w1.processing), len(w2.processing), ts.state)
    LocalityPolicy().choose(ts, cands)
    assert (list(cands), set(dep.who_has), len(w1.processing), len(w2.processing), ts.state) == before


# -- RandomPolicy -------------------------------------------------------------------------------


def test_random_same_seed_same_choices():
    ws = [worker(i) for i in range(1, 9)]
    a, b = RandomPolicy(seed=42), RandomPolicy(seed=42)
    seq_a = [a.choose(task(), ws).wid for _ in range(50)]
    seq_b = [b.choose(task(), ws).wid for _ in range(50)]
    assert seq_a == seq_b


def test_random_different_seeds_differ():
    ws = [worker(i) for i in range(1, 9)]
    seqs = {tuple(RandomPolicy(seed=s).choose(task(), ws).wid for _ in range(30)) for s in range(5)}
    assert len(seqs) > 1


def test_random_is_independent_of_candidate_order():
    ws = [worker(i) for i in range(1, 9)]
    a, b = RandomPolicy(seed=7), RandomPolicy(seed=7)
    seq_a = [a.choose(task(), ws).wid for _ in range(30)]
    seq_b = [b.choose(task(), set(reversed(ws))).wid for _ in range(30)]
    assert seq_a == seq_b


def test_random_chooses_only_candidates_and_ignores_locality():
    holder = worker(1)
    others = [worker(i) for i in (2, 3, 4)]
    dep = held("a", 10**9, holder)
    pol = RandomPolicy(seed=0)
    picks = Counter(pol.choose(task("t", [dep]), others).wid for _ in range(300))
    assert set(picks) == {2, 3, 4}  # all of them, roughly uniformly, never the holder
    assert min(picks.values()) > 50


def test_random_single_candidate_and_empty_pool():
    w = worker(3)
    assert RandomPolicy().choose(task(), [w]) is w
    assert RandomPolicy().choose(task(), []) is None


def test_random_default_seed_is_reproducible():
    ws = [worker(i) for i in range(1, 6)]
    a, b = RandomPolicy(), RandomPolicy()
    assert [a.choose(task(), ws).wid for _ in range(20)] == [b.choose(task(), ws).wid for _ in range(20)]
