"""Unit tests of the worker's pure state machine (``shoal.worker.state``).

Every test drives a ``WorkerState`` with plain events and inspects the
``WorkerCommands`` it returns; ``validate=True`` checks the invariants after
every ``handle`` call.
"""

from __future__ import annotations

import pytest

from shoal.errors import SerializationError
from shoal.protocol import messages as m
from shoal.protocol.serialize import Payload, deserialize, serialize
from shoal.worker.state import (
    EXECUTING,
    FETCH,
    FLIGHT,
    MEMORY,
    READY,
    WAITING,
    FetchFailed,
    FetchSucceeded,
    SchedulerSent,
    TaskCompleted,
    TaskFailed,
    WorkerState,
)

SPEC = Payload([b"run-spec"])
ME = 0
PEERS = {1: "tcp://10.0.0.1:1", 2: "tcp://10.0.0.2:2", 3: "tcp://10.0.0.3:3"}


# -- helpers ---------------------------------------------------------------------


def make_state(nthreads: int = 1, peers: dict = PEERS) -> WorkerState:
    ws = WorkerState(nthreads, validate=True)
    cmds = ws.handle(
        [SchedulerSent([m.WorkerWelcome(ME, [m.PeerInfo(w, a) for w, a in peers.items()])])]
    )
    assert not cmds.run and not cmds.fetch and not cmds.to_scheduler
    return ws


def execute(tid: int, prio=(0,), deps=(), who_has=None, key=None) -> m.Execute:
    deps = list(deps)
    if who_has is None:
        who_has = [[] for _ in deps]
    return m.Execute(
        tid,
        f"k{tid}" if key is None else key,
        SPEC,
        list(prio),
        deps,
        [f"k{d}" for d in deps],
        [list(h) for h in who_has],
    )


def sched(ws: WorkerState, *msgs):
    return ws.handle([SchedulerSent(list(msgs))])


def run_ids(cmds) -> list[int]:
    return [ts.id for ts in cmds.run]


def fetches(cmds) -> dict[int, set[int]]:
    """{peer: set(ids)} of the fetch commands, checking each peer appears once."""
    out: dict = {}
    for peer, address, ids in cmds.fetch:
        assert peer not in out, f"two requests to peer {peer} in one batch: {cmds.fetch}"
        assert address == PEERS[peer]
        assert len(ids) == len(set(ids))
        out[peer] = set(ids)
    return out


def of_type(cmds, typ) -> list:
    return [msg for msg in cmds.to_scheduler if type(msg) is typ]


def finished_ids(cmds) -> list[int]:
    return [msg.id for msg in of_type(cmds, m.TaskFinished)]


# -- handshake and peers -------------------------------------------------------------


def test_welcome_records_worker_id_and_peers():
    ws = make_state()
    assert ws.wid == ME
    assert ws.peers == PEERS


def test_peers_changed_adds_and_removes():
    ws = make_state()
    sched(ws, m.PeersChanged([m.PeerInfo(7, "tcp://x:7")], [2]))
    assert ws.peers == {1: PEERS[1], 3: PEERS[3], 7: "tcp://x:7"}


# -- running tasks ----------------------------------------------------------------


def test_ready_tasks_start_in_priority_order_at_most_nthreads():
    ws = make_state(nthreads=2)
    cmds = sched(
        ws,
        execute(1, prio=(3,)),
        execute(2, prio=(1,)),
        execute(3, prio=(4,)),
        execute(4, prio=(0,)),
        execute(5, prio=(2,)),
    )
    assert run_ids(cmds) == [4, 2]
    # The only message: which tasks began running (crash attribution; others wait here).
    assert cmds.to_scheduler == [m.TasksStarted([4, 2])] and not cmds.fetch
    assert len(ws.executing) == 2

    cmds = ws.handle([TaskCompleted(2, 10)])
    assert run_ids(cmds) == [5]
    cmds = ws.handle([TaskCompleted(4, 10), TaskCompleted(5, 10)])
    assert run_ids(cmds) == [1, 3]
    cmds = ws.handle([TaskCompleted(1, 10), TaskCompleted(3, 10)])
    assert run_ids(cmds) == []
    assert not ws.executing


