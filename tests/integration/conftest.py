"""Fixtures for integration tests: real processes, real TCP.

Functions defined in these test modules are shipped to workers by value
(cloudpickle), as they would be from a user's script, because the workers
cannot import the test package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle
import pytest

from shoal import Client, LocalCluster

from ._helpers import STARTUP, wait_gone

if __package__ and __package__ in sys.modules:
    cloudpickle.register_pickle_by_value(sys.modules[__package__])


@pytest.fixture(autouse=True)
def _ship_test_module_by_value(request):
    mod = request.module
    if mod.__name__ in sys.modules and not mod.__name__.startswith(f"{__package__}."):
        cloudpickle.register_pickle_by_value(mod)
    yield


def _process_cluster(what: str):
    """A 2 x 1 process cluster; at teardown, every process it ran (supervised
    workers included, restarted ones too) must be gone."""
    c = LocalCluster(n_workers=2, threads_per_worker=1, timeout=STARTUP)
    try:
        yield c
    finally:
        pids = set(c.processes_alive)  # now: after any restarts during the test
        c.close()
        wait_gone(pids, STARTUP, f"the {what}'s processes")


@pytest.fixture(scope="session")
def cluster():
    """Two worker processes with one thread each, shared by the tests that only read from it."""
    yield from _process_cluster("shared cluster")


@pytest.fixture
def client(cluster):
    with Client(cluster, timeout=STARTUP) as c:
        yield c


@pytest.fixture
def private_cluster():
    """A process cluster of its own, for tests that break it (kill a worker, the scheduler...)."""
    yield from _process_cluster("private cluster")


@pytest.fixture
def inproc_cluster():
    """Scheduler and two workers on an event loop in this process: their state can be inspected."""
    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, timeout=STARTUP)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def gates(tmp_path):
    """``gates()`` -> (gate path, started-marker path); every gate opens at teardown,
    so a blocked task never outlives its test."""
    made: list[Path] = []
    n = [0]

    def new():
        n[0] += 1
        g = tmp_path / f"gate-{n[0]}"
        made.append(g)
        return str(g), str(tmp_path / f"started-{n[0]}")

    yield new
    for g in made:
        g.touch()
