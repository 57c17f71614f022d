"""Unit tests of the scheduler core for the life cycle of workers and clients:
graceful retirement, disconnected clients and their grace period, reconnection.

Driven by events alone, every state validating itself after each ``handle()``.
"""

from __future__ import annotations

from shoal.protocol import messages as m
from shoal.scheduler.events import ClientDisconnected, ClientJoined, ClientLeft, Ticked, WorkerLeft
from shoal.scheduler.records import MEMORY, PROCESSING, WAITING
from shoal.scheduler.retire import RETRY_TICKS
from test_scheduler_state import (
    RUN,
    addr,
    client_send,
    execs,
    finish,
    in_memory,
    in_memory_keys,
    ids_in,
    join_worker,
    placed,
    run_all,
    setup,
    submit,
    tid,
    to_client,
    to_worker,
    worker_send,
)


def retire(s, *workers, close=True, rid=1, cid="c"):
    return client_send(s, m.RetireWorkers(rid, list(workers), close), cid=cid)


def done_msgs(cmds, cid="c") -> list:
    return to_client(cmds, m.RequestDone, cid)


def held_on(s, wid: int, *keys) -> None:
    """Compute ``keys`` (roots) on worker ``wid``."""
    for key in keys:
        cmds = submit(s, {key: []}, workers=[f"w{wid}"], allow_other_workers=True)
        assert placed(cmds) == {key: wid}
        finish(s, wid, key)
        assert s.tasks[key].state is MEMORY


# -- retirement ----------------------------------------------------------------------


def test_retire_copies_data_held_only_there_then_closes_the_worker():
    s = setup(nworkers=2)
    held_on(s, 1, "x", "y")
    cmds = retire(s, "w1")
    assert to_worker(cmds, 1, m.DrainWorker)
    (ask,) = to_worker(cmds, 2, m.AcquireData)
    assert ask.ids == [tid(s, "x"), tid(s, "y")] and ask.keys == ["x", "y"] and ask.who_has == [[1], [1]]
    assert not to_worker(cmds, 1, m.CloseWorker) and not done_msgs(cmds)

    cmds = worker_send(s, 2, m.DataAcquired([tid(s, "x")], [10]))
    assert not to_worker(cmds, 1, m.CloseWorker)  # "y" exists only there still
    cmds = worker_send(s, 2, m.DataAcquired([tid(s, "y")], [10]))
    assert [c.reason for c in to_worker(cmds, 1, m.CloseWorker)] == ["retired"]
    assert not done_msgs(cmds)  # answered once it has left

    cmds = s.handle([WorkerLeft(1, "closed", expected=True)])
    assert [d.error for d in done_msgs(cmds)] == [""]
    # Nothing recomputed: the copies on worker 2 are the data now.
    assert not execs(cmds)
    assert {ws.wid for ws in s.tasks["x"].who_has} == {2} and s.tasks["y"].state is MEMORY


def test_retire_by_address_and_data_held_elsewhere_too_needs_no_copy():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    worker_send(s, 2, m.DataAcquired([tid(s, "x")], [10]))  # a replica exists already
    cmds = retire(s, addr(1))
    assert not to_worker(cmds, 2, m.AcquireData)
    assert to_worker(cmds, 1, m.CloseWorker)


def test_retiring_worker_gets_no_new_tasks_and_its_unstarted_ones_move():
    s = setup(nworkers=2)
    cmds = submit(s, {f"r{i}": [] for i in range(6)})
    on_1 = [x.id for x in execs(cmds, 1)]
    assert on_1
    retire(s, "w1")
    assert s.workers[1] not in s.idle
    # New work goes to worker 2 only, even work that would favour worker 1's data.
    cmds = submit(s, {"n1": [], "n2": []})
    assert set(placed(cmds).values()) <= {2}
    # The worker hands back what it had not started; it runs elsewhere.
    cmds = worker_send(s, 1, m.TasksRejected(on_1))
    assert set(placed(cmds).values()) <= {2}
    assert not s.workers[1].processing
    assert to_worker(cmds, 1, m.CloseWorker)  # nothing held, nothing running: done