def test_priority_is_compared_lexicographically():
    ws = make_state(nthreads=1)
    sched(ws, execute(100, prio=(-1,)))  # occupies the only thread
    sched(ws, execute(1, prio=(1, 0)), execute(2, prio=(0, 9)), execute(3, prio=(0, 2, 5)))
    order = []
    tid = 100
    for _ in range(3):
        cmds = ws.handle([TaskCompleted(tid, 1)])
        (ts,) = cmds.run
        order.append(ts.id)
        tid = ts.id
    assert order == [3, 2, 1]


def test_never_more_than_nthreads_executing():
    ws = make_state(nthreads=3)
    cmds = sched(ws, *[execute(i, prio=(i,)) for i in range(10)])
    assert run_ids(cmds) == [0, 1, 2]
    started = set(run_ids(cmds))
    pending = list(run_ids(cmds))
    while pending:
        tid = pending.pop(0)
        cmds = ws.handle([TaskCompleted(tid, 1)])
        assert finished_ids(cmds) == [tid]
        assert len(ws.executing) <= 3
        pending.extend(run_ids(cmds))
        started.update(run_ids(cmds))
    assert started == set(range(10))


def test_task_completed_reports_task_finished_with_details():
    ws = make_state()
    cmds = sched(ws, execute(1))
    assert [ts.state for ts in cmds.run] == [EXECUTING]
    cmds = ws.handle([TaskCompleted(1, 1234, "ndarray", 0.5)])
    assert cmds.to_scheduler == [m.TaskFinished(1, 1234, "ndarray", 0.5)]
    assert ws.tasks[1].state is MEMORY
    assert ws.nbytes == 1234


def test_tuple_keys_are_restored_from_wire_lists():
    ws = make_state()
    msg = m.Execute(5, ["x", 1, ["y", 2]], SPEC, [0], [6], [["d", 0]], [[1]])
    sched(ws, msg)
    assert ws.tasks[5].key == ("x", 1, ("y", 2))
    assert ws.tasks[6].key == ("d", 0)


def test_duplicate_execute_is_ignored():
    ws = make_state(nthreads=2)
    cmds = sched(ws, execute(1))
    assert run_ids(cmds) == [1]
    cmds = sched(ws, execute(1))
    assert run_ids(cmds) == [] and not cmds.to_scheduler
    cmds = ws.handle([TaskCompleted(1, 5)])
    assert finished_ids(cmds) == [1]


def test_task_failed_reports_task_erred_and_frees_the_thread():
    ws = make_state(nthreads=1)
    sched(ws, execute(1, prio=(0,)), execute(2, prio=(1,)))
    exc = serialize(ZeroDivisionError("boom"))
    cmds = ws.handle([TaskFailed(1, exc, "Traceback: boom")])
    # Nothing else is queued here, so no TasksStarted for 2 (see _start_ready).
    assert cmds.to_scheduler == [m.TaskErred(1, exc, "Traceback: boom")]
    assert run_ids(cmds) == [2]
    assert 1 not in ws.tasks
    assert not cmds.forget  # nothing was stored for a failed task


def test_local_dependency_runs_before_its_dependent():
    # The scheduler may assign a task here before its input (also assigned
    # here) is finished: no fetch, the dependent waits for the local result.
    ws = make_state(nthreads=2)
    cmds = sched(ws, execute(1, prio=(0,)), execute(2, prio=(1,), deps=[1], who_has=[[]]))
    assert run_ids(cmds) == [1]
    assert not cmds.fetch
    assert ws.tasks[2].state is WAITING
    cmds = ws.handle([TaskCompleted(1, 8)])
    assert finished_ids(cmds) == [1]
    assert run_ids(cmds) == [2]


def test_task_sent_ahead_is_dropped_when_its_local_input_fails():
    ws = make_state(nthreads=1)
    sched(ws, execute(1), execute(2, deps=[1]), execute(3, deps=[2]))
    exc = serialize(ValueError("boom"))
    cmds = ws.handle([TaskFailed(1, exc, "tb")])
    assert cmds.to_scheduler == [m.TaskErred(1, exc, "tb")]
    assert not cmds.run
    # 2 waited for 1, which will not come; the scheduler takes it back (or
    # errs it), so the worker keeps nothing that could never run.
    assert 1 not in ws.tasks and 2 not in ws.tasks
    # Cancelling what is already gone is harmless; a retry starts afresh.
    sched(ws, m.CancelTasks([2]))
    cmds = sched(ws, execute(1), execute(2, deps=[1]))
    assert run_ids(cmds) == [1]
    cmds = ws.handle([TaskCompleted(1, 8)])
    assert run_ids(cmds) == [2]


