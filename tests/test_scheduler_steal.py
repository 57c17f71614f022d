"""Work stealing in the scheduler core: a worker with free threads takes
tasks another has not started, only after that worker gives them back."""

from __future__ import annotations

from shoal.protocol import messages as m
from shoal.scheduler.events import Ticked, WorkerLeft
from shoal.scheduler.records import PROCESSING
from test_scheduler_state import (
    RUN,
    client_send,
    finish,
    ids_in,
    join_worker,
    placed,
    setup,
    submit,
    tid,
    to_worker,
    worker_send,
)


def backlog(n=4, **kw):
    """Worker 1 holds ``n`` root tasks (r0 running), then worker 2 joins."""
    s = setup(nworkers=1, queue_ahead=8, **kw)
    cmds = submit(s, {f"r{i}": [] for i in range(n)})
    assert set(placed(cmds).values()) == {1}
    worker_send(s, 1, m.TasksStarted([tid(s, "r0")]))
    return s, join_worker(s, 2)


def steal_ids(cmds, wid=1):
    return ids_in(cmds, wid, m.StealTasks)


def test_a_joining_worker_asks_for_the_least_urgent_unstarted_tasks():
    s, cmds = backlog(4)
    # Half the difference in backlog (2), the least urgent first, never r0 (running).
    assert steal_ids(cmds) == [tid(s, "r3"), tid(s, "r2")]
    # Nothing moves until the worker answers.
    assert all(s.tasks[k].processing_on.wid == 1 for k in ("r2", "r3"))
    assert not placed(cmds)


def test_given_back_tasks_go_to_the_thief_and_kept_ones_stay():
    s, cmds = backlog(4)
    cmds = worker_send(s, 1, m.TasksStolen([tid(s, "r3")], [tid(s, "r2")]))
    assert placed(cmds) == {"r3": 2}
    assert s.tasks["r3"].processing_on.wid == 2
    assert s.tasks["r2"].processing_on.wid == 1
    # The answered request frees the victim for another one later.
    assert not s.stealing.requested and not s.stealing.expecting


def test_one_request_per_victim_at_a_time():
    s, cmds = backlog(6)
    assert len(to_worker(cmds, 1, m.StealTasks)) == 1
    cmds = join_worker(s, 3)
    assert not to_worker(cmds, 1, m.StealTasks)  # the first is not answered yet
    worker_send(s, 1, m.TasksStolen([], [tid(s, "r5"), tid(s, "r4"), tid(s, "r3")]))
    cmds = s.handle([])  # nothing to do: no worker became hungry since
    assert not to_worker(cmds, 1, m.StealTasks)


def test_a_tick_looks_again_for_work_for_idle_workers():
    s, cmds = backlog(6)
    worker_send(s, 1, m.TasksStolen([], steal_ids(cmds)))  # all had started meanwhile
    cmds = s.handle([Ticked(1.0)])
    assert steal_ids(cmds)  # worker 2 is still idle: ask again


def test_tasks_that_cannot_move_are_not_asked_for():
    s = setup(nworkers=1, queue_ahead=8, eager=True)
    submit(s, {"a": [], "b": ["a"]})  # b is sent ahead to wait for a on worker 1
    submit(s, {"pinned": m.TaskSpec("pinned", [], RUN, workers=["w1"])})
    submit(s, {"gpu": m.TaskSpec("gpu", [], RUN, resources={"GPU": 1})})
    assert s.tasks["b"].state is PROCESSING and s.tasks["b"].processing_on.wid == 1
    cmds = join_worker(s, 2)
    # a has a dependent waiting for it there; b waits for a; pinned and gpu are restricted.
    assert not steal_ids(cmds)


def test_a_dependent_sent_ahead_while_the_steal_was_pending_follows_its_input():
    s, cmds = backlog(4, eager=True)
    assert steal_ids(cmds) == [tid(s, "r3"), tid(s, "r2")]
    submit(s, {"r3": [], "d": ["r3"]}, wanted=["d"])  # sent ahead behind r3 on worker 1
    assert s.tasks["d"].processing_on.wid == 1
    cmds = worker_send(s, 1, m.TasksStolen([tid(s, "r3"), tid(s, "r2")], []))
    # d is taken back from worker 1 and goes ahead to worker 2, behind r3.
    assert tid(s, "d") in ids_in(cmds, 1, m.CancelTasks)
    assert placed(cmds) == {"r3": 2, "r2": 2, "d": 2}
    finish(s, 2, "r3")
    assert s.tasks["d"].processing_on.wid == 2


def test_an_answer_for_a_task_released_meanwhile_is_ignored():
    s, cmds = backlog(4)
    r3 = tid(s, "r3")
    # The client releases r3 before the worker answers: it is cancelled, not moved.
    cmds = client_send(s, m.ReleaseKeys(["r3"]))
    assert r3 in ids_in(cmds, 1, m.CancelTasks)
    assert "r3" not in s.tasks
    cmds = worker_send(s, 1, m.TasksStolen([r3], [tid(s, "r2")]))
    assert not placed(cmds)
    assert s.tasks["r2"].processing_on.wid == 1


def test_a_victim_that_leaves_settles_its_requests():
    s, cmds = backlog(4)
    assert steal_ids(cmds)
    cmds = s.handle([WorkerLeft(1, "killed")])
    assert not s.stealing.requested and not s.stealing.expecting
    # Its tasks are placed again, on worker 2.
    assert {s.tasks[f"r{i}"].processing_on.wid for i in range(4)} == {2}


def test_a_thief_that_left_meanwhile_gets_nothing():
    s, cmds = backlog(4)
    s.handle([WorkerLeft(2, "killed")])
    cmds = worker_send(s, 1, m.TasksStolen([tid(s, "r3")], [tid(s, "r2")]))
    # r3 is placed afresh: worker 1 is the only one left.
    assert placed(cmds) == {"r3": 1}
    assert not s.stealing.expecting


def test_stealing_can_be_turned_off():
    s, cmds = backlog(4, work_stealing=False)
    assert not steal_ids(cmds)


def inputs_on_worker_1(nbytes, n=4):
    s = setup(nworkers=1, queue_ahead=8)
    submit(s, {"x": []})
    finish(s, 1, "x", nbytes=nbytes)
    cmds = submit(s, {f"y{i}": ["x"] for i in range(n)}, wanted=[f"y{i}" for i in range(n)])
    assert set(placed(cmds).values()) == {1}
    worker_send(s, 1, m.TasksStarted([tid(s, "y0")]))
    return s, join_worker(s, 2)


def test_tasks_reading_small_inputs_held_elsewhere_are_stolen():
    s, cmds = inputs_on_worker_1(nbytes=1000)
    assert steal_ids(cmds)


def test_tasks_whose_inputs_cost_more_to_move_than_to_wait_for_stay():
    # 8 MiB to fetch for tasks of unknown (so: short) duration: not worth it.
    s, cmds = inputs_on_worker_1(nbytes=8 * 2**20)
    assert not steal_ids(cmds)