def test_task_running_on_a_retiring_worker_finishes_there_and_its_result_is_copied():
    s = setup(nworkers=2)
    submit(s, {"a": []}, workers=["w1"], allow_other_workers=True)
    assert s.tasks["a"].state is PROCESSING
    cmds = retire(s, "w1")
    assert not to_worker(cmds, 1, m.CloseWorker)  # still running "a"
    assert not to_worker(cmds, 2, m.AcquireData)
    cmds = finish(s, 1, "a")
    (ask,) = to_worker(cmds, 2, m.AcquireData)
    assert ask.ids == [tid(s, "a")]
    cmds = worker_send(s, 2, m.DataAcquired([tid(s, "a")], [10]))
    assert to_worker(cmds, 1, m.CloseWorker)
    assert s.tasks["a"].crashes == 0


def test_unknown_workers_are_refused_by_name():
    s = setup(nworkers=2)
    cmds = retire(s, "w1", "nope", "tcp://1.2.3.4:5")
    (done,) = done_msgs(cmds)
    assert "unknown workers" in done.error and "nope" in done.error and "tcp://1.2.3.4:5" in done.error
    assert not s.retirements.workers and not cmds.to_workers


def test_retiring_every_worker_is_refused_and_keeps_the_data():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    cmds = retire(s, "w1", "w2")
    (done,) = done_msgs(cmds)
    assert "no worker to take their data" in done.error
    retire(s, "w1", rid=2)
    cmds = retire(s, "w2", rid=3)  # the last one left, in a second request
    (done,) = done_msgs(cmds)
    assert done.request_id == 3 and "no worker" in done.error
    assert s.tasks["x"].state is MEMORY


def test_copy_target_that_dies_is_replaced_and_unanswered_asks_are_repeated():
    s = setup(nworkers=3)
    held_on(s, 1, "x")
    cmds = retire(s, "w1")
    (target,) = [wid for wid in (2, 3) if to_worker(cmds, wid, m.AcquireData)]
    other = 5 - target
    cmds = s.handle([WorkerLeft(target, "connection lost")])
    (ask,) = to_worker(cmds, other, m.AcquireData)
    assert ask.ids == [tid(s, "x")]
    # No answer: asked again after a few ticks, not before.
    for i in range(RETRY_TICKS - 1):
        cmds = s.handle([Ticked(float(i))])
        assert not to_worker(cmds, other, m.AcquireData)
    cmds = s.handle([Ticked(10.0)])
    assert to_worker(cmds, other, m.AcquireData)


def test_retirement_waits_for_a_worker_to_take_the_data():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    retire(s, "w1")
    cmds = s.handle([WorkerLeft(2, "connection lost")])
    assert not cmds.close_workers and not to_worker(cmds, 1, m.CloseWorker)
    cmds = join_worker(s, 3)
    (ask,) = to_worker(cmds, 3, m.AcquireData)
    assert ask.who_has == [[1]]
    cmds = worker_send(s, 3, m.DataAcquired(ask.ids, [10]))
    assert to_worker(cmds, 1, m.CloseWorker)


def test_retire_without_close_answers_once_drained_and_keeps_the_worker_idle():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    cmds = retire(s, "w1", close=False)
    (ask,) = to_worker(cmds, 2, m.AcquireData)
    cmds = worker_send(s, 2, m.DataAcquired(ask.ids, [10]))
    assert [d.error for d in done_msgs(cmds)] == [""]
    assert not to_worker(cmds, 1, m.CloseWorker)
    assert 1 in s.workers and 1 in s.retirements.workers
    cmds = submit(s, {"later": []})
    assert placed(cmds) == {"later": 2}


def test_retiring_worker_that_crashes_is_handled_as_any_loss():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    retire(s, "w1")
    cmds = s.handle([WorkerLeft(1, "connection lost")])
    assert [d.error for d in done_msgs(cmds)] == [""]
    assert placed(cmds) == {"x": 2}  # recomputed from lineage, as after any crash
    assert not s.retirements.workers and not s.retirements.copies


def test_released_data_needs_no_copy():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    cmds = retire(s, "w1")
    assert to_worker(cmds, 2, m.AcquireData)
    cmds = client_send(s, m.ReleaseKeys(["x"]))
    assert to_worker(cmds, 1, m.CloseWorker)
    assert not s.retirements.copies
    # A late confirmation for forgotten data is answered with a release.
    cmds = worker_send(s, 2, m.DataAcquired([0], [10]))
    assert ids_in(cmds, 2, m.ReleaseData) == [0]