def test_dependency_already_in_memory_makes_task_ready_at_once():
    ws = make_state()
    sched(ws, execute(1))
    ws.handle([TaskCompleted(1, 8)])
    cmds = sched(ws, execute(2, deps=[1], who_has=[[ME]]))
    assert run_ids(cmds) == [2]
    assert not cmds.fetch


# -- fetching inputs ----------------------------------------------------------------


def test_remote_inputs_are_fetched_batched_per_peer():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1, 2, 3], who_has=[[1], [1], [2]]))
    assert run_ids(cmds) == []
    assert fetches(cmds) == {1: {1, 2}, 2: {3}}
    assert ws.tasks[10].state is WAITING
    assert {ws.tasks[i].state for i in (1, 2, 3)} == {FLIGHT}


def test_own_worker_id_is_never_a_fetch_source():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1], who_has=[[ME, 2]]))
    assert fetches(cmds) == {2: {1}}


def test_one_request_in_flight_per_peer():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1], who_has=[[1]]))
    assert fetches(cmds) == {1: {1}}
    # Another input held only by the busy peer waits for the first answer.
    cmds = sched(ws, execute(11, deps=[2], who_has=[[1]]))
    assert cmds.fetch == []
    assert ws.tasks[2].state is FETCH
    cmds = ws.handle([FetchSucceeded(1, [1], [100])])
    assert run_ids(cmds) == [10]
    assert fetches(cmds) == {1: {2}}


def test_busy_peer_is_skipped_for_another_holder():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    cmds = sched(ws, execute(11, deps=[2], who_has=[[1, 2]]))
    assert fetches(cmds) == {2: {2}}


def test_shared_input_is_fetched_once():
    ws = make_state(nthreads=2)
    cmds = sched(
        ws,
        execute(10, prio=(0,), deps=[1], who_has=[[1]]),
        execute(11, prio=(1,), deps=[1], who_has=[[1]]),
    )
    assert fetches(cmds) == {1: {1}}
    cmds = sched(ws, execute(12, prio=(2,), deps=[1], who_has=[[2]]))
    assert cmds.fetch == []  # already in flight
    cmds = ws.handle([FetchSucceeded(1, [1], [64])])
    assert run_ids(cmds) == [10, 11]
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([1], [64])]


def test_arrived_inputs_are_announced_and_task_runs_when_all_present():
    ws = make_state()
    sched(ws, execute(10, deps=[1, 2, 3], who_has=[[1], [1], [2]]))
    cmds = ws.handle([FetchSucceeded(1, [1, 2], [100, 200])])
    assert run_ids(cmds) == []
    (acq,) = of_type(cmds, m.DataAcquired)
    assert dict(zip(acq.ids, acq.nbytes)) == {1: 100, 2: 200}
    assert ws.tasks[10].missing == 1
    assert ws.nbytes == 300

    cmds = ws.handle([FetchSucceeded(2, [3], [50])])
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([3], [50])]
    assert run_ids(cmds) == [10]
    assert not finished_ids(cmds)
    assert ws.nbytes == 350


def test_fetch_prefers_inputs_of_higher_priority_tasks():
    ws = make_state(nthreads=1)
    sched(ws, execute(99, prio=(-1,)))  # occupies the thread
    # peer 1 is busy, so both inputs queue up for it
    sched(ws, execute(50, prio=(0,), deps=[60], who_has=[[1]]))
    sched(
        ws,
        execute(10, prio=(9,), deps=[1], who_has=[[1]]),
        execute(11, prio=(2,), deps=[2], who_has=[[1]]),
    )
    cmds = ws.handle([FetchSucceeded(1, [60], [1])])
    ((peer, _, ids),) = cmds.fetch
    assert peer == 1
    assert ids == [2, 1]


def test_unsolicited_data_is_not_accepted():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    cmds = ws.handle([FetchSucceeded(1, [1, 77], [10, 20])])
    assert cmds.accept == {1}  # the reactor stores only these; 77 is dropped
    assert cmds.forget == []
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([1], [10])]
    assert 77 not in ws.tasks


