"""Dask collections on Shoal (``shoal.integrations.dask``).

Results are compared with Dask's synchronous scheduler.  Side effects that
must happen a given number of times (a shared task, a persisted partition)
append a line to a file, so they are counted across worker processes.
Task functions travel by value (``tasks_by_value``), so worker processes need
not import this module.
"""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

dask = pytest.importorskip("dask")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import dask.dataframe as dd  # noqa: E402
from dask import _task_spec as dts  # noqa: E402
from dask.core import flatten  # noqa: E402
from dask.delayed import delayed  # noqa: E402

from shoal import Client, Future, LocalCluster, spec  # noqa: E402
from shoal import wait as shoal_wait  # noqa: E402
from shoal.integrations import dask as shoal_dask  # noqa: E402

TIMEOUT = 20


# -- task functions ----------------------------------------------------------------


def record(path, value):
    """Return ``value``, counting the call in the file at ``path``."""
    with open(path, "a") as f:
        f.write("x\n")
    return value


def count(path) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.read().splitlines())


def counted_item(item, path):
    return record(path, item)


def counted_block(block, path):
    record(path, None)
    return block + 1


def counted_partition(df, path):
    record(path, None)
    return df.assign(v=df.v * 2)


def block_pid(block):
    return np.full(block.shape, os.getpid())


def pid(*_):
    return os.getpid()


def stamp(*_):
    return time.monotonic_ns()


def flaky(path, fails):
    """Fail the first ``fails`` calls (counted in ``path``), then succeed."""
    n = count(path)
    record(path, None)
    if n < fails:
        raise ValueError(f"flaky failure {n}")
    return "ok"


def inc(x):
    return x + 1


def show(*args, **kwargs):
    return repr((args, sorted(kwargs.items())))


def wait_for(predicate, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def futures_in(collection) -> list:
    return [v for v in dict(collection.__dask_graph__()).values() if isinstance(v, Future)]


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def tasks_by_value():
    """Pickle this module's functions by value while its tests run, and only then."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:  # Dask's default scheduler while open
        yield c


@pytest.fixture(scope="module")
def inproc():
    """One worker with one thread, in this process: its scheduler state can be read."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as c:
        yield c


@pytest.fixture(scope="module")
def iclient(inproc):
    with Client(inproc, set_as_default=False) as c:
        yield c


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "calls")


def worker_pids(cluster) -> dict:
    return cluster.worker_pids()


def sched(inproc, fn):
    """Run ``fn(scheduler_state)`` on the in-process cluster's event loop."""

    async def call():
        return fn(inproc._scheduler.state)

    return inproc._inproc.run(call(), TIMEOUT)


def task_state(inproc, key):
    return sched(inproc, lambda s: s.tasks[key].state.value if key in s.tasks else None)


# -- conversion (no cluster) ---------------------------------------------------------


def run_graph(graph: dict, keys: list) -> list:
    """Execute a Shoal graph here, in order, after a pickle round trip."""
    graph = cloudpickle.loads(cloudpickle.dumps(graph))
    prio = spec.order(graph)
    data: dict = {}
    for k in sorted(graph, key=prio.__getitem__):
        data[k] = graph[k](data)
    return [data[k] for k in keys]


def test_convert_legacy_graph():
    dsk = {
        "a": 1,
        "b": (operator.add, "a", 2),
        "c": (sum, ["a", "b", 10]),
        "d": "c",
        ("t-abc", 0): (tuple, ["a", "b"]),
        "e": (show, {"x": "a"}, "not-a-key", ("t-abc", 0)),
    }
    graph = shoal_dask.convert_graph(dsk)
    assert set(graph) == set(dsk)  # keys, tuples included, unchanged
    assert isinstance(graph["a"], spec.DataNode)
    assert isinstance(graph["d"], spec.Alias) and graph["d"].target == "c"
    assert graph["c"].dependencies == {"a", "b"}
    assert graph["e"].dependencies == {("t-abc", 0)}  # as in Dask, dict arguments are literals
    keys = list(dsk)
    assert run_graph(graph, keys) == list(dask.get(dsk, keys))


