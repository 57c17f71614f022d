"""Workers and clients that come and go, with real processes: graceful
retirement, workers killed at random, clients that disconnect, reconnect, or
outlive their scheduler.

After each scenario the scheduler's invariants are checked
(``scheduler_info(validate=True)``).  Nothing waits by sleeping: every wait is
for a condition, with a timeout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import shoal
from shoal import Client, LocalCluster, wait
from shoal.spec import Task, TaskRef
from shoal.testing import wait_for

from ._helpers import (
    SHORT,
    STARTUP,
    gate,
    inc,
    kill_leftovers,
    popen_logged,
    read_json_when_ready,
    shoal_cmd,
    wait_gone,
)


def counted(directory: str, i: int, size: int = 1000):
    """Leaves one file per run, so the test can count executions."""
    Path(directory, f"run-{i}-{uuid.uuid4().hex}").touch()
    return os.getpid(), list(range(size))


def runs(directory) -> int:
    return sum(1 for p in Path(directory).iterdir() if p.name.startswith("run-"))


def total_length(results) -> int:
    return sum(len(data) for _, data in results)


def assert_valid(client: Client) -> dict:
    info = client.scheduler_info(validate=True)
    assert info["invariant_error"] == ""
    return info


# -- graceful retirement -----------------------------------------------------------------


def test_graceful_retirement_moves_data_without_recomputation(private_cluster, tmp_path):
    with Client(private_cluster, timeout=STARTUP) as client:
        pids = private_cluster.worker_pids()
        futs = [
            client.submit(counted, str(tmp_path), i, workers=["local-0"], allow_other_workers=True)
            for i in range(20)
        ]
        wait(futs, timeout=SHORT)
        assert runs(tmp_path) == 20
        retired = client.scheduler_info()["worker_addresses"]["local-0"]

        client.retire_workers(["local-0"])

        assert retired not in client.workers and len(client.workers) == 1
        # The worker exited for good: its nanny did not restart it, and exited too.
        nanny = private_cluster._procs[0]
        wait_gone([pids["local-0"], nanny.pid], STARTUP, "the retired worker and its nanny")
        assert nanny.wait(SHORT) == 0
        # Every result was computed on the retired worker, and never again:
        # it now comes from the copy on the other worker.
        results = client.gather(futs)
        assert {pid for pid, _ in results} == {pids["local-0"]}
        assert total_length(results) == 20 * 1000
        assert client.submit(total_length, futs).result(timeout=SHORT) == 20 * 1000
        assert runs(tmp_path) == 20
        info = assert_valid(client)
        assert list(info["workers"]) == ["local-1"]


def test_retirement_lets_a_running_task_finish_first(private_cluster, tmp_path, gates):
    g, started = gates()
    with Client(private_cluster, timeout=STARTUP) as client:
        running = client.submit(gate, g, started, workers=["local-0"], allow_other_workers=True)
        wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
        os.remove(started)  # a second run would leave it again
        queued = [
            client.submit(counted, str(tmp_path), i, workers=["local-0"], allow_other_workers=True)
            for i in range(5)
        ]
        outcome: list = []
        retiring = threading.Thread(target=lambda: outcome.append(client.retire_workers("local-0")))
        retiring.start()
        try:
            # The tasks queued behind the running one move to local-1 and finish
            # there while the retirement waits for the running one.
            results = client.gather(queued)
            assert {pid for pid, _ in results} == {private_cluster.worker_pids()["local-1"]}
            assert retiring.is_alive() and not running.done()
        finally:
            Path(g).touch()
            retiring.join(STARTUP)
        assert outcome == [None]
        assert running.result(timeout=SHORT) == g
        assert len(client.workers) == 1
        assert runs(tmp_path) == 5
        assert_valid(client)
    # The gated task ran once: it was not handed back and run again elsewhere.
    assert not os.path.exists(started)


def test_retiring_unknown_or_every_worker_is_refused(client):
    with pytest.raises(shoal.RetirementError, match="unknown workers.*'no-such-worker'"):
        client.retire_workers(["local-0", "no-such-worker"])
    with pytest.raises(shoal.RetirementError, match="no worker to take their data"):
        client.retire_workers(["local-0", "local-1"])
    # Refused requests change nothing.
    assert len(client.workers) == 2
    assert client.submit(inc, 1, pure=False).result(timeout=SHORT) == 2
    assert_valid(client)


# -- workers killed at random ----------------------------------------------------------------


def mix(a, b):
    return (a * 31 + b) % 1_000_003


def logged_mix(log: str, name: str, a, b):
    """``mix`` that appends its name to ``log`` on every run (one short
    O_APPEND write: lines from concurrent processes do not interleave)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{name}\n".encode())
    finally:
        os.close(fd)
    return mix(a, b)