def test_execute_of_data_already_fetched_reports_finished_without_running():
    ws = make_state(nthreads=2)
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    ws.handle([FetchSucceeded(1, [1], [10])])
    cmds = sched(ws, execute(1))
    assert finished_ids(cmds) == [1]
    assert run_ids(cmds) == []


def test_execute_of_data_in_flight_reports_finished_when_it_arrives():
    ws = make_state(nthreads=2)
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    cmds = sched(ws, execute(1))
    assert run_ids(cmds) == [] and not cmds.to_scheduler
    cmds = ws.handle([FetchSucceeded(1, [1], [10])])
    assert finished_ids(cmds) == [1]
    assert run_ids(cmds) == [10]


def test_peer_added_later_is_fetched_from():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1], who_has=[[7]]))
    assert cmds.fetch == []
    cmds = sched(ws, m.PeersChanged([m.PeerInfo(7, "tcp://new:7")], []))
    assert cmds.fetch == [(7, "tcp://new:7", [1])]


def test_removed_peer_is_not_fetched_from():
    ws = make_state()
    sched(ws, execute(50, deps=[60], who_has=[[2]]))  # make peer 2 busy
    sched(ws, execute(10, deps=[1], who_has=[[2, 3]]))  # goes to 3
    sched(ws, execute(11, deps=[5], who_has=[[2, 1]]))  # goes to 1
    cmds = sched(ws, execute(12, deps=[6], who_has=[[2, 1]]))
    assert cmds.fetch == []  # 2 and 1 both busy
    cmds = ws.handle([SchedulerSent([m.PeersChanged([], [2])]), FetchSucceeded(1, [5], [1])])
    assert fetches(cmds) == {1: {6}}
    assert 2 not in ws.peers


# -- holders that do not deliver --------------------------------------------------------


def test_missing_data_falls_back_to_another_holder():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1], who_has=[[1, 2]]))
    assert fetches(cmds) == {1: {1}}
    cmds = ws.handle([FetchSucceeded(1, [], [], missing=[1])])
    assert of_type(cmds, m.DataMissing) == [m.DataMissing(1, 1, False)]
    assert fetches(cmds) == {2: {1}}
    cmds = ws.handle([FetchSucceeded(2, [1], [10])])
    assert run_ids(cmds) == [10]
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([1], [10])]


def test_missing_data_from_last_holder_is_reported_stuck():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    cmds = ws.handle([FetchSucceeded(1, [], [], missing=[1])])
    assert of_type(cmds, m.DataMissing) == [m.DataMissing(1, 1, True)]
    assert cmds.fetch == []
    assert run_ids(cmds) == []
    # The scheduler answers with the task again and the current holders.
    cmds = sched(ws, m.CancelTasks([10]), execute(10, deps=[1], who_has=[[3]]))
    assert fetches(cmds) == {3: {1}}
    cmds = ws.handle([FetchSucceeded(3, [1], [10])])
    assert run_ids(cmds) == [10]


def test_holder_that_is_not_a_known_peer_does_not_count_against_stuck():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1, 42]]))  # 42: not a peer
    cmds = ws.handle([FetchSucceeded(1, [], [], missing=[1])])
    assert of_type(cmds, m.DataMissing) == [m.DataMissing(1, 1, True)]
    assert cmds.fetch == []


def test_ids_the_holder_neither_sent_nor_reported_are_treated_as_missing():
    ws = make_state()
    sched(ws, execute(10, deps=[1, 2], who_has=[[1, 2], [1]]))
    cmds = ws.handle([FetchSucceeded(1, [1], [5])])
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([1], [5])]
    assert of_type(cmds, m.DataMissing) == [m.DataMissing(2, 1, True)]


def test_fetch_failed_falls_back_to_another_holder():
    ws = make_state()
    sched(ws, execute(10, deps=[1, 2], who_has=[[1, 2], [1, 3]]))
    cmds = ws.handle([FetchFailed(1, [1, 2], "connection refused")])
    missing = sorted(of_type(cmds, m.DataMissing), key=lambda d: d.id)
    assert missing == [m.DataMissing(1, 1, False), m.DataMissing(2, 1, False)]
    assert fetches(cmds) == {2: {1}, 3: {2}}
    cmds = ws.handle([FetchSucceeded(2, [1], [1]), FetchSucceeded(3, [2], [1])])
    assert run_ids(cmds) == [10]