def test_convert_task_spec_objects_like_dask():
    T, R = dts.Task, dts.TaskRef
    dsk = {
        "a": dts.DataNode("a", [1, 2]),
        "b": T("b", show, R("a"), dts.List(R("a"), 3), dts.Dict(k=R("a")), dts.Tuple(1, R("a")),
               dts.Set(1, 2), dts.DataNode(None, {"lit": 1}), kw=T(None, len, R("a"))),
        "c": dts.Alias("c", "b"),
        # Dask passes plain containers through unevaluated, TaskRef objects and all.
        "d": T("d", show, [R("a"), 1], {"k": R("a")}),
        ("x-abc", 3): T(("x-abc", 3), operator.add, dts.DataNode(None, 5), 1),
        "e": T("e", show, dts.Dict({("tuple", "key"): R("a")}), dts.List(dts.List(R("c")))),
    }
    graph = shoal_dask.convert_graph(dsk)
    assert set(graph) == set(dsk)
    assert graph["b"].dependencies == {"a"}
    assert graph["d"].dependencies == frozenset()
    keys = list(dsk)
    expected = dts.execute_graph(dict(dsk))
    assert run_graph(graph, keys) == [expected[k] for k in keys]


class Doubling(dts.Task):
    """A Task subclass with its own ``__call__``: run as Dask would."""

    def __call__(self, values=()):
        return 2 * super().__call__(values)


def test_convert_unknown_node_type_runs_it_as_dask_would():
    dsk = {"a": dts.DataNode("a", 3), "b": Doubling("b", operator.add, dts.TaskRef("a"), 1)}
    graph = shoal_dask.convert_graph(dsk)
    assert graph["b"].dependencies == {"a"}
    assert run_graph(graph, ["b"]) == [8]


def test_convert_high_level_graph_and_expression():
    x = da.arange(10, chunks=3) + 1
    graph = shoal_dask.convert_graph(x.__dask_graph__())
    assert set(graph) == set(dict(x.__dask_graph__()))
    keys = list(flatten(x.__dask_keys__()))
    assert np.concatenate(run_graph(graph, keys)).tolist() == list(range(1, 11))


# -- collections, compared with the synchronous scheduler ------------------------------------


def test_default_scheduler_while_client_open(client):
    assert dask.config.get("scheduler") == "shoal"
    assert dask.config.get("dataframe.shuffle.method") == "tasks"
    # Tasks run in the workers' processes, not here.
    assert delayed(pid)().compute() in worker_pids(client._cluster).values()


def test_delayed_diamond_and_shared_subgraph_computed_once(client, path):
    root = delayed(record)(path, 10)
    left = delayed(operator.add)(root, 1)
    right = delayed(operator.mul)(root, 2)
    top = delayed(operator.sub)(right, left)
    other = delayed(inc)(left)
    assert dask.compute(top, other) == (9, 12)
    assert count(path) == 1  # the shared root ran once for both results
    assert dask.compute(top, other, scheduler="sync") == (9, 12)


def test_delayed_containers_and_kwargs(client):
    a = delayed(inc)(1)
    b = delayed(show)([a, 2], {"k": a}, (a,), kw=a)
    assert b.compute() == b.compute(scheduler="sync")
    assert dask.compute({"x": a, "y": [a, 3]}) == ({"x": 2, "y": [2, 3]},)


def test_delayed_error_propagates(client):
    d = delayed(operator.truediv)(1, 0)
    with pytest.raises(ZeroDivisionError):
        d.compute()


ARRAY_CASES = {
    "rechunk": lambda x: x.rechunk((7, 30)),
    "reductions": lambda x: da.stack([x.sum(axis=0), x.mean(axis=0), x.std(axis=0), x.max(axis=0)]),
    "matmul": lambda x: x @ x.T,
    "slicing": lambda x: x[5:45:3, ::-2][x[5:45:3, 0] > 0.5],
    "cumsum": lambda x: x.cumsum(axis=1),
}


# Tasks whose pickled spec carries NumPy/pandas buffers (embedded data, meta,
# quantiles): the regression for payloads with out-of-band buffers.
def test_embedded_numpy_and_pandas_data(client):
    assert da.from_array(np.arange(10), chunks=5).sum().compute() == 45
    pdf = pd.DataFrame({"a": [1, 2, 3]})
    assert dd.from_pandas(pdf, npartitions=2).a.sum().compute() == 6



def generate(i, j):
    return np.sin(i * 40 + j)


@pytest.mark.parametrize(
    "case", sorted(ARRAY_CASES)
)
def test_array(client, case):
    x = da.fromfunction(generate, shape=(50, 40), chunks=(10, 15), dtype=float)  # made on the workers
    y = ARRAY_CASES[case](x)
    np.testing.assert_allclose(y.compute(), y.compute(scheduler="sync"))


