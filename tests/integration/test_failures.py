"""Errors in user code, unserializable objects, and cluster members that die."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import shoal
from shoal import Client
from shoal.testing import wait_for

from ._helpers import SHORT, STARTUP, add, alive, assert_valid, boom, gate, identity, inc, wait_gone


class CustomError(Exception):
    """Defined in the test module: travels to the worker by value and back."""

    def __init__(self, code, text):
        super().__init__(code, text)
        self.code = code


def raise_custom(code):
    def deeper():
        raise CustomError(code, "custom failure")

    deeper()


class Unpicklable(Exception):
    def __init__(self, text):
        super().__init__(text)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise Unpicklable("holds a lock")


def make_lock():
    return threading.Lock()


def pid_of(_x=None):
    return os.getpid()


def slow_pid_inc(x):
    """Work that takes a while (50 ms), so a worker dies in the middle of the batch."""
    time.sleep(0.05)
    return os.getpid(), x + 1


# -- errors in tasks ---------------------------------------------------------------------


def test_task_exception_reraises_with_original_type_and_remote_traceback(client):
    fut = client.submit(boom, "original", pure=False)
    with pytest.raises(ValueError, match="boom 'original'") as info:
        fut.result(timeout=SHORT)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes
    assert "in boom" in notes and "ValueError: boom 'original'" in notes
    tb = fut.traceback(timeout=SHORT)
    assert "Traceback (most recent call last)" in tb
    assert "in boom" in tb and "ValueError" in tb
    # Asking twice gives the same exception, not a second copy of the note.
    with pytest.raises(ValueError) as again:
        fut.result(timeout=SHORT)
    assert "\n".join(again.value.__notes__).count("Remote traceback") == 1


def test_exception_class_defined_by_the_user_round_trips(client):
    fut = client.submit(raise_custom, 17)
    with pytest.raises(CustomError) as info:
        fut.result(timeout=SHORT)
    assert info.value.code == 17
    assert info.value.args == (17, "custom failure")
    assert "in deeper" in fut.traceback()


def test_exception_that_cannot_be_pickled_still_reports_type_and_text(client):
    fut = client.submit(raise_unpicklable)
    with pytest.raises(Exception) as info:
        fut.result(timeout=SHORT)
    assert "Unpicklable" in str(info.value) or type(info.value).__name__ == "Unpicklable"
    assert "holds a lock" in str(info.value)
    assert "raise_unpicklable" in fut.traceback()


def test_dependents_of_a_failed_task_fail_with_the_same_error(client):
    root = client.submit(boom, "root cause", pure=False)
    child = client.submit(inc, root)
    grandchild = client.submit(add, child, 1)
    sibling_ok = client.submit(inc, 1)
    mapped = client.map(add, [root, root], [1, 2])
    for f in [child, grandchild, *mapped]:
        with pytest.raises(ValueError, match="boom 'root cause'"):
            f.result(timeout=SHORT)
        assert "in boom" in f.traceback()
    assert sibling_ok.result(timeout=SHORT) == 2
    # A dependent submitted after the failure is known fails the same way.
    late = client.submit(inc, root)
    with pytest.raises(ValueError, match="root cause"):
        late.result(timeout=SHORT)


@pytest.mark.parametrize("how", ["result", "gather"])
def test_a_failed_future_whose_error_was_raised_is_released_when_dropped(client, how):
    fut = client.submit(boom, f"released after {how}", pure=False)
    with pytest.raises(ValueError):
        fut.result(timeout=SHORT) if how == "result" else client.gather([fut])
    del fut
    gc.collect()
    wait_for(lambda: client.scheduler_info()["n_tasks"] == 0, 3, message="the failed task to be released")


# -- serialization ----------------------------------------------------------------------------


def test_unpicklable_argument_raises_at_submit_and_client_keeps_working(client):
    with pytest.raises(shoal.SerializationError, match="cannot serialize") as info:
        client.submit(identity, threading.Lock())
    assert "identity" in str(info.value) and "lock" in str(info.value)
    assert client.submit(inc, 1).result(timeout=SHORT) == 2


def test_unpicklable_function_raises_at_submit_and_client_keeps_working(client):
    lock = threading.Lock()

    def uses_lock(x=None):
        with lock:
            return x

    with pytest.raises(shoal.SerializationError, match="cannot serialize") as info:
        client.submit(uses_lock)
    assert "uses_lock" in str(info.value) and "lock" in str(info.value)
    with pytest.raises(shoal.SerializationError):
        client.map(uses_lock, [1, 2])
    with pytest.raises(shoal.SerializationError):
        client.map(identity, [1, threading.Lock()])
    assert client.gather(client.map(inc, [1, 2])) == [2, 3]


def test_unpicklable_result_gives_a_clear_error_and_cluster_keeps_working(client):
    fut = client.submit(make_lock, pure=False)
    with pytest.raises(shoal.SerializationError) as info:
        fut.result(timeout=SHORT)
    msg = str(info.value)
    assert "cannot serialize" in msg and fut.key in msg and "lock" in msg
    assert client.submit(inc, 5).result(timeout=SHORT) == 6


def test_unpicklable_result_needed_on_another_worker_fails_its_dependent(client):
    lock = client.submit(make_lock, workers=["local-0"], pure=False)
    user = client.submit(type, lock, workers=["local-1"])
    with pytest.raises(shoal.SerializationError, match="cannot"):
        user.result(timeout=SHORT)
    # On the worker that holds it, the value is usable.
    same_place = client.submit(lambda x: type(x).__name__, lock, workers=["local-0"])
    assert same_place.result(timeout=SHORT) == "lock"
    assert client.submit(inc, 6).result(timeout=SHORT) == 7


# -- members that die --------------------------------------------------------------------------


def test_worker_killed_mid_computation_work_moves_to_the_survivor(private_cluster):
    with Client(private_cluster, timeout=STARTUP) as client:
        futs = client.map(slow_pid_inc, range(60))
        wait_for(lambda: sum(f.done() for f in futs) >= 5, STARTUP, message="the computation to be under way")
        # Kill the worker holding the first finished result: it holds data and runs tasks.
        first = next(f for f in futs if f.done())
        victim = first.result(timeout=SHORT)[0]
        worker_pids = list(private_cluster.worker_pids().values())
        assert victim in worker_pids
        survivor = next(p for p in worker_pids if p != victim)
        os.kill(victim, signal.SIGKILL)

        results = client.gather(futs)
        assert [r for _, r in results] == list(range(1, 61))
        # No result lives on the dead process: its data was recomputed elsewhere.
        assert victim not in {pid for pid, _ in results}
        assert survivor in {pid for pid, _ in results}
        # Its supervisor started a new process under the same name.
        wait_for(lambda: len(client.workers) == 2, STARTUP, message="the supervisor to restart the worker")
        new_pids = set(private_cluster.worker_pids().values())
        assert survivor in new_pids and victim not in new_pids and len(new_pids) == 2
        # The scheduler's state is consistent after the loss, and forgets the graph.
        info = assert_valid(client)
        assert sorted(info["workers"]) == ["local-0", "local-1"]
        del futs, first, results
        wait_for(lambda: client.scheduler_info()["n_tasks"] == 0, SHORT, message="the graph to be forgotten")
        assert_valid(client)


def test_scheduler_death_makes_futures_lost_and_workers_exit(private_cluster, gates):
    g, started = gates()
    # The client tries to reconnect for reconnect_timeout, then gives up.
    with Client(private_cluster, timeout=STARTUP, reconnect_timeout=1) as client:
        done = client.submit(inc, 1)
        assert done.result(timeout=SHORT) == 2
        pending = client.submit(gate, g, started)
        wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
        os.kill(private_cluster._scheduler_proc.pid, signal.SIGKILL)
        with pytest.raises(shoal.FutureLostError, match="lost the scheduler.*could not reconnect within 1s"):
            pending.result(timeout=SHORT)
        wait_for(lambda: client.status == "disconnected", SHORT, message="the client to notice")
        with pytest.raises(shoal.CommClosedError):
            client.submit(inc, 2)
        # Workers notice too and exit on their own (once the gated task is let go).
        Path(g).touch()
        wait_gone([p.pid for p in private_cluster._procs], STARTUP, "workers of a dead scheduler")


def test_unreachable_scheduler_raises_scheduler_unavailable():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(shoal.SchedulerUnavailableError, match=f"127.0.0.1:{port}"):
        Client(f"tcp://127.0.0.1:{port}", timeout=1)


def test_worker_told_to_close_while_registering_stops_promptly():
    from shoal.client.loop import LoopThread
    from shoal.protocol import messages as m
    from shoal.scheduler.server import Scheduler
    from shoal.worker.server import Worker

    io = LoopThread(name="test-close-during-registration")

    async def main():
        sched = await Scheduler("127.0.0.1", 0).start()
        original = sched._on_hello

        def hello_then_close(comm, msgs):
            original(comm, msgs)  # sends WorkerWelcome ...
            if type(msgs[0]) is m.RegisterWorker:
                comm.send(m.CloseWorker("scheduler closing"))  # ... and this, in the same flush

        sched._on_hello = hello_then_close
        worker = Worker(sched.address, connect_timeout=3)
        start = time.monotonic()
        try:
            await worker.start()
        except shoal.CommClosedError:
            pass
        finally:
            elapsed = time.monotonic() - start
            await worker.close("test over")
            await sched.close()
        return elapsed

    try:
        elapsed = io.run(main(), STARTUP)
    finally:
        io.stop()
    assert elapsed < 2, f"Worker.start() took {elapsed:.1f}s to give up on a scheduler that told it to close"


def crash_worker(x):
    os._exit(1)  # as a segfault or an out-of-memory kill would


def test_task_that_kills_its_worker_fails_with_killed_worker_error_and_siblings_complete(private_cluster):
    with Client(private_cluster, timeout=STARTUP) as client:
        bad = client.submit(crash_worker, 1)
        good = client.map(inc, range(200))
        assert client.gather(good) == list(range(1, 201))
        with pytest.raises(shoal.KilledWorkerError) as info:
            bad.result(timeout=STARTUP)
        assert "crash_worker" in str(info.value) and "4 times" in str(info.value)
        # The supervisors restarted every crashed process: the cluster works.
        client.wait_for_workers(2, timeout=STARTUP)
        assert client.submit(inc, 41, pure=False).result(timeout=SHORT) == 42
        # Four crashes, each rescheduling what the dead process held: the
        # scheduler's state is consistent; the failed task is kept as erred
        # (``bad`` holds it), the finished ones in memory (the temporary
        # result above is released as its future goes).
        assert_valid(client)
        wait_for(lambda: client.scheduler_info()["tasks"] == {"erred": 1, "memory": 200}, SHORT,
                 message="only the held tasks to remain")
        assert_valid(client)


def test_silent_worker_is_dropped_after_the_heartbeat_timeout_and_work_moves_on():
    from shoal import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, timeout=STARTUP, scheduler_options={"worker_ttl": 2}) as cl:
        with Client(cl, timeout=STARTUP) as client:
            pids = cl.worker_pids()
            hung = pids["local-0"]
            os.kill(hung, signal.SIGSTOP)  # a hung host: connection open, nothing said
            try:
                wait_for(lambda: len(client.workers) == 1, STARTUP, message="the silent worker to be dropped")
                futs = client.map(inc, range(50), pure=False)
                assert client.gather(futs) == list(range(1, 51))
                info = assert_valid(client)
                assert list(info["workers"]) == ["local-1"]
            finally:
                os.kill(hung, signal.SIGCONT)
            # The resumed process finds its connection gone: whether it exits or
            # comes back, nothing it says may corrupt the scheduler's state.
            wait_for(lambda: not alive(hung) or len(client.workers) == 2, STARTUP,
                     message="the resumed worker to exit or rejoin")
            assert_valid(client)
            assert client.gather(client.map(inc, range(10), pure=False)) == list(range(1, 11))


def test_worker_stopped_on_purpose_does_not_count_as_a_crash(inproc_cluster, gates):
    g, started = gates()
    with Client(inproc_cluster, timeout=STARTUP) as client:
        fut = client.submit(gate, g, started, workers=["local-0"], allow_other_workers=True)
        wait_for(lambda: os.path.exists(started), STARTUP, message="the task to start")
        state = inproc_cluster._scheduler.state
        worker = next(w for w in inproc_cluster._workers if w.name == "local-0")
        inproc_cluster._inproc.run(worker.close("stopped on purpose"), SHORT)
        Path(g).touch()  # let the task (and its rerun) finish
        fut.result(timeout=STARTUP)  # rerun on local-1
        # Read on the cluster's loop: the state belongs to that thread.
        crashes = inproc_cluster._inproc.run(_crashes(state, fut.key), SHORT)
        assert crashes == 0


async def _crashes(state, key):
    return state.tasks[key].crashes