def test_fetch_failed_from_only_holder_is_reported_stuck():
    ws = make_state()
    sched(ws, execute(10, deps=[1], who_has=[[1]]))
    cmds = ws.handle([FetchFailed(1, [1], "peer gone")])
    assert of_type(cmds, m.DataMissing) == [m.DataMissing(1, 1, True)]
    assert cmds.fetch == []
    assert ws.tasks[1].state is FETCH
    assert ws.tasks[10].state is WAITING


def test_unserializable_input_fails_its_dependent_naming_the_key():
    ws = make_state(nthreads=2)
    sched(
        ws,
        execute(10, deps=[1, 2], who_has=[[1], [1]]),
        m.Execute(11, "other", SPEC, [0], [1], [("in", 7)], [[1]]),
    )
    why = "TypeError: cannot pickle '_thread.lock' object"
    cmds = ws.handle([FetchSucceeded(1, [2], [8], errors={1: why})])
    erred = of_type(cmds, m.TaskErred)
    assert sorted(e.id for e in erred) == [10, 11]
    for e in erred:
        exc = deserialize(e.exception)
        assert isinstance(exc, SerializationError)
        assert "k1" in str(exc)
        assert why in str(exc)
    assert run_ids(cmds) == []
    assert 10 not in ws.tasks and 11 not in ws.tasks
    # Nobody needs the broken input any more: it is not fetched again.
    assert 1 not in ws.tasks
    assert cmds.fetch == []
    # The input that did arrive is still announced.
    assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([2], [8])]


# -- release and cancel ---------------------------------------------------------------


def test_release_data_while_executing_discards_the_result():
    ws = make_state()
    sched(ws, execute(1))
    cmds = sched(ws, m.ReleaseData([1]))
    assert not cmds.forget and not cmds.to_scheduler
    cmds = ws.handle([TaskCompleted(1, 100)])
    assert cmds.forget == [1]
    assert finished_ids(cmds) == []
    assert 1 not in ws.tasks
    assert ws.nbytes == 0


def test_release_data_while_executing_then_failure_is_silent():
    ws = make_state()
    sched(ws, execute(1))
    sched(ws, m.ReleaseData([1]))
    cmds = ws.handle([TaskFailed(1, serialize(ValueError("x")), "")])
    # No error reported: only that its thread is free.
    assert cmds.to_scheduler == [m.TasksCancelled([1])]
    assert 1 not in ws.tasks


def test_released_running_task_still_occupies_its_thread():
    ws = make_state(nthreads=1)
    sched(ws, execute(1, prio=(0,)), execute(2, prio=(1,)))
    cmds = sched(ws, m.ReleaseData([1]))
    assert run_ids(cmds) == []  # 1 is still running in its thread
    cmds = ws.handle([TaskCompleted(1, 1)])
    assert run_ids(cmds) == [2]


def test_release_data_in_memory_forgets_it():
    ws = make_state()
    sched(ws, execute(1))
    ws.handle([TaskCompleted(1, 100)])
    cmds = sched(ws, m.ReleaseData([1]))
    assert cmds.forget == [1]
    assert 1 not in ws.tasks
    assert ws.nbytes == 0


def test_release_of_input_still_needed_locally_is_deferred():
    ws = make_state(nthreads=2)
    sched(ws, execute(1), execute(2, deps=[1, 5], who_has=[[], [1]]))
    ws.handle([TaskCompleted(1, 10)])
    cmds = sched(ws, m.ReleaseData([1]))
    assert cmds.forget == []
    assert ws.tasks[1].state is MEMORY
    cmds = ws.handle([FetchSucceeded(1, [5], [1])])
    assert run_ids(cmds) == [2]


def test_release_of_unknown_id_is_ignored():
    ws = make_state()
    cmds = sched(ws, m.ReleaseData([12345]), m.CancelTasks([54321]))
    assert not cmds.forget
    assert cmds.to_scheduler == [m.TasksCancelled([54321])]  # every cancel is answered