def make_left(i):
    rng = np.random.default_rng(i)
    return pd.DataFrame(
        {"k": rng.integers(0, 10, 40), "v": rng.random(40), "i": np.arange(i * 40, (i + 1) * 40)},
        index=pd.RangeIndex(i * 40, (i + 1) * 40),
    )


def make_right(i):
    k = np.arange(i * 5, (i + 1) * 5)
    return pd.DataFrame({"k": k, "w": k * 10.0}, index=pd.RangeIndex(i * 5, (i + 1) * 5))


def frames():
    """Two dataframes whose partitions are made on the workers."""
    left = dd.from_map(make_left, range(5), divisions=[0, 40, 80, 120, 160, 199])
    right = dd.from_map(make_right, range(2), divisions=[0, 5, 9])
    return left, right


DATAFRAME_CASES = {
    "groupby-agg": lambda a, b: a.groupby("k").agg({"v": ["sum", "mean"], "i": "max"}),
    "merge": lambda a, b: dd.merge(a, b, on="k", shuffle_method="tasks"),
    "join": lambda a, b: a.set_index("k", shuffle_method="tasks").join(b.set_index("k"), how="inner"),
    "set_index": lambda a, b: a.set_index("v", shuffle_method="tasks"),
    "rolling": lambda a, b: a.v.rolling(5).sum(),
}


@pytest.mark.parametrize(
    "case", sorted(DATAFRAME_CASES)
)
def test_dataframe(client, case):
    result = DATAFRAME_CASES[case](*frames())
    pd.testing.assert_frame_equal(canonical(result.compute()), canonical(result.compute(scheduler="sync")))


def canonical(obj) -> pd.DataFrame:
    """A frame or series as a frame in a fixed row order, index as a column."""
    df = (obj.to_frame() if isinstance(obj, pd.Series) else obj).reset_index()
    df.columns = [str(c) for c in df.columns]
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_bag(client):
    b = db.from_sequence(range(100), npartitions=7)
    mapped = b.map(lambda v: v * 3).filter(lambda v: v % 2)
    folded = mapped.foldby(lambda v: v % 5, operator.add, 0)
    assert sorted(mapped.compute()) == sorted(mapped.compute(scheduler="sync"))
    assert sorted(folded.compute()) == sorted(folded.compute(scheduler="sync"))
    assert b.sum().compute() == 4950


def test_dask_compute_several_collections(client, path):
    shared = da.from_delayed(delayed(np.arange)(delayed(record)(path, 10)), shape=(10,), dtype=int)
    a, b = dask.compute(shared.sum(), (shared * 2).max())
    assert (a, b) == (45, 18)
    assert count(path) == 1


# -- the get protocol, compute, persist -------------------------------------------------------


def test_compute_with_client_get(client):
    x = da.ones((20, 20), chunks=5)
    assert x.sum().compute(scheduler=client.get) == 400
    assert dask.compute(x.sum(), x.mean(), scheduler=client) == (400, 1)


def test_get_protocol_nested_keys_and_tuple_keys(client):
    dsk = {("x-abc", 3): 1, "y": (operator.add, ("x-abc", 3), 1), "z": (inc, "y"), "unused": (operator.truediv, 1, 0)}
    assert client.get(dsk, "z") == 3
    assert client.get(dsk, [["y", ("x-abc", 3)], "z"]) == [[2, 1], 3]
    futures = client.get(dsk, ["z"], sync=False)
    assert isinstance(futures[0], Future) and futures[0].result(TIMEOUT) == 3


def test_client_compute_returns_futures(client):
    x = da.arange(100, chunks=10)
    fut = client.compute(x.sum())
    assert isinstance(fut, Future) and fut.result(TIMEOUT) == 4950
    f1, f2, plain = client.compute([x.max(), delayed(inc)(1), 5])
    assert (f1.result(TIMEOUT), f2.result(TIMEOUT), plain) == (99, 2, 5)
    assert client.compute([x.min(), x.max()], sync=True) == [0, 99]
    np.testing.assert_array_equal(client.compute(x[::10]).result(TIMEOUT), np.arange(0, 100, 10))