def layered_graph(width: int, depth: int, log: str | None = None) -> dict:
    """``depth`` layers of ``width`` tasks, each reading two tasks of the layer
    before; with ``log``, every run of a task is recorded there."""

    def task(d, i, a, b):
        key = ("t", d, i)
        return Task(key, mix, a, b) if log is None else Task(key, logged_mix, log, f"{d}-{i}", a, b)

    g = {("t", 0, i): task(0, i, i, 1) for i in range(width)}
    for d in range(1, depth):
        for i in range(width):
            g[("t", d, i)] = task(d, i, TaskRef(("t", d - 1, i)), TaskRef(("t", d - 1, (i + 1) % width)))
    return g


def expected_last_layer(width: int, depth: int) -> list:
    layer = [mix(i, 1) for i in range(width)]
    for _ in range(1, depth):
        layer = [mix(layer[i], layer[(i + 1) % width]) for i in range(width)]
    return layer


def test_workers_killed_at_random_during_a_10k_task_graph_give_the_right_answer():
    width, depth = 500, 20  # 10,000 tasks
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with LocalCluster(n_workers=4, threads_per_worker=1, timeout=STARTUP) as cluster:
        with Client(cluster, timeout=STARTUP) as client:
            graph = layered_graph(width, depth)
            last = [("t", depth - 1, i) for i in range(width)]
            # Held futures part-way through: each one done triggers a kill, so
            # the kills land while the graph runs (and these get recomputed).
            checkpoints = [("t", d, 0) for d in (4, 9, 14)]
            futs = client.submit_graph(graph, last + checkpoints)
            final, marks = futs[:width], futs[width:]
            killed: list[int] = []
            final_done_at_kill: list[int] = []
            errors: list[BaseException] = []

            def killer(marks, final):
                try:
                    for mark in marks:
                        wait([mark], timeout=STARTUP)
                        pids = list(cluster.worker_pids(timeout=0).values())
                        victim = rng.choice(pids)
                        final_done_at_kill.append(sum(f.done() for f in final))
                        os.kill(victim, signal.SIGKILL)
                        killed.append(victim)
                except BaseException as e:  # reported by the test thread
                    errors.append(e)

            t = threading.Thread(target=killer, args=(marks, final), name="killer")
            t.start()
            try:
                wait(final, timeout=60)
            finally:
                t.join(STARTUP)
            assert not errors, f"seed {seed}: {errors}"
            assert len(killed) == 3, f"seed {seed}"
            assert max(final_done_at_kill) < width, "a kill came after the graph had finished"
            assert client.gather(final) == expected_last_layer(width, depth), f"seed {seed}"
            # The nannies restarted every killed worker.
            wait_for(lambda: len(client.workers) == 4, STARTUP, message="the killed workers to be restarted")
            assert_valid(client)
            del futs, final, marks
            wait_for(lambda: client.scheduler_info()["n_tasks"] == 0, SHORT, message="the graph to be forgotten")
            assert_valid(client)


# -- clients that disconnect -------------------------------------------------------------------

GRACE = 2.0


@pytest.fixture(scope="module")
def graceful_cluster():
    """Keeps a disconnected client's data for GRACE seconds."""
    c = LocalCluster(n_workers=2, threads_per_worker=1, timeout=STARTUP, scheduler_options={"client_grace": GRACE})
    try:
        yield c
    finally:
        pids = set(c.processes_alive)
        c.close()
        wait_gone(pids, STARTUP, "the graceful cluster's processes")


_CLIENT_SCRIPT = """
import sys, threading
from pathlib import Path
from shoal import Client
client = Client(sys.argv[1], timeout=30)
fut = client.submit(sum, [1, 2, 3], key="held-by-a-client-that-dies")
assert fut.result(timeout=30) == 6
Path(sys.argv[2]).touch()
threading.Event().wait()  # until killed
"""


def test_data_of_a_client_that_died_is_released_after_the_grace_period(graceful_cluster, tmp_path):
    ready = tmp_path / "ready"
    proc = popen_logged(
        [sys.executable, "-c", _CLIENT_SCRIPT, graceful_cluster.scheduler_address, str(ready)], tmp_path / "client.log"
    )
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, STARTUP, message="the client process to compute")
        assert proc.poll() is None, (tmp_path / "client.log").read_text()
        with Client(graceful_cluster, timeout=STARTUP) as observer:
            assert observer.scheduler_info()["n_tasks"] == 1
            proc.kill()
            killed_at = time.monotonic()
            proc.wait(SHORT)
            # Kept for the grace period (the observer holds nothing) ...
            assert observer.scheduler_info()["n_tasks"] == 1
            # ... then released.
            wait_for(lambda: observer.scheduler_info()["n_tasks"] == 0, STARTUP, message="the dead client's data to go")
            assert time.monotonic() - killed_at >= GRACE - 0.6  # the scheduler ticks every 0.5 s
            assert_valid(observer)
    finally:
        kill_leftovers([proc.pid])