def test_cancel_queued_task_drops_it_and_its_unneeded_fetches():
    ws = make_state(nthreads=1)
    sched(ws, execute(1, prio=(0,)))  # occupies the thread
    sched(ws, execute(50, prio=(0,), deps=[60], who_has=[[1]]))  # peer 1 now busy
    cmds = sched(
        ws,
        execute(2, prio=(1,)),  # READY, queued behind 1
        execute(3, prio=(2,), deps=[30, 31], who_has=[[1], [2]]),  # 30 waits, 31 flies
    )
    assert fetches(cmds) == {2: {31}}
    assert ws.tasks[30].state is FETCH and ws.tasks[2].state is READY

    cmds = sched(ws, m.CancelTasks([2, 3]))
    assert cmds.to_scheduler == [m.TasksCancelled([2, 3])] and cmds.forget == []
    assert 2 not in ws.tasks and 3 not in ws.tasks
    assert 30 not in ws.tasks  # the queued fetch went with its only dependent

    # Peer 1 answers: the dropped input is not asked for.
    cmds = ws.handle([FetchSucceeded(1, [60], [1])])
    assert cmds.fetch == []
    # The thread frees: the cancelled task does not start.
    cmds = ws.handle([TaskCompleted(1, 1)])
    assert run_ids(cmds) == [50]

    # The input that was already in flight is either kept and announced or
    # forgotten; never held silently.
    cmds = ws.handle([FetchSucceeded(2, [31], [4])])
    if 31 in ws.tasks:
        assert of_type(cmds, m.DataAcquired) == [m.DataAcquired([31], [4])]
    else:
        assert cmds.forget == [31]


def test_cancel_keeps_inputs_other_tasks_still_need():
    ws = make_state(nthreads=2)
    sched(ws, execute(50, deps=[60], who_has=[[1]]))  # peer 1 busy
    sched(
        ws,
        execute(2, prio=(1,), deps=[30], who_has=[[1]]),
        execute(3, prio=(2,), deps=[30], who_has=[[1]]),
    )
    sched(ws, m.CancelTasks([2]))
    assert ws.tasks[30].state is FETCH
    cmds = ws.handle([FetchSucceeded(1, [60], [1])])
    assert fetches(cmds) == {1: {30}}
    cmds = ws.handle([FetchSucceeded(1, [30], [1])])
    assert run_ids(cmds) == [3]


def test_cancel_while_executing_discards_result():
    ws = make_state()
    sched(ws, execute(1))
    sched(ws, m.CancelTasks([1]))
    cmds = ws.handle([TaskCompleted(1, 5)])
    assert cmds.forget == [1]
    assert finished_ids(cmds) == []


@pytest.mark.parametrize("withdraw", [m.CancelTasks, m.ReleaseData])
def test_reexecute_of_cancelled_running_task_keeps_its_result(withdraw):
    ws = make_state()
    cmds = sched(ws, execute(1))
    assert run_ids(cmds) == [1]
    # e.g. the scheduler's _reset_processing: cancel then re-send in one batch
    cmds = sched(ws, withdraw([1]), execute(1))
    assert run_ids(cmds) == []  # it is still running: do not start it twice
    cmds = ws.handle([TaskCompleted(1, 42)])
    assert cmds.forget == []
    assert finished_ids(cmds) == [1]
    assert ws.tasks[1].state is MEMORY


def test_new_dependent_of_cancelled_running_task_is_not_stranded():
    ws = make_state(nthreads=2)
    sched(ws, execute(1))
    sched(ws, m.ReleaseData([1]))  # 1 keeps running here, result unwanted
    # Later 1 was recomputed on peer 2 and a dependent is assigned here.
    sched(ws, execute(2, deps=[1], who_has=[[2]]))
    cmds = ws.handle([TaskCompleted(1, 5)])
    # Either the local result is kept and used, or 1 is fetched from peer 2.
    assert run_ids(cmds) == [2] or fetches(cmds) == {2: {1}}


def test_task_assigned_here_while_its_value_is_in_flight_runs_if_fetch_fails():
    ws = make_state(nthreads=2)
    cmds = sched(ws, execute(10, deps=[1], who_has=[[1]]))
    assert fetches(cmds) == {1: {1}}
    # The scheduler recomputes 1 here (it has no inputs) while the transfer runs.
    sched(ws, execute(1))
    cmds = ws.handle([FetchFailed(1, [1], "peer gone")])
    assert run_ids(cmds) == [1]


