"""The scheduler core and workers short of memory: paused workers get no new
work and give back what they had not started; a worker lost at its memory
limit is named so in the error; missing data reported against a holder that
is already gone still gets the task going again."""

from __future__ import annotations

from shoal.errors import KilledWorkerError
from shoal.protocol import messages as m
from shoal.scheduler.events import WorkerJoined, WorkerLeft
from shoal.scheduler.records import MEMORY, NO_WORKER, PROCESSING, QUEUED
from test_scheduler_state import (
    addr,
    error_of,
    execs,
    finish,
    ids_in,
    placed,
    setup,
    submit,
    tid,
    to_client,
    worker_send,
)


def pause(s, wid, memory=900):
    return worker_send(s, wid, m.WorkerPaused(memory))


def resume(s, wid, memory=100):
    return worker_send(s, wid, m.WorkerResumed(memory))


def test_paused_worker_gives_back_what_it_had_not_started():
    s = setup(nworkers=2)
    cmds = submit(s, {f"r{i}": [] for i in range(6)})
    on_w1 = sorted(k for k, w in placed(cmds).items() if w == 1)
    assert len(on_w1) == 3
    running = on_w1[0]
    worker_send(s, 1, m.TasksStarted([tid(s, running)]))
    cmds = pause(s, 1)
    assert s.workers[1].paused and s.workers[1] not in s.idle
    # Everything but the running task is cancelled there and placed on worker 2.
    assert sorted(ids_in(cmds, 1, m.CancelTasks)) == sorted(tid(s, k) for k in on_w1[1:])
    assert {k: w for k, w in placed(cmds).items()} == {k: 2 for k in on_w1[1:]}
    assert s.tasks[running].processing_on is s.workers[1]
    # The running task still finishes there.
    finish(s, 1, running)
    assert s.tasks[running].state is MEMORY


def test_paused_worker_is_not_given_queued_roots_or_new_tasks():
    s = setup(nworkers=2, queue_ahead=0)
    pause(s, 1)
    cmds = submit(s, {"a": [], "b": [], "c": []})
    assert set(placed(cmds).values()) == {2}
    assert s.tasks["b"].state is QUEUED  # one at a time on worker 2; none on worker 1
    cmds = finish(s, 2, "a")
    assert placed(cmds) == {"b": 2}  # the next root goes to worker 2 as it has room
    cmds = submit(s, {"d": ["a"]})
    assert placed(cmds) == {"d": 2}  # worker 1 holds nothing yet, but is not a candidate anyway
    # Resumed, it takes queued work again.
    cmds = resume(s, 1)
    assert placed(cmds) == {"c": 1}


def test_task_restricted_to_a_paused_worker_waits_for_it():
    s = setup(nworkers=2)
    pause(s, 1)
    cmds = submit(s, {"x": []}, workers=["w1"])
    assert not execs(cmds) and s.tasks["x"].state is NO_WORKER
    cmds = resume(s, 1)
    assert placed(cmds) == {"x": 1}


def test_all_workers_paused_nothing_runs_until_one_resumes():
    s = setup(nworkers=2)
    pause(s, 1)
    pause(s, 2)
    cmds = submit(s, {"a": [], "b": ["a"]})
    assert not execs(cmds)
    cmds = resume(s, 2)
    assert placed(cmds) == {"a": 2}
    cmds = finish(s, 2, "a")
    assert placed(cmds) == {"b": 2}


def test_pause_and_resume_are_idempotent_and_counted():
    s = setup(nworkers=2)
    pause(s, 1)
    pause(s, 1)
    assert s.n_paused == 1
    resume(s, 2)  # never paused
    assert s.n_paused == 1
    s.handle([WorkerLeft(1, "connection lost")])
    assert s.n_paused == 0


def test_worker_killed_at_its_memory_limit_is_named_in_the_error():
    s = setup(nworkers=1, allowed_failures=0)
    s.handle([WorkerJoined(5, "big", addr(5), 1, 1000, {}, 0.0)])
    s.handle([WorkerLeft(1, "gone")])  # leave only the worker with a limit
    submit(s, {"hog": []})
    worker_send(s, 5, m.TasksStarted([tid(s, "hog")]))
    pause(s, 5, memory=950)
    cmds = s.handle([WorkerLeft(5, "connection lost")])
    [erred] = to_client(cmds, m.KeyErred)
    exc = error_of(erred)
    assert isinstance(exc, KilledWorkerError)
    assert "950 B of memory for a 1000 B limit" in str(exc)


def test_missing_data_reported_against_a_holder_already_gone_resends_the_task():
    # x lives on workers 1 and 3; worker 2 was told only of worker 1.
    s = setup(nworkers=3)
    submit(s, {"x": []}, workers=["w1"])
    finish(s, 1, "x")
    submit(s, {"y": ["x"]}, workers=["w2"])
    worker_send(s, 3, m.DataAcquired([tid(s, "x")], [10]))
    assert set(s.tasks["x"].who_has) == {s.workers[1], s.workers[3]}
    s.handle([WorkerLeft(1, "connection lost")])
    # Worker 2 learns that worker 1 left and knows no other holder.
    cmds = worker_send(s, 2, m.DataMissing(tid(s, "x"), 1, True))
    assert ids_in(cmds, 2, m.CancelTasks) == [tid(s, "y")]
    [ex] = execs(cmds, 2)
    assert ex.key == "y" and ex.who_has == [[3]]