def test_worker_stuck_on_an_input_whose_holder_left_gets_the_task_again_with_the_current_holders():
    s = setup(nworkers=3)
    held_on(s, 1, "x")
    worker_send(s, 2, m.DataAcquired([tid(s, "x")], [10]))  # a copy on worker 2
    cmds = client_send(
        s, m.SubmitGraph([m.TaskSpec("y", ["x"], RUN, workers=["w3"])], ["y"])
    )
    (ex,) = execs(cmds, 3)
    s.handle([WorkerLeft(1, "closed", expected=True)])
    # Worker 3 was told only of worker 1 and says so once that peer is gone.
    cmds = worker_send(s, 3, m.DataMissing(tid(s, "x"), 1, True))
    assert ids_in(cmds, 3, m.CancelTasks) == [ex.id]
    (again,) = execs(cmds, 3)
    assert again.who_has == [[2]]


# -- clients that disconnect -----------------------------------------------------------------


def test_disconnected_client_keeps_its_data_for_the_grace_period():
    s = setup(nworkers=1, client_grace=10.0)
    run_all(s, submit(s, {"x": []}))
    s.handle([ClientDisconnected("c", now=100.0)])
    s.handle([Ticked(109.0)])
    assert s.tasks["x"].state is MEMORY and "c" in s.clients
    cmds = s.handle([Ticked(110.5)])
    assert ids_in(cmds, 1, m.ReleaseData) == [0]
    assert s.tasks == {} and s.clients == {} and not s.disconnected


def test_zero_grace_releases_at_once_and_a_goodbye_needs_no_grace():
    s = setup(nworkers=1, client_grace=0)
    run_all(s, submit(s, {"x": []}))
    s.handle([ClientDisconnected("c", now=1.0)])
    assert s.tasks == {} and s.clients == {}
    s = setup(nworkers=1, client_grace=10.0)
    run_all(s, submit(s, {"x": []}))
    client_send(s, m.CloseClient())
    s.handle([ClientDisconnected("c", now=1.0)])
    assert s.tasks == {} and not s.disconnected


def test_client_back_within_the_grace_period_resumes_its_futures():
    s = setup(nworkers=1, client_grace=10.0)
    run_all(s, submit(s, {"done": []}))
    submit(s, {"dropped": []})
    submit(s, {"running": []})
    s.handle([ClientDisconnected("c", now=0.0)])
    finish(s, 1, "dropped")  # finished while away: the news was lost
    s.handle([ClientJoined("c")])
    cmds = client_send(s, m.ResumeClient(["done", "running", "never-heard-of"]))
    assert sorted(in_memory_keys(cmds)) == ["done"]
    (lost,) = to_client(cmds, m.KeysLost)
    assert lost.keys == ["never-heard-of"] and "restarted" in lost.reason and "10s" in lost.reason
    # The future dropped while away is released; the others are kept.
    assert "dropped" not in s.tasks
    assert s.tasks["running"].state is PROCESSING
    s.handle([Ticked(100.0)])  # the grace period no longer applies
    assert set(s.tasks) == {"done", "running"}
    cmds = finish(s, 1, "running")
    assert in_memory_keys(cmds) == ["running"]


def test_client_unknown_to_the_scheduler_gets_its_keys_reported_lost_unless_another_holds_them():
    s = setup(nworkers=1, clients=("c", "d"))
    run_all(s, submit(s, {"shared": []}, cid="d"))
    s.handle([ClientLeft("c")])  # e.g. its grace period ran out
    s.handle([ClientJoined("c")])
    cmds = client_send(s, m.ResumeClient(["shared", "mine"]))
    assert in_memory_keys(cmds) == ["shared"]
    assert [x.keys for x in to_client(cmds, m.KeysLost)] == [["mine"]]
    assert s.tasks["shared"].wanted_by == {"c", "d"}


def test_resumed_key_known_only_by_its_lineage_is_computed_again():
    s = setup(nworkers=1, clients=("c", "d"))
    run_all(s, submit(s, {"a": [], "b": ["a"]}, cid="d"))  # "a" released once "b" exists
    assert s.tasks["a"].state is not MEMORY
    cmds = client_send(s, m.ResumeClient(["a"]))
    assert placed(cmds) == {"a": 1}
    assert s.tasks["a"].wanted_by == {"c"} and s.tasks["b"].state is MEMORY
    assert s.tasks["a"].state is PROCESSING or s.tasks["a"].state is WAITING


def test_clients_learn_the_remaining_holders_when_one_leaves():
    s = setup(nworkers=2)
    held_on(s, 1, "x")
    worker_send(s, 2, m.DataAcquired([tid(s, "x")], [10]))
    cmds = s.handle([WorkerLeft(1, "closed", expected=True)])
    [(key, _, workers, _, _)] = in_memory(cmds)
    assert key == "x" and workers == [addr(2)]