def test_persist_then_reuse_without_recomputation(client, path):
    x = da.zeros(40, chunks=10, dtype=int).map_blocks(counted_block, path, dtype=int)
    before = count(path)  # Dask may call the function on empty blocks, locally
    p = client.persist(x)
    assert type(p) is type(x) and p.chunks == x.chunks
    held = futures_in(p)
    assert len(held) == 4
    shoal_wait(held, timeout=TIMEOUT)
    assert count(path) == before + 4
    assert (p * 2).sum().compute() == 80
    assert p.sum().compute() == 40
    np.testing.assert_array_equal(p.compute(), np.ones(40))
    assert count(path) == before + 4  # nothing recomputed
    # The new graph names the persisted keys without holding their data.
    graph = shoal_dask.convert_graph((p * 2).sum().__dask_graph__())
    deps = set().union(*(n.dependencies for n in graph.values()))
    assert {f.key for f in held} <= deps - set(graph)
    assert not any(isinstance(n, spec.DataNode) for n in graph.values())


def test_persist_through_dask_and_methods(client, path):
    x = da.zeros(20, chunks=5, dtype=int).map_blocks(counted_block, path, dtype=int)
    before = count(path)
    (p,) = dask.persist(x)  # the default scheduler's persist: no data comes back
    assert len(futures_in(p)) == 4
    d = delayed(record)(path, 7).persist()
    assert d.compute() == 7 and (d + 1).compute() == 8
    assert p.sum().compute() == 20
    assert count(path) == before + 5


def counted_left(i, path):
    record(path, None)
    return make_left(i)


def test_persist_dataframe(client, path):
    meta = make_left(0).iloc[:0]
    df = dd.from_map(counted_left, range(5), path=path, meta=meta, divisions=[0, 40, 80, 120, 160, 199])
    before = count(path)
    p = client.persist(df)
    assert isinstance(p, dd.DataFrame) and p.divisions == df.divisions
    assert len(futures_in(p)) == 5
    want = pd.concat([make_left(i) for i in range(5)])
    got = p.groupby("k").v.sum().compute()
    pd.testing.assert_series_equal(got.sort_index(), want.groupby("k").v.sum().sort_index())
    assert p.i.max().compute() == want.i.max()
    assert count(path) == before + 5  # each partition made once


def test_persist_bag(client, path):
    b = client.persist(db.from_sequence(range(10), npartitions=3).map(counted_item, path))
    assert b.sum().compute() == 45 and sorted(b.compute()) == list(range(10))
    assert count(path) == 10


def test_shoal_future_inside_dask_graph(client):
    fut = client.submit(inc, 40)
    assert delayed(inc)(fut).compute() == 42
    assert delayed(sum)([fut, fut, 1]).compute() == 83
    assert delayed(show)(kw=fut).compute() == show(kw=41)
    assert dask.delayed(fut).compute() == 41
    arr = da.from_delayed(delayed(fut), shape=(), dtype=int)
    assert (arr + 1).compute() == 42


# -- annotations ----------------------------------------------------------------------------


def test_annotation_workers_places_tasks(client, cluster):
    pids = worker_pids(cluster)
    with dask.annotate(workers=["local-1"]):  # around construction: layer annotations
        tasks = [delayed(pid, pure=False)(i) for i in range(6)]
        blocks = da.zeros(8, chunks=1).map_blocks(block_pid)
        items = db.from_sequence(range(8), npartitions=4).map(pid)
    # Dask's own low-level fusion drops layer annotations; these survive it.
    assert set(dask.compute(*tasks)) == {pids["local-1"]}
    assert set(blocks.compute().tolist()) == {pids["local-1"]}
    assert set(items.compute()) == {pids["local-1"]}
    with dask.annotate(workers=["local-0"]):  # around the computation
        assert set(da.zeros(8, chunks=1).map_blocks(block_pid).compute().tolist()) == {pids["local-0"]}
    assert client.get({"p": (pid, 1)}, "p", workers=["local-1"]) == pids["local-1"]
    with dask.annotate(workers=["local-0"]):
        d = delayed(pid, pure=False)()
    assert client.get(d.__dask_graph__(), d.key) == pids["local-0"]  # a HighLevelGraph's layers


