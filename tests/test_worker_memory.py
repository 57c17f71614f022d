"""Memory on a worker, without sockets: the budget and residency bookkeeping
(``worker/memory.py``), the core's spill / pause / busy decisions
(``WorkerState``), and the store that carries them out on disk
(``worker/store.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from shoal.errors import SerializationError
from shoal.protocol import messages as m
from shoal.protocol.serialize import deserialize
from shoal.worker.memory import MemoryLimits, Residency
from shoal.worker.state import (
    BUSY_RETRY_FIRST,
    BUSY_RETRY_MAX,
    FETCH,
    MEMORY,
    FetchBusy,
    FetchSucceeded,
    MemorySampled,
    PeerRetry,
    SchedulerSent,
    SpillFailed,
    TaskCompleted,
    WorkerState,
)
from shoal.worker.store import DataStore, purge_stale_spill, spill_directory
from test_worker_state import PEERS, execute, fetches, run_ids, sched

MB = 10**6


def make_state(nthreads=1, **limits) -> WorkerState:
    limits.setdefault("limit", 1000 * MB)
    ws = WorkerState(nthreads, memory=MemoryLimits(**limits), validate=True)
    ws.handle([SchedulerSent([m.WorkerWelcome(0, [m.PeerInfo(w, a) for w, a in PEERS.items()])])])
    return ws


def compute(ws, tid, nbytes, deps=()):
    """Assign ``tid`` and finish it with a result of ``nbytes``; return the last commands."""
    sched(ws, execute(tid, deps=deps))
    return ws.handle([TaskCompleted(tid, nbytes)])


def of_type(cmds, typ) -> list:
    return [x for x in cmds.to_scheduler if isinstance(x, typ)]


# -- budget and residency ----------------------------------------------------------------


def test_limits_in_bytes_and_off_switches():
    lim = MemoryLimits(1000, target=0.6, spill=0.7, pause=0.8, terminate=0)
    assert (lim.bytes(lim.target), lim.bytes(lim.pause), lim.bytes(lim.terminate)) == (600, 800, None)
    assert MemoryLimits(0).bytes(0.6) is None  # no limit: nothing applies
    with pytest.raises(ValueError, match="pause"):
        MemoryLimits(1000, pause=1.5)


def test_residency_evicts_least_recently_used_first():
    r = Residency()
    for i, size in enumerate([10, 20, 30, 40]):
        r.add(i, size)
    assert r.touch(0) is False  # used: now the most recent
    assert r.evict(25) == [1, 2]  # 20 + 30 >= 25, oldest first
    assert (r.fast_bytes, r.slow_bytes, r.spilled_total, r.spilled_count) == (50, 50, 50, 2)
    assert r.touch(2) is True  # back from disk, most recent
    assert r.evict(1) == [3]
    r.remove(0)
    r.remove(1)
    assert dict(r.fast) == {2: 30} and r.slow == {3: 40}
    r.check()


def test_residency_pins_what_cannot_be_written():
    r = Residency()
    r.add(1, 10)
    r.add(2, 10)
    assert r.evict(5) == [1]
    r.pin(1)
    assert r.evict(100) == [2]  # the pinned value is never chosen again
    assert r.pinned == {1: 10} and r.fast_bytes == 10 and r.spilled_count == 1
    r.remove(1)
    assert r.fast_bytes == 0
    r.check()


# -- the core's spilling -------------------------------------------------------------------


def test_results_past_the_target_are_spilled_least_recently_used_first():
    ws = make_state(limit=100 * MB, target=0.5)  # 50 MB in memory at most
    assert not compute(ws, 1, 20 * MB).spill
    assert not compute(ws, 2, 20 * MB).spill
    cmds = compute(ws, 3, 20 * MB)
    assert cmds.spill == {1}  # the oldest goes
    assert ws.residency.fast_bytes == 40 * MB and ws.residency.slow_bytes == 20 * MB
    # Every value is still held; only where differs.
    assert ws.nbytes == 60 * MB and all(ws.tasks[i].state is MEMORY for i in (1, 2, 3))


def test_a_spilled_input_is_read_back_when_its_task_starts():
    ws = make_state(limit=100 * MB, target=0.5)
    for i in (1, 2, 3):
        compute(ws, i, 20 * MB)
    cmds = sched(ws, execute(4, deps=[1]))
    assert run_ids(cmds) == [4]
    assert cmds.unspill == {1}
    # Room is made for it: the least recently used value now goes instead.
    assert cmds.spill == {2}
    assert list(ws.residency.fast) == [3, 1]


def test_an_input_evicted_and_needed_in_one_call_never_leaves_memory():
    ws = make_state(limit=100 * MB, target=0.5)
    compute(ws, 1, 20 * MB)
    compute(ws, 2, 20 * MB)
    # 3 finishes (1 is now over the target) and 4, which reads 1, starts: net, 1 stays.
    sched(ws, execute(3))
    cmds = ws.handle([TaskCompleted(3, 20 * MB), SchedulerSent([execute(4, deps=[1])])])
    assert run_ids(cmds) == [4]
    assert 1 not in cmds.spill and 1 not in cmds.unspill
    assert cmds.spill == {2}


def test_process_memory_past_the_spill_fraction_spills_down_to_the_target():
    ws = make_state(limit=100 * MB, target=0.6, spill=0.7, pause=0.9)
    for i in (1, 2, 3, 4, 5):
        compute(ws, i, 10 * MB)  # 50 MB of results, below the 60 MB target
    cmds = ws.handle([MemorySampled(85 * MB)])  # the process holds more than its results
    assert cmds.spill == {1, 2, 3}  # 25 MB over the target: three values of 10 MB
    assert not ws.paused
    assert not ws.handle([MemorySampled(65 * MB)]).spill


def test_spilled_values_forgotten_are_removed_from_disk():
    ws = make_state(limit=100 * MB, target=0.3)
    compute(ws, 1, 20 * MB)
    cmds = compute(ws, 2, 20 * MB)
    assert cmds.spill == {1}
    cmds = sched(ws, m.ReleaseData([1]))
    assert cmds.forget == [1] and 1 not in ws.residency


def test_a_value_that_cannot_be_spilled_stays_in_memory_and_is_not_tried_again():
    ws = make_state(limit=100 * MB, target=0.3)
    compute(ws, 1, 20 * MB)
    assert compute(ws, 2, 20 * MB).spill == {1}
    cmds = ws.handle([SpillFailed([1])])
    assert ws.residency.pinned == {1: 20 * MB}
    assert cmds.spill == {2}  # still over the target: the next one goes
    cmds = compute(ws, 3, 20 * MB)
    assert cmds.spill == {3}  # 1 is never chosen again
    assert not ws.handle([MemorySampled(99 * MB)]).spill  # nothing left that can go


def test_without_a_limit_nothing_is_spilled_or_paused():
    ws = make_state(limit=0)
    cmds = compute(ws, 1, 10**12)
    assert not cmds.spill
    cmds = ws.handle([MemorySampled(10**12)])
    assert not cmds.spill and not ws.paused and not cmds.to_scheduler


# -- pausing --------------------------------------------------------------------------------


def test_pause_stops_starting_and_fetching_and_reports_what_runs():
    ws = make_state(limit=100 * MB, pause=0.8, spill=0, target=0)
    cmds = sched(ws, execute(1), execute(2), execute(3, deps=[50], who_has=[[1]]))
    assert run_ids(cmds) == [1]
    assert fetches(cmds) == {1: {50}}
    cmds = ws.handle([MemorySampled(81 * MB)])
    assert ws.paused
    assert cmds.to_scheduler == [m.TasksStarted([1]), m.WorkerPaused(81 * MB)]
    # The running task finishes; nothing new starts, nothing new is fetched.
    cmds = ws.handle([TaskCompleted(1, 10)])
    assert run_ids(cmds) == [] and of_type(cmds, m.TaskFinished)
    ws.handle([FetchSucceeded(1, [], [], missing=[50])])  # asks again later, not now
    cmds = sched(ws, execute(4, deps=[60], who_has=[[2]]))
    assert not cmds.fetch and not cmds.run
    cmds = ws.handle([MemorySampled(81 * MB)])
    assert not cmds.to_scheduler  # still paused: said once
    # Memory falls back: work resumes.
    cmds = ws.handle([MemorySampled(50 * MB)])
    assert not ws.paused
    assert cmds.to_scheduler[0] == m.WorkerResumed(50 * MB)
    assert run_ids(cmds) == [2]
    assert 2 in fetches(cmds)


def test_tasks_cancelled_by_the_scheduler_while_paused_are_dropped():
    ws = make_state(limit=100 * MB, pause=0.8)
    sched(ws, execute(1), execute(2), execute(3, deps=[50], who_has=[[1]]))
    ws.handle([MemorySampled(90 * MB)])
    # The scheduler takes back what had not started.
    sched(ws, m.CancelTasks([2, 3]))
    assert set(ws.tasks) == {1, 50}  # 50 is in flight: kept and announced when it lands
    cmds = ws.handle([FetchSucceeded(1, [50], [10])])
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([50], [10])]


# -- busy peers -----------------------------------------------------------------------------


def test_busy_peer_another_holder_is_asked_at_once():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1], who_has=[[1, 2]]))
    assert fetches(cmds) == {1: {1}}
    cmds = ws.handle([FetchBusy(1, [1])])
    assert fetches(cmds) == {2: {1}}
    assert cmds.retry == [(1, BUSY_RETRY_FIRST)]
    cmds = ws.handle([FetchSucceeded(2, [1], [10])])
    assert run_ids(cmds) == [10] and cmds.accept == {1}


def test_busy_only_holder_is_asked_again_after_a_growing_wait():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    delays = []
    for _ in range(8):
        cmds = ws.handle([FetchBusy(1, [1])])
        assert not cmds.fetch  # not before its retry
        assert ws.tasks[1].state is FETCH
        [(peer, delay)] = cmds.retry
        delays.append(delay)
        cmds = ws.handle([PeerRetry(1)])
        assert fetches(cmds) == {1: {1}}
    assert delays[:3] == [BUSY_RETRY_FIRST, 2 * BUSY_RETRY_FIRST, 4 * BUSY_RETRY_FIRST]
    assert delays[-1] == BUSY_RETRY_MAX and delays == sorted(delays)
    # An answer with data resets the count: the next busy waits briefly again.
    ws.handle([FetchSucceeded(1, [1], [10])])
    sched(ws, execute(11, deps=[2], who_has=[[1]]))
    assert ws.handle([FetchBusy(1, [2])]).retry == [(1, BUSY_RETRY_FIRST)]


def test_busy_peer_that_leaves_is_not_waited_for():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    ws.handle([FetchBusy(1, [1])])
    cmds = sched(ws, m.PeersChanged([], [1]))
    assert ws.busy == {} and ws.resting == set()
    # No holder left that it knows of: the scheduler is told, ...
    assert of_type(cmds, m.DataMissing) == [m.DataMissing(1, 1, True)]
    ws.handle([PeerRetry(1)])  # (its timer fires anyway: harmless)
    # ... and sends the task again with the holders it knows.
    cmds = sched(ws, m.CancelTasks([10]), execute(10, deps=[1], who_has=[[2]]))
    assert fetches(cmds) == {2: {1}}


# -- the store --------------------------------------------------------------------------------


def test_store_spills_reads_back_and_serves_spilled_values(tmp_path):
    store = DataStore(str(tmp_path / "spill"))
    arr = np.random.default_rng(0).random(100_000)
    store.put(1, arr)
    store.put(2, {"a": list(range(50_000))})  # a large pickle stream, no buffers
    assert store.spill(1) > 0 and store.spill(2) > 0
    assert set(store.disk) == {1, 2} and not store.memory
    assert sorted(os.listdir(tmp_path / "spill")) == ["1", "2"]
    # The plain pickle stream is compressed on disk.
    assert os.path.getsize(tmp_path / "spill" / "2") < len(repr(list(range(50_000))))
    # Served to a peer straight from disk, and read without being brought back.
    np.testing.assert_array_equal(deserialize(store.payload(1)), arr)
    np.testing.assert_array_equal(store.get(1), arr)
    assert 1 in store.disk
    store.unspill(1)
    assert 1 in store.memory and 1 not in store.disk
    np.testing.assert_array_equal(store.memory[1], arr)
    assert store.get(2) == {"a": list(range(50_000))}
    store.forget(2)
    assert sorted(os.listdir(tmp_path / "spill")) == [] and store.disk_bytes == 0
    store.close()
    assert not (tmp_path / "spill").exists()


def test_store_keeps_a_value_it_cannot_spill(tmp_path):
    import threading

    store = DataStore(str(tmp_path / "spill"))
    store.put(1, threading.Lock())
    with pytest.raises(SerializationError):
        store.spill(1)
    assert 1 in store.memory and not store.disk
    store.close()


def test_stale_spill_directories_of_dead_processes_are_purged(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    stale = spill_directory(str(tmp_path), dead)
    mine = spill_directory(str(tmp_path), os.getpid())
    for d in (stale, mine):
        os.makedirs(os.path.join(d, "0"))
    assert purge_stale_spill(str(tmp_path)) == [stale]
    assert not os.path.exists(stale) and os.path.exists(mine)


# -- when a data server answers "busy" ---------------------------------------------------------


class FakeComm:
    def __init__(self, unsent=0, queued=False):
        self.unsent_bytes = unsent
        self.sending = queued or unsent > 0


def test_busy_rule_paused_sends_one_thing_at_a_time_otherwise_caps_unsent_bytes():
    from shoal.worker.server import Worker

    w = Worker("tcp://127.0.0.1:1", memory_limit=400 * MB)
    assert w.max_outgoing_bytes == 100 * MB  # a quarter of the limit
    me = FakeComm()
    w._data_comms = {me, FakeComm(unsent=60 * MB), FakeComm(queued=True)}
    assert not w._too_busy_for(me)
    w._data_comms.add(FakeComm(unsent=50 * MB))
    assert w._too_busy_for(me)  # 110 MB waiting to go to others
    w.state.paused = True
    w._data_comms = {me, FakeComm(queued=True)}
    assert w._too_busy_for(me)  # paused: anything under way is enough
    w._data_comms = {FakeComm(unsent=5 * MB)}
    assert not w._too_busy_for(w._data_comms.copy().pop())  # its own backlog does not count
    w._data_comms = {me}
    assert not w._too_busy_for(me)  # nothing else under way: always served



def test_trim_heap_runs_on_linux():
    import sys

    from shoal.worker import memory

    result = memory.trim_heap()  # whether anything went back depends on the heap
    assert isinstance(result, bool)
    if sys.platform.startswith("linux"):
        assert memory._libc, "glibc's malloc_trim should be found on Linux"