def test_client_whose_connection_drops_reconnects_and_keeps_its_futures(graceful_cluster, tmp_path, gates):
    g, started = gates()
    with Client(graceful_cluster, timeout=STARTUP) as client:
        done = client.submit(counted, str(tmp_path), 0, 10)
        assert done.result(timeout=SHORT)[1] == list(range(10))
        pending = client.submit(gate, g, started)
        wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
        old_id = client.scheduler_id

        async def drop_connection():
            client._comm.abort()  # as a network failure would

        client._io.run(drop_connection(), SHORT)
        wait_for(lambda: client.status == "running", STARTUP, message="the client to reconnect")
        assert client.scheduler_id == old_id
        Path(g).touch()
        assert pending.result(timeout=SHORT) == g
        assert done.result(timeout=SHORT)[1] == list(range(10))
        assert client.submit(counted, str(tmp_path), 1, 10).result(timeout=SHORT)
        assert runs(tmp_path) == 2  # nothing recomputed
        assert_valid(client)


# -- a scheduler that restarts -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_scheduler(port: int, log: Path) -> subprocess.Popen:
    """A scheduler process on ``port``; returns once it listens (workers do not wait for it)."""
    ready = log.with_suffix(".json")
    cmd = shoal_cmd("scheduler", "--port", str(port), "--scheduler-file", str(ready), "--log-level", "info")
    proc = popen_logged(cmd, log)
    read_json_when_ready(ready, STARTUP, proc, log)
    return proc


def _start_worker(address: str, name: str, log: Path) -> subprocess.Popen:
    return popen_logged(shoal_cmd("worker", address, "--name", name, "--log-level", "warning"), log)


def test_client_reconnects_to_a_restarted_scheduler_and_forgotten_futures_fail_clearly(tmp_path, gates):
    g, started = gates()
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start_scheduler(port, tmp_path / "scheduler-1.log"))
        procs.append(_start_worker(address, "w-1", tmp_path / "worker-1.log"))
        with Client(address, timeout=STARTUP, reconnect_timeout=STARTUP) as client:
            client.wait_for_workers(1, timeout=STARTUP)
            done = client.submit(inc, 1, key="done-before-the-restart")
            assert done.result(timeout=SHORT) == 2
            pending = client.submit(gate, g, started, key="running-at-the-restart")
            wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
            old_id = client.scheduler_id

            procs[0].kill()
            procs[0].wait(SHORT)
            wait_gone([procs[1].pid], STARTUP, "the worker of the dead scheduler")
            assert not pending.done()  # waiting for the reconnection, not failed yet
            assert client.status == "reconnecting"
            during = client.submit(inc, 100)  # sent once the client is back
            procs.append(_start_scheduler(port, tmp_path / "scheduler-2.log"))
            procs.append(_start_worker(address, "w-2", tmp_path / "worker-2.log"))

            wait_for(lambda: client.status == "running" and client.scheduler_id != old_id, STARTUP,
                     message="the client to reconnect to the new scheduler")
            for fut in (done, pending):
                with pytest.raises(shoal.FutureLostError, match=f"'{fut.key}'.*scheduler .* restarted"):
                    fut.result(timeout=SHORT)
            client.wait_for_workers(1, timeout=STARTUP)
            assert during.result(timeout=SHORT) == 101
            assert client.submit(inc, 10).result(timeout=SHORT) == 11
            # Submitting a lost key again computes it again.
            assert client.submit(inc, 1, key="done-before-the-restart").result(timeout=SHORT) == 2
            assert_valid(client)
    finally:
        Path(g).touch()
        kill_leftovers([p.pid for p in procs])
        wait_gone([p.pid for p in procs], STARTUP, "the test's scheduler and worker processes")


def test_retiring_a_worker_while_a_10k_task_graph_runs_recomputes_nothing(tmp_path):
    width, depth = 500, 20
    log = tmp_path / "runs.log"
    with LocalCluster(n_workers=3, threads_per_worker=1, timeout=STARTUP) as cluster:
        with Client(cluster, timeout=STARTUP) as client:
            graph = layered_graph(width, depth, str(log))
            futs = client.submit_graph(graph, [("t", depth - 1, i) for i in range(width)] + [("t", 5, 0)])
            final, mark = futs[:width], futs[width]
            wait([mark], timeout=STARTUP)
            client.retire_workers(["local-1"])
            assert not all(f.done() for f in final), "the graph finished before the retirement"
            wait(final, timeout=60)
            assert client.gather(final) == expected_last_layer(width, depth)
            assert len(client.workers) == 2
            assert_valid(client)
    runs = log.read_text().split()
    assert len(runs) == len(set(runs)) == width * depth  # each task ran exactly once