def test_annotation_priority_orders_execution(iclient):
    # One worker thread runs everything: start times give the execution order.
    # Each group goes first exactly when it is the one annotated.
    for first in ("a", "b"):
        groups = {}
        for name in ("a", "b"):
            with dask.annotate(priority=10 if name == first else 0):
                groups[name] = [delayed(stamp, pure=False)(name, i) for i in range(6)]
        a, b = dask.compute(groups["a"], groups["b"], scheduler=iclient.get)
        if first == "a":
            assert max(a) < min(b)
        else:
            assert max(b) < min(a)


def test_annotation_retries(client, tmp_path):
    with dask.annotate(retries=2):
        ok = delayed(flaky)(str(tmp_path / "a"), 2)
    assert ok.compute() == "ok"
    assert count(str(tmp_path / "a")) == 3
    with pytest.raises(ValueError, match="flaky failure 0"):
        delayed(flaky)(str(tmp_path / "b"), 2).compute()
    with dask.annotate(retries=1):  # around the computation
        assert delayed(flaky)(str(tmp_path / "c"), 1).compute() == "ok"


def test_annotation_resources_wait_for_a_worker_with_them(iclient, inproc):
    from shoal.worker.server import Worker

    with dask.annotate(resources={"GPU": 1}):
        d = delayed(stamp, pure=False)("gpu")
    fut = iclient.compute(d)
    wait_for(lambda: task_state(inproc, fut.key) == "no-worker", what="the task to wait for a GPU")
    assert not fut.done()

    async def start():
        return await Worker(inproc.scheduler_address, nthreads=1, name="gpu-worker", resources={"GPU": 2}).start()

    worker = inproc._inproc.run(start(), TIMEOUT)
    try:
        assert isinstance(fut.result(TIMEOUT), int)
        holders = sched(inproc, lambda s: {w.name for w in s.tasks[fut.key].who_has})
        assert holders == {"gpu-worker"}
    finally:
        fut.release()
        inproc._inproc.run(worker.close("test over"), TIMEOUT)


def test_annotation_allow_other_workers(iclient, inproc):
    with dask.annotate(workers=["nowhere"]):
        stuck = iclient.compute(delayed(stamp, pure=False)("stuck"))
    wait_for(lambda: task_state(inproc, stuck.key) == "no-worker", what="the restricted task to wait")
    stuck.cancel()
    with dask.annotate(workers=["nowhere"], allow_other_workers=True):
        loose = delayed(stamp, pure=False)("loose")
    assert isinstance(loose.compute(scheduler=iclient.get), int)


def test_annotations_reach_the_scheduler(iclient, inproc):
    with dask.annotate(priority=7, retries=4, resources={"CPU": 1}):
        d = delayed(stamp, pure=False)("annotated")
    with dask.annotate(workers=["local-0"], allow_other_workers=True):
        fut = iclient.compute(d)
        wait_for(lambda: task_state(inproc, fut.key) in ("no-worker", "memory"), what="the task")

    def record_of(s):
        ts = s.tasks[fut.key]
        return ts.priority[0], ts.retries, ts.resources, ts.workers, ts.allow_other_workers

    assert sched(inproc, record_of) == (-7, 4, {"CPU": 1.0}, frozenset(["local-0"]), True)
    fut.cancel()


# -- configuration and packaging ---------------------------------------------------------


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_default_scheduler_follows_clients_and_restores_config():
    out = run_python(
        """
        import os, dask
        from dask.delayed import delayed
        from shoal import Client, LocalCluster
        with dask.config.set(scheduler="threads"):
            with LocalCluster(n_workers=1, processes=False) as local, LocalCluster(n_workers=1) as remote:
                a = Client(remote)
                b = Client(local)
                assert dask.config.get("scheduler") == "shoal"
                assert dask.config.get("dataframe.shuffle.method") == "tasks"
                assert delayed(os.getpid)().compute() == os.getpid()  # b, the newest
                b.close()
                assert delayed(os.getpid)().compute() != os.getpid()  # a again
                a.close()
                assert dask.config.get("scheduler") == "threads"
                assert dask.config.get("dataframe.shuffle.method", None) is None
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_import_shoal_without_dask():
    out = run_python(
        """
        import sys
        sys.modules["dask"] = None  # import dask -> ImportError
        import shoal
        from shoal import Client, LocalCluster
        with LocalCluster(n_workers=1, processes=False) as c, Client(c) as client:
            assert client.submit(sum, [1, 2]).result() == 3
        try:
            import shoal.integrations.dask
        except ImportError:
            print("ok")
        """
    )
    assert out.strip() == "ok"