def test_peer_removed_while_fetching_from_it_is_not_waited_for():
    ws = make_state()
    cmds = sched(ws, execute(10, deps=[1], who_has=[[1, 2]]))
    assert fetches(cmds) == {1: {1}}
    # Peer 1 left (or went silent and was dropped): its answer may never come.
    cmds = sched(ws, m.PeersChanged([], [1]))
    assert fetches(cmds) == {2: {1}}
    # A late answer from it is not taken.
    cmds = ws.handle([FetchSucceeded(1, [1], [10])])
    assert not cmds.accept and ws.tasks[1].state is FLIGHT
    cmds = ws.handle([FetchSucceeded(2, [1], [10])])
    assert cmds.accept == {1} and run_ids(cmds) == [10]


def test_define_and_release_shared_functions():
    ws = make_state()
    fn = Payload([b"pickled function"])
    msg = execute(1)
    msg.func = 3
    cmds = sched(ws, m.DefineFunction(3, fn, "tok"), msg)
    assert ws.functions == {3: fn}
    (ts,) = cmds.run
    assert ts.func == 3
    sched(ws, m.ReleaseFunctions([3, 99]))
    assert ws.functions == {}


def test_queued_fetch_that_is_assigned_here_runs_instead():
    ws = make_state(nthreads=2)
    sched(ws, execute(50, prio=(5,), deps=[60], who_has=[[1]]))  # peer 1 busy
    cmds = sched(ws, execute(10, prio=(1,), deps=[1], who_has=[[1]]))
    assert ws.tasks[1].state is FETCH
    # The scheduler decides to compute 1 here after all.
    cmds = sched(ws, execute(1, prio=(0,)))
    assert run_ids(cmds) == [1]
    assert ws.tasks[1].state is EXECUTING
    cmds = ws.handle([FetchSucceeded(1, [60], [1])])
    assert cmds.fetch == []  # 1 is no longer fetched
    cmds = ws.handle([TaskCompleted(1, 3)])
    assert finished_ids(cmds) == [1]
    assert run_ids(cmds) == [10]


# -- retirement: copies and draining ----------------------------------------------------


def test_acquire_data_fetches_and_keeps_a_copy_nobody_here_needs():
    ws = make_state()
    cmds = sched(ws, m.AcquireData([5, 6], ["k5", "k6"], [[1], [1]]))
    assert fetches(cmds) == {1: {5, 6}}
    cmds = ws.handle([FetchSucceeded(1, [5, 6], [10, 20])])
    (acq,) = of_type(cmds, m.DataAcquired)
    assert acq.ids == [5, 6] and acq.nbytes == [10, 20]
    assert ws.tasks[5].state is MEMORY and not ws.copies
    assert not cmds.forget  # kept: the scheduler now counts this worker as a holder


def test_acquire_data_already_held_is_confirmed_at_once():
    ws = make_state()
    sched(ws, execute(1))
    ws.handle([TaskCompleted(1, 8)])
    cmds = sched(ws, m.AcquireData([1], ["k1"], [[2]]))
    assert [a.ids for a in of_type(cmds, m.DataAcquired)] == [[1]] and not cmds.fetch


def test_copy_outlives_the_local_task_that_also_needed_it():
    ws = make_state()
    sched(ws, execute(1, deps=[5], who_has=[[1]]))
    cmds = sched(ws, m.AcquireData([5], ["k5"], [[1]]))
    assert not cmds.fetch or fetches(cmds) == {1: {5}}
    sched(ws, m.CancelTasks([1]))  # the task goes; the copy stays wanted
    assert 5 in ws.tasks and ws.tasks[5] in ws.copies


def test_copy_with_its_holder_failing_is_reported_and_dropped():
    ws = make_state()
    sched(ws, m.AcquireData([5], ["k5"], [[1]]))
    cmds = ws.handle([FetchFailed(1, [5], "connection refused")])
    (miss,) = of_type(cmds, m.DataMissing)
    assert (miss.id, miss.holder, miss.stuck) == (5, 1, True)
    assert 5 not in ws.tasks and not ws.copies


