"""Helpers shared by the integration tests (not collected: no ``test_`` prefix).

Everything here that runs on a worker is pickled by value (see conftest.py),
so it needs no import path on the worker side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from shoal.testing import wait_for

# Generous: the machine has 2 cores and may be shared with other test runs.
# These bound waits for things that should happen; they cost nothing when
# things go right.
STARTUP = 30.0
SHORT = 15.0


def assert_valid(client) -> dict:
    """The scheduler's invariants hold (``validate()`` on its state); returns its info."""
    info = client.scheduler_info(validate=True)
    assert info["invariant_error"] == "", info["invariant_error"]  # (no assertion rewriting here)
    return info


# -- tasks (run on workers) -------------------------------------------------------


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def neg(x):
    return -x


def identity(x):
    return x


def boom(x=None):
    raise ValueError(f"boom {x!r}")


def pid_and_payload(n):
    return os.getpid(), list(range(n))


def pid_and_input(t):
    """Runs where its input had to be moved to: its own pid, the producer's pid, the data."""
    producer_pid, data = t
    return os.getpid(), producer_pid, data


def gate(path, started=None, timeout=60.0):
    """Block until ``path`` exists (the test opens the gate); mark ``started`` first.

    A bounded poll instead of sleeping: a gated task occupies its worker's thread
    exactly as long as the test wants, and never longer than ``timeout``.
    """
    if started is not None:
        Path(started).touch()
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.005)
    return str(path)


# -- processes --------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def alive_of(pids) -> list[int]:
    return [p for p in pids if alive(p)]


def wait_gone(pids, timeout: float, what: str = "processes") -> None:
    pids = list(pids)
    wait_for(lambda: not alive_of(pids), timeout, message=f"{what} {pids} to exit (alive: {alive_of(pids)})")


def kill_leftovers(pids) -> None:
    """SIGKILL processes this test started (directly or through Shoal) that are still alive.

    Only pids the test recorded itself, and only if they still look like Shoal
    or Python processes (guards against pid reuse)."""
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
            if "shoal" in cmd or "python" in cmd:
                p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def my_children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True) if alive(c.pid)}


def shoal_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal", *args]


def popen_logged(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr going to ``log`` (never a pipe nobody reads)."""
    f = open(log, "wb")
    try:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    finally:
        f.close()


def read_json_when_ready(path: Path, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Wait for a JSON file written atomically by another process and return its content."""

    def ready():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
            raise AssertionError(f"process exited with {proc.returncode} before writing {path}:\n{tail}")
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text()) or True
        except ValueError:
            return None  # not complete yet

    return wait_for(ready, timeout, message=f"{path} to be written")
