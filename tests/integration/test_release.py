"""Data is released when the futures that want it are dropped.

The cluster runs in this process (``processes=False``), so the scheduler's
task table and each worker's store can be inspected directly.  Reading them
from the test thread while the cluster's event loop runs is racy in general,
so every check polls (``wait_for``) for a state the system must settle in.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from shoal import Client
from shoal.testing import wait_for

from ._helpers import SHORT, STARTUP, add, gate, inc


def scheduler_keys(cluster) -> set:
    return set(list(cluster._scheduler.state.tasks))


def stored_ids(cluster) -> list[set]:
    return [set(list(w.store)) for w in cluster._workers]


def ids_of(cluster, keys) -> set:
    tasks = cluster._scheduler.state.tasks
    return {tasks[k].id for k in keys if k in tasks}


def wait_released(cluster, keys, ids, timeout=SHORT):
    keys, ids = set(keys), set(ids)
    wait_for(lambda: not (keys & scheduler_keys(cluster)), timeout,
             message=f"the scheduler to forget {sorted(map(str, keys))}")
    wait_for(lambda: all(not (ids & s) for s in stored_ids(cluster)), timeout,
             message=f"every worker to drop task ids {sorted(ids)}")


@pytest.fixture
def inproc_client(inproc_cluster):
    with Client(inproc_cluster, timeout=STARTUP) as c:
        yield c


def test_dropping_futures_releases_data_on_scheduler_and_workers(inproc_cluster, inproc_client):
    client = inproc_client
    x = client.submit(inc, 41, workers=["local-0"])
    y = client.submit(inc, x, workers=["local-1"])  # x is copied to local-1 too
    assert y.result(timeout=SHORT) == 43
    keys = [x.key, y.key]
    ids = ids_of(inproc_cluster, keys)
    assert len(ids) == 2
    # Both workers hold x (one computed it, one fetched it); local-1 holds y.
    wait_for(lambda: all(ids_of(inproc_cluster, [x.key]) <= s for s in stored_ids(inproc_cluster)), SHORT,
             message="x to be held by both workers")
    del x, y
    gc.collect()
    wait_released(inproc_cluster, keys, ids)


def test_intermediate_results_are_released_once_dependents_are_done(inproc_cluster, inproc_client):
    client = inproc_client
    a = client.submit(inc, 1)
    b = client.submit(inc, a)
    a_key = a.key
    del a
    gc.collect()
    assert b.result(timeout=SHORT) == 3
    tasks = inproc_cluster._scheduler.state.tasks
    a_id = tasks[a_key].id
    # The scheduler keeps a's record (b's lineage) but no data for it anywhere.
    wait_for(lambda: tasks[a_key].state.value == "released" and not tasks[a_key].who_has, SHORT,
             message="a to be released on the scheduler")
    wait_for(lambda: all(a_id not in s for s in stored_ids(inproc_cluster)), SHORT,
             message="every worker to drop a")
    assert client.submit(inc, b).result(timeout=SHORT) == 4
    b_key, b_id = b.key, tasks[b.key].id
    del b
    gc.collect()
    wait_released(inproc_cluster, [a_key, b_key], [a_id, b_id])


def test_futures_gathered_in_bulk_are_released(inproc_cluster, inproc_client):
    client = inproc_client
    futs = client.map(inc, range(200))
    total = client.submit(sum, futs)
    assert total.result(timeout=SHORT) == sum(range(1, 201))
    keys = [f.key for f in futs] + [total.key]
    ids = ids_of(inproc_cluster, keys)
    del futs, total
    gc.collect()
    wait_released(inproc_cluster, keys, ids)
    assert scheduler_keys(inproc_cluster) == set()
    assert stored_ids(inproc_cluster) == [set(), set()]


def test_a_key_held_by_another_future_survives_release(inproc_cluster, inproc_client):
    client = inproc_client
    f1 = client.submit(add, 20, 22)
    f2 = client.submit(add, 20, 22)  # same pure key, second handle
    assert f1.key == f2.key and f1.result(timeout=SHORT) == 42
    key = f1.key
    del f1
    gc.collect()
    # Still wanted through f2: nothing may be released.  Wait until the release
    # round trip is surely over by pushing a marker task through the same queue.
    assert client.submit(inc, 0).result(timeout=SHORT) == 1
    assert key in scheduler_keys(inproc_cluster)
    assert f2.result(timeout=SHORT) == 42
    ids = ids_of(inproc_cluster, [key])
    f2.release()
    wait_released(inproc_cluster, [key], ids)


def test_dropping_a_running_future_releases_its_result_when_it_finishes(inproc_cluster, inproc_client, gates):
    client = inproc_client
    g, started = gates()
    fut = client.submit(gate, g, started)
    key = fut.key
    wait_for(lambda: Path(started).exists(), SHORT, message="the gated task to start")
    ids = ids_of(inproc_cluster, [key])
    del fut
    gc.collect()
    wait_for(lambda: key not in scheduler_keys(inproc_cluster), SHORT, message="the scheduler to forget the task")
    Path(g).touch()
    # The result computed after the release must not stay behind in a store.
    wait_for(lambda: all(not w.state.executing for w in inproc_cluster._workers), SHORT,
             message="the cancelled task to return")
    wait_released(inproc_cluster, [key], ids)


def test_closing_a_client_releases_everything_it_held(inproc_cluster):
    with Client(inproc_cluster, timeout=STARTUP) as client:
        futs = client.map(inc, range(20))
        assert client.gather(futs) == list(range(1, 21))
        keys = [f.key for f in futs]
        ids = ids_of(inproc_cluster, keys)
    wait_released(inproc_cluster, keys, ids)
    wait_for(lambda: not inproc_cluster._scheduler.state.clients, SHORT, message="the scheduler to forget the client")
