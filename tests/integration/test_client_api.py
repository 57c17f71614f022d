"""The Client and Future API against a real process cluster (two workers, one thread each)."""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import threading
import warnings
from pathlib import Path

import pytest

import shoal
from shoal import Client, as_completed, wait
from shoal.testing import wait_for

from ._helpers import SHORT, STARTUP, add, boom, gate, inc, neg, pid_and_input, pid_and_payload


def total(*parts):
    return sum(sum(p) if isinstance(p, (list, tuple)) else p for p in parts)


def nested_sum(obj):
    if isinstance(obj, dict):
        return sum(nested_sum(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(nested_sum(v) for v in obj)
    return obj


def power(x, exponent=1, offset=0):
    return x**exponent + offset


# -- submit / map / gather ---------------------------------------------------------------


def test_submit_and_result(client):
    fut = client.submit(inc, 41)
    assert fut.result(timeout=SHORT) == 42
    assert fut.done()
    assert fut.status == "finished"
    assert fut.exception(timeout=SHORT) is None
    assert fut.traceback(timeout=SHORT) is None
    assert "finished" in repr(fut) and "int" in repr(fut)


def test_map_1000_then_sum_of_futures(client):
    futs = client.map(inc, range(1000))
    assert len(futs) == 1000
    assert len({f.key for f in futs}) == 1000
    s = client.submit(sum, futs)
    assert s.result(timeout=STARTUP) == sum(range(1, 1001))
    assert client.gather(futs) == list(range(1, 1001))


def test_map_over_several_iterables_with_kwargs(client):
    futs = client.map(power, [1, 2, 3], [2, 3, 4], offset=10)
    assert client.gather(futs) == [11, 18, 91]


def test_futures_inside_lists_tuples_and_dicts_are_dependencies(client):
    a, b, c = client.map(inc, [0, 1, 2])  # 1, 2, 3
    fut = client.submit(total, [a, b], (c, 4), 5)
    assert fut.result(timeout=SHORT) == 1 + 2 + 3 + 4 + 5
    fut2 = client.submit(nested_sum, {"x": [a, {"y": b}], "z": (c,)})
    assert fut2.result(timeout=SHORT) == 6
    fut3 = client.submit(power, a, exponent=b, offset=c)  # futures as keyword arguments
    assert fut3.result(timeout=SHORT) == 1**2 + 3


def test_gather_keeps_the_shape_of_nested_containers(client):
    f = client.map(neg, range(4))
    out = client.gather({"a": [f[0], (f[1], "literal")], "b": {"c": f[2]}, "d": f[3], "e": 7})
    assert out == {"a": [0, (-1, "literal")], "b": {"c": -2}, "d": -3, "e": 7}
    assert client.gather(f[1]) == -1
    assert client.gather([]) == []


def test_gather_errors_skip_drops_failed_futures(client):
    ok = client.submit(neg, 5)
    bad = client.submit(boom, "skip-me")
    assert client.gather([ok, bad], errors="skip") == [-5]
    with pytest.raises(ValueError, match="skip-me"):
        client.gather([ok, bad])


def test_pure_submissions_share_a_key_and_impure_ones_do_not(client):
    assert client.submit(inc, 7).key == client.submit(inc, 7).key
    a, b = client.submit(inc, 7, pure=False), client.submit(inc, 7, pure=False)
    assert a.key != b.key
    assert client.gather([a, b]) == [8, 8]
    named = client.submit(inc, 8, key="my-own-key")
    assert named.key == "my-own-key"
    assert named.result(timeout=SHORT) == 9


def test_retries_rerun_a_failing_task(client, tmp_path):
    counter = tmp_path / "attempts"

    def flaky():
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
        if n < 2:
            raise RuntimeError(f"attempt {n} fails")
        return n

    assert client.submit(flaky, retries=2, pure=False).result(timeout=SHORT) == 2
    counter.unlink()
    with pytest.raises(RuntimeError, match="attempt 1 fails"):
        client.submit(flaky, retries=1, pure=False).result(timeout=SHORT)


def test_scatter_list_dict_and_single_object(client):
    data = list(range(100))
    [fut_list] = client.scatter([data])
    assert client.submit(sum, fut_list).result(timeout=SHORT) == sum(data)
    d = client.scatter({"left": 3, "right": 4})
    assert set(d) == {"left", "right"}
    assert d["left"].key == "left"
    assert client.submit(add, d["left"], d["right"]).result(timeout=SHORT) == 7
    one = client.scatter("hello")
    assert one.result(timeout=SHORT) == "hello"
    assert client.gather(client.scatter((1, 2))) == (1, 2)
    # Scattered data is usable from every worker, not only the one holding it.
    results = client.gather([client.submit(len, one, workers=[w]) for w in ("local-0", "local-1")])
    assert results == [5, 5]


def test_result_timeout_raises_timeout_error(client, gates):
    g, _ = gates()
    fut = client.submit(gate, g)
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.2)
    Path(g).touch()
    assert fut.result(timeout=SHORT) == g


# -- waiting on many -----------------------------------------------------------------------


def test_as_completed_yields_every_future_once(client):
    futs = client.map(inc, range(20))
    seen = list(as_completed(futs, timeout=SHORT))
    assert sorted(f.key for f in seen) == sorted(f.key for f in futs)
    assert all(f.done() for f in seen)


def test_as_completed_with_results(client):
    futs = client.map(neg, range(10))
    pairs = list(as_completed(futs, with_results=True, timeout=SHORT))
    assert sorted(r for _, r in pairs) == sorted(-i for i in range(10))
    assert all(f.result() == r for f, r in pairs)


def test_as_completed_with_results_and_errors(client):
    futs = [client.submit(neg, 1), client.submit(boom, "ac")]
    with pytest.raises(ValueError, match="ac"):
        list(as_completed(futs, with_results=True, timeout=SHORT))
    pairs = dict(as_completed(futs, with_results=True, raise_errors=False, timeout=SHORT))
    assert pairs[futs[0]] == -1
    assert isinstance(pairs[futs[1]], ValueError)


def test_as_completed_orders_by_completion_and_accepts_added_futures(client, gates):
    g, _ = gates()
    slow = client.submit(gate, g)
    fast = client.submit(inc, 1)
    ac = as_completed([slow, fast], timeout=SHORT)
    assert next(ac) is fast
    extra = client.submit(inc, 2)
    ac.add(extra)
    assert next(ac) is extra
    Path(g).touch()
    assert next(ac) is slow
    with pytest.raises(StopIteration):
        next(ac)


def test_wait_first_completed_and_all_completed(client, gates):
    g, _ = gates()
    slow = client.submit(gate, g)
    fast = client.submit(inc, 10)
    done, not_done = wait([slow, fast], timeout=SHORT, return_when="FIRST_COMPLETED")
    assert fast in done
    assert slow in not_done and not slow.done()
    with pytest.raises(TimeoutError):
        wait([slow, fast], timeout=0.2)  # ALL_COMPLETED past its timeout
    Path(g).touch()
    done, not_done = wait([slow, fast], timeout=SHORT, return_when="ALL_COMPLETED")
    assert done == {slow, fast} and not not_done


def test_wait_first_exception(client, gates):
    g, _ = gates()
    slow = client.submit(gate, g)
    bad = client.submit(boom, "first-exception")
    done, not_done = wait([slow, bad], timeout=SHORT, return_when="FIRST_EXCEPTION")
    assert done == {bad} and not_done == {slow}
    Path(g).touch()
    assert slow.result(timeout=SHORT) == g


# -- cancelling, callbacks, status ---------------------------------------------------------------


def test_cancel_a_running_task(client, gates):
    g, started = gates()
    fut = client.submit(gate, g, started)
    wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
    assert fut.cancel() is True
    with pytest.raises(shoal.TaskCancelledError):
        fut.result(timeout=SHORT)
    assert fut.cancelled() and fut.done()
    assert isinstance(fut.exception(timeout=SHORT), shoal.TaskCancelledError)
    assert fut.cancel() is False  # already done
    # The cluster is fine afterwards (once the cancelled task lets go of its thread:
    # a running Python function cannot be interrupted).
    Path(g).touch()
    assert client.gather(client.map(inc, range(100, 104))) == [101, 102, 103, 104]


def test_new_work_does_not_wait_behind_a_cancelled_running_task(client, gates):
    g, started = gates()
    fut = client.submit(gate, g, started)
    wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
    fut.cancel()
    with pytest.raises(shoal.TaskCancelledError):
        fut.result(timeout=SHORT)
    futs = client.map(inc, range(200, 204))
    done, not_done = wait(futs, timeout=5, return_when="FIRST_EXCEPTION")
    try:
        assert not not_done, f"{len(not_done)} of 4 tiny tasks still waiting behind a cancelled task"
    finally:
        Path(g).touch()
        wait(futs, timeout=SHORT)


def test_cancel_a_queued_task(client, gates):
    blockers = [gates() for _ in range(2)]
    running = [client.submit(gate, g, s) for g, s in blockers]
    for _, s in blockers:
        wait_for(lambda s=s: os.path.exists(s), SHORT, message="both worker threads to be busy")
    queued = client.submit(inc, 1000)
    client.cancel([queued])
    with pytest.raises(shoal.TaskCancelledError):
        queued.result(timeout=SHORT)
    for g, _ in blockers:
        Path(g).touch()
    assert [f.result(timeout=SHORT) for f in running] == [g for g, _ in blockers]


def test_resubmitting_a_cancelled_key_computes_it_again(client, gates):
    g, started = gates()
    first = client.submit(gate, g, started)
    wait_for(lambda: os.path.exists(started), SHORT, message="the gated task to start")
    first.cancel()
    with pytest.raises(shoal.TaskCancelledError):
        first.result(timeout=SHORT)
    second = client.submit(gate, g, started)
    assert second.key == first.key
    assert not second.cancelled()
    Path(g).touch()
    assert second.result(timeout=SHORT) == g


def test_add_done_callback_is_called_with_the_future(client, gates):
    g, _ = gates()
    calls: queue.Queue = queue.Queue()
    fut = client.submit(gate, g)
    fut.add_done_callback(lambda f: calls.put((f, threading.current_thread().name)))
    assert calls.empty()
    Path(g).touch()
    f, thread_name = calls.get(timeout=SHORT)
    assert f is fut and f.done()
    assert thread_name != threading.main_thread().name
    # Added after completion: called (once) as well.
    fut.add_done_callback(calls.put)
    assert calls.get(timeout=SHORT) is fut
    # Failed futures call back too.
    bad = client.submit(boom, "callback")
    bad.add_done_callback(calls.put)
    assert calls.get(timeout=SHORT) is bad
    assert calls.empty()


def test_exception_and_traceback_of_a_failed_future(client):
    fut = client.submit(boom, "status")
    exc = fut.exception(timeout=SHORT)
    assert isinstance(exc, ValueError)
    assert fut.status == "error" and fut.done() and not fut.cancelled()
    assert "ValueError" in repr(fut)
    assert "boom" in fut.traceback()


# -- data movement ---------------------------------------------------------------------------------


def test_data_moves_between_worker_processes(client):
    producer = client.submit(pid_and_payload, 50_000, workers=["local-0"])
    consumer = client.submit(pid_and_input, producer, workers=["local-1"])
    consumer_pid, producer_pid_seen, data = consumer.result(timeout=SHORT)
    producer_pid, original = producer.result(timeout=SHORT)
    assert producer_pid_seen == producer_pid
    assert consumer_pid != producer_pid
    assert consumer_pid != os.getpid() and producer_pid != os.getpid()
    assert data == original == list(range(50_000))


def test_large_numpy_array_moves_between_workers(client):
    np = pytest.importorskip("numpy")

    def make(n, seed):
        rng = np.random.default_rng(seed)
        return os.getpid(), rng.random(n), np.arange(n, dtype="int64")  # incompressible + compressible

    def check(t):
        pid, noise, ramp = t
        return os.getpid(), pid, float(noise.sum()), int(ramp.sum()), noise.dtype.str, ramp.shape

    n = 1_000_000
    producer = client.submit(make, n, 7, workers=["local-0"])
    consumer = client.submit(check, producer, workers=["local-1"])
    cpid, ppid, noise_sum, ramp_sum, dtype, shape = consumer.result(timeout=STARTUP)
    expected_noise = float(np.random.default_rng(7).random(n).sum())
    assert cpid != ppid
    assert noise_sum == pytest.approx(expected_noise)
    assert ramp_sum == n * (n - 1) // 2
    assert (dtype, shape) == ("<f8", (n,))
    _, noise, ramp = producer.result(timeout=STARTUP)  # and to the client
    assert float(noise.sum()) == pytest.approx(expected_noise)
    assert ramp[-1] == n - 1


# -- async use ----------------------------------------------------------------------------------------


def test_await_futures_of_a_sync_client_from_async_code(client):
    async def main():
        fut = client.submit(inc, 1)
        futs = client.map(neg, range(3))
        return await fut, [await f for f in futs]

    assert asyncio.run(asyncio.wait_for(main(), SHORT)) == (2, [0, -1, -2])


def test_asynchronous_client(cluster):
    async def main():
        client = await Client(cluster, asynchronous=True, timeout=STARTUP)
        try:
            assert client.status == "running"
            await client.wait_for_workers(2, timeout=SHORT)
            assert len(client.workers) == 2
            fut = client.submit(inc, 1)
            assert await fut == 2
            futs = client.map(inc, range(10))
            assert await client.gather(futs) == list(range(1, 11))
            assert await client.gather({"x": [futs[0]], "y": futs[1]}) == {"x": [1], "y": 2}
            seen = [r async for _, r in as_completed(futs, with_results=True)]
            assert sorted(seen) == list(range(1, 11))
            bad = client.submit(boom, "async")
            with pytest.raises(ValueError, match="async"):
                await bad
        finally:
            await client.close()
        assert client.status == "closed"

    asyncio.run(asyncio.wait_for(main(), STARTUP))


def test_async_with_asynchronous_client_closes_cleanly(cluster):
    async def main():
        async with Client(cluster, asynchronous=True, timeout=STARTUP) as client:
            assert await client.submit(add, 3, 4) == 7
        return client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = asyncio.run(asyncio.wait_for(main(), STARTUP))
        gc.collect()
    assert client.status == "closed"
    never_awaited = [w for w in caught if "never awaited" in str(w.message)]
    assert not never_awaited, [str(w.message) for w in never_awaited]


# -- client lifetime -------------------------------------------------------------------------------------


def test_client_context_manager_closes_and_cancels_pending(cluster, gates):
    g, _ = gates()
    with Client(cluster, timeout=STARTUP) as client:
        assert client.status == "running"
        assert client.submit(inc, 1).result(timeout=SHORT) == 2
        pending = client.submit(gate, g)
    assert client.status == "closed"
    assert pending.cancelled()
    Path(g).touch()  # the cancelled task still runs on its worker until it returns
    with pytest.raises(shoal.TaskCancelledError):
        pending.result(timeout=SHORT)
    with pytest.raises(shoal.CommClosedError):
        client.submit(inc, 1)
    # Other clients of the same cluster are unaffected.
    with Client(cluster, timeout=STARTUP) as other:
        assert other.submit(inc, 2).result(timeout=SHORT) == 3


def test_close_while_a_dropped_pending_future_is_still_watched(cluster, gates):
    g, _ = gates()
    client = Client(cluster, timeout=STARTUP)

    def submit_wait_and_drop():
        fut = client.submit(gate, g)
        done, _ = wait([fut], timeout=0.05, return_when="FIRST_COMPLETED")
        assert not done

    submit_wait_and_drop()
    try:
        client.close()
    finally:
        Path(g).touch()
        if client.status != "closed":
            client.close()
    assert client.status == "closed"


class Point:
    """A class from a module that workers cannot import (shipped by value with cloudpickle)."""

    def __init__(self, x, y):
        self.x, self.y = x, y


def norm1(p):
    return abs(p.x) + abs(p.y)


def test_argument_of_a_class_from_a_module_registered_by_value(client):
    fut = client.submit(norm1, Point(3, -4))
    assert fut.result(timeout=SHORT) == 7


def test_two_clients_share_a_cluster_and_a_key(cluster):
    with Client(cluster, timeout=STARTUP) as a, Client(cluster, timeout=STARTUP) as b:
        fa = a.submit(inc, 12345)
        fb = b.submit(inc, 12345)
        assert fa.key == fb.key
        assert fa.result(timeout=SHORT) == fb.result(timeout=SHORT) == 12346
        a.close()
        # b still holds the key: its data survives a's departure.
        assert b.submit(inc, fb).result(timeout=SHORT) == 12347


def test_submitted_linear_chain_runs_fused_unless_asked_not_to(client):
    from shoal.spec import Task, TaskRef

    graph = {"link-0": Task("link-0", inc, 0)}
    for i in range(1, 40):
        graph[f"link-{i}"] = Task(f"link-{i}", inc, TaskRef(f"link-{i - 1}"))
    (fut,) = client.submit_graph(graph, ["link-39"])
    assert fut.result(timeout=SHORT) == 40
    # Fused: the scheduler only ever knew the tasks left after fusion.
    assert client.scheduler_info()["n_tasks"] <= 2
    del fut
    wait_for(lambda: client.scheduler_info()["n_tasks"] == 0, SHORT, message="the fused chain released")
    (fut,) = client.submit_graph(graph, ["link-39"], fuse=False)
    assert fut.result(timeout=SHORT) == 40
    assert client.scheduler_info()["n_tasks"] == 40  # every link, for lineage
