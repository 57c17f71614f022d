"""The ``shoal`` command line: scheduler and workers as separate commands, demo, help."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import psutil
import pytest

from shoal import Client
from shoal.testing import wait_for

from ._helpers import (
    SHORT,
    STARTUP,
    descendants,
    inc,
    kill_leftovers,
    popen_logged,
    read_json_when_ready,
    shoal_cmd,
    wait_gone,
)

SHOAL = shutil.which("shoal")


def pid_of(_x=None):
    return os.getpid()


def run(cmd, timeout=STARTUP, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


@pytest.fixture
def scheduler_proc(tmp_path):
    """``python -m shoal scheduler --port 0 --scheduler-file F``; yields (process, address, log)."""
    sf = tmp_path / "scheduler.json"
    log = tmp_path / "scheduler.log"
    proc = popen_logged(shoal_cmd("scheduler", "--port", "0", "--scheduler-file", str(sf)), log)
    try:
        info = read_json_when_ready(sf, STARTUP, proc, log)
        assert info["pid"] == proc.pid
        assert info["address"].startswith("tcp://127.0.0.1:")
        yield proc, info["address"], log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_workers(address, tmp_path, *args, name="cli"):
    log = tmp_path / f"worker-{name}.log"
    assert SHOAL, "the shoal console script is not on PATH"
    return popen_logged([SHOAL, "worker", address, "--name", name, *args], log), log


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- help and version ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["python -m shoal", "shoal"])
def test_help(how):
    base = shoal_cmd() if how == "python -m shoal" else [SHOAL]
    r = run([*base, "--help"])
    assert r.returncode == 0, r.stderr
    for sub in ("scheduler", "worker", "demo"):
        assert sub in r.stdout
    for sub in ("scheduler", "worker"):
        r = run([*base, sub, "--help"])
        assert r.returncode == 0, r.stderr
        assert "--help" in r.stdout


def test_version():
    import shoal

    r = run([SHOAL, "--version"])
    assert r.returncode == 0, r.stderr
    assert shoal.__version__ in r.stdout


def test_unknown_command_fails_with_usage():
    r = run([SHOAL, "no-such-command"])
    assert r.returncode != 0
    assert "Usage" in r.stderr


# -- a cluster from the command line ------------------------------------------------------------------


def test_scheduler_and_workers_from_the_command_line(scheduler_proc, tmp_path):
    sched, address, sched_log = scheduler_proc
    workers, wlog = start_workers(address, tmp_path, "--nworkers", "2", "--nthreads", "1")
    try:
        with Client(address, timeout=STARTUP) as client:
            client.wait_for_workers(2, timeout=STARTUP)
            assert len(client.workers) == 2
            futs = client.map(inc, range(100))
            assert client.submit(sum, futs).result(timeout=SHORT) == sum(range(1, 101))
            assert client.gather({"a": futs[:3], "b": client.submit(inc, 10)}) == {"a": [1, 2, 3], "b": 11}
            # --nworkers 2 --name cli: two processes named cli-0 and cli-1, children of the command.
            pids = client.gather([client.submit(pid_of, workers=[f"cli-{i}"], pure=False) for i in range(2)])
            children = descendants(workers.pid)
            assert len(set(pids)) == 2 and set(pids) <= set(children), (pids, children)
        assert len(children) == 2

        # SIGTERM to the worker command stops its worker processes.
        workers.send_signal(signal.SIGTERM)
        wait_gone(children, SHORT, "the worker processes after SIGTERM to `shoal worker`")

        # SIGTERM to the scheduler stops it, cleanly.
        sched.send_signal(signal.SIGTERM)
        assert sched.wait(SHORT) == 0, sched_log.read_text()[-3000:]
        assert "Traceback" not in sched_log.read_text()
    finally:
        kill_leftovers(descendants(workers.pid))
        stop(workers)


def test_worker_command_with_several_workers_exits_on_sigterm(scheduler_proc, tmp_path):
    sched, address, _ = scheduler_proc
    workers, wlog = start_workers(address, tmp_path, "--nworkers", "2", name="multi")
    try:
        with Client(address, timeout=STARTUP) as client:
            client.wait_for_workers(2, timeout=STARTUP)
        children = descendants(workers.pid)
        workers.send_signal(signal.SIGTERM)
        wait_for(lambda: workers.poll() is not None, 8, message="`shoal worker --nworkers 2` to exit after SIGTERM")
        assert workers.returncode == 0
        wait_gone(children, SHORT, "its worker processes")
    finally:
        kill_leftovers(descendants(workers.pid))
        stop(workers)


def test_single_worker_command_exits_on_sigterm(scheduler_proc, tmp_path):
    sched, address, _ = scheduler_proc
    worker, wlog = start_workers(address, tmp_path, "--nthreads", "2", name="solo")
    try:
        with Client(address, timeout=STARTUP) as client:
            client.wait_for_workers(1, timeout=STARTUP)
            # The command is the supervisor; the task runs in its one child.
            ran_in = client.submit(pid_of, workers=["solo"], pure=False).result(timeout=SHORT)
            assert ran_in in {c.pid for c in psutil.Process(worker.pid).children()}
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(SHORT) == 0, wlog.read_text()[-3000:]
            wait_for(lambda: not client.workers, SHORT, message="the scheduler to report the worker gone")
    finally:
        stop(worker)


def test_crashed_worker_is_restarted_by_its_supervisor(scheduler_proc, tmp_path):
    sched, address, _ = scheduler_proc
    worker, wlog = start_workers(address, tmp_path, name="phoenix")
    try:
        with Client(address, timeout=STARTUP) as client:
            client.wait_for_workers(1, timeout=STARTUP)
            first = client.submit(pid_of, pure=False).result(timeout=SHORT)
            os.kill(first, signal.SIGKILL)
            wait_for(
                lambda: any(c.pid != first for c in psutil.Process(worker.pid).children()),
                STARTUP,
                message="the supervisor to start a new worker process",
            )
            client.wait_for_workers(1, timeout=STARTUP)
            again = client.submit(pid_of, workers=["phoenix"], pure=False).result(timeout=STARTUP)
            assert again != first
            assert worker.poll() is None  # the supervisor itself carried on
    finally:
        stop(worker)


def test_workers_exit_when_the_scheduler_stops(scheduler_proc, tmp_path):
    sched, address, _ = scheduler_proc
    worker, wlog = start_workers(address, tmp_path, name="orphan")
    try:
        with Client(address, timeout=STARTUP) as client:
            client.wait_for_workers(1, timeout=STARTUP)
        # The scheduler counts a worker as joined before the worker has read its
        # welcome; wait for the worker's side too (see test_failures.py for the race).
        wait_for(lambda: "registered with" in wlog.read_text(), SHORT, message="the worker to finish registering")
        sched.send_signal(signal.SIGTERM)
        assert sched.wait(SHORT) == 0
        worker.wait(SHORT)  # on its own: it lost its scheduler
        assert "Traceback" not in wlog.read_text(), wlog.read_text()[-3000:]
    finally:
        stop(worker)


def test_worker_command_with_unreachable_scheduler_fails_clearly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run([SHOAL, "worker", f"tcp://127.0.0.1:{port}"], timeout=60)
    assert r.returncode == 1
    assert "shoal worker:" in r.stderr and str(port) in r.stderr


# -- demo -------------------------------------------------------------------------------------------


def test_demo_runs_and_reports_ok():
    r = run([SHOAL, "demo", "--workers", "2"], timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    ok_lines = [line for line in r.stdout.splitlines() if " ok " in line]
    assert len(ok_lines) == 3, r.stdout
    assert "WRONG" not in r.stdout
    assert "re-raised ZeroDivisionError" in r.stdout
    assert "cluster stopped" in r.stdout