def test_drain_hands_back_tasks_not_started_and_lets_the_running_one_finish():
    ws = make_state(nthreads=1)
    cmds = sched(ws, execute(1, prio=(0,)), execute(2, prio=(1,)), execute(3, prio=(2,), deps=[9], who_has=[[1]]))
    assert run_ids(cmds) == [1]
    cmds = sched(ws, m.DrainWorker())
    (rej,) = of_type(cmds, m.TasksRejected)
    assert sorted(rej.ids) == [2, 3]
    assert set(ws.tasks) == {1} or set(ws.tasks) == {1, 9}
    cmds = ws.handle([TaskCompleted(1, 8)])
    assert finished_ids(cmds) == [1] and not cmds.run


def test_steal_gives_back_what_has_not_started_and_keeps_the_rest():
    ws = make_state(nthreads=1)
    sched(ws, execute(1, prio=(0,)), execute(2, prio=(1,)), execute(3, prio=(2,), deps=[9], who_has=[[1]]))
    assert ws.tasks[1].state is EXECUTING and ws.tasks[2].state is READY and ws.tasks[3].state is WAITING
    cmds = sched(ws, m.StealTasks([3, 2, 1, 42]))
    (answer,) = of_type(cmds, m.TasksStolen)
    # 3 (fetching its input) and 2 (ready) go; 1 runs; 42 is unknown here.
    assert answer.ids == [3, 2] and answer.kept == [1, 42]
    # 9 was fetched for 3 alone: it has no user left, and goes when its transfer ends.
    assert set(ws.tasks) == {1, 9} and ws.tasks[9].state is FLIGHT and not ws.tasks[9].dependents
    cmds = ws.handle([TaskCompleted(1, 8)])
    assert finished_ids(cmds) == [1] and not cmds.run  # 2 does not run here


def test_a_task_stolen_and_sent_back_runs_once_and_never_compares_tasks():
    # Dropped while ready, it leaves a stale heap entry with the same priority
    # and id as the new one: ordering must not fall through to the tasks.
    ws = make_state(nthreads=1)
    sched(ws, execute(1, prio=(0,)), execute(2, prio=(5,)))
    sched(ws, m.StealTasks([2]))
    sched(ws, execute(2, prio=(5,)))  # placed here again
    sched(ws, m.CancelTasks([2]))
    cmds = sched(ws, execute(2, prio=(5,)))
    assert not cmds.run
    cmds = ws.handle([TaskCompleted(1, 8)])
    assert run_ids(cmds) == [2]
    cmds = ws.handle([TaskCompleted(2, 8)])
    assert finished_ids(cmds) == [2] and not cmds.run


def test_steal_keeps_a_finished_task():
    ws = make_state(nthreads=1)
    sched(ws, execute(1))
    ws.handle([TaskCompleted(1, 8)])
    cmds = sched(ws, m.StealTasks([1]))
    (answer,) = of_type(cmds, m.TasksStolen)
    assert answer.ids == [] and answer.kept == [1]
    assert ws.tasks[1].state is MEMORY


def test_inputs_answered_later_are_asked_for_again_from_the_same_holder():
    ws = make_state()
    cmds = sched(ws, execute(1, deps=[5, 6, 7], who_has=[[1], [1], [1]]))
    assert fetches(cmds) == {1: {5, 6, 7}}
    cmds = ws.handle([FetchSucceeded(1, [5], [10], later=[6, 7])])
    assert ws.tasks[5].state is MEMORY
    assert fetches(cmds) == {1: {6, 7}}  # asked again at once, nothing reported missing
    assert not of_type(cmds, m.DataMissing)
    cmds = ws.handle([FetchSucceeded(1, [6, 7], [10, 10])])
    assert run_ids(cmds) == [1]


def test_input_whose_last_known_holder_left_is_reported_stuck():
    ws = make_state()
    cmds = sched(ws, execute(1, deps=[5], who_has=[[1]]))
    assert fetches(cmds) == {1: {5}}
    # Peer 1 is busy with 5, so 6 waits its turn in FETCH.
    sched(ws, execute(2, deps=[6], who_has=[[1]]))
    assert ws.tasks[6].state is FETCH
    cmds = sched(ws, m.PeersChanged([], [1]))
    # Neither has a holder left: 6 (queued) is said at once, and so is 5, whose
    # transfer from the departed peer is failed without waiting for it.
    assert [(x.id, x.holder, x.stuck) for x in of_type(cmds, m.DataMissing)] == [(6, 1, True), (5, 1, True)]
