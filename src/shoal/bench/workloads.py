"""The public workloads of BENCHMARKS.md, by name (``merge-5000``, ``tree-12`` ...).

A workload has three parts:

* ``prepare()`` -- everything done before the clock starts: inputs, the Dask
  collection, the expected result (computed locally, once, and shared by the
  systems);
* ``run(system, prepared)`` -- the timed part: submit, wait, bring the
  result to the client;
* ``check(value, prepared)`` -- also timed: the result is checked before the
  clock stops.  A wrong result raises :class:`WrongResult`.

Futures workloads (merge, tree, map, chain, zero) use only ``submit``,
``map`` and ``gather``, so the very same code runs on Shoal's client and on
dask.distributed's, with the same functions from :mod:`shoal.bench.functions`.
Collection workloads (bag, numpy, groupby, join) are real Dask collections
computed with ``collection.compute(scheduler=<the system's get>)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .functions import add, inc, is_even, sum_all
from .systems import Skip


class WrongResult(AssertionError):
    pass


@dataclass
class Family:
    name: str
    param: str  # what the number means
    example: str
    description: str
    kind: str  # "futures" | "collection" | "zero"
    build: Callable[[int], "Workload"]
    modules: tuple = ()
    systems: tuple | None = None  # None: every system


@dataclass
class Workload:
    name: str
    family: Family
    n: int
    n_tasks: int | None
    prepare: Callable[[], Any]
    run: Callable[[Any, Any], Any]
    check: Callable[[Any, Any], None]
    notes: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def modules(self) -> tuple:
        return self.family.modules

    def applies_to(self, system_name: str) -> bool:
        return self.family.systems is None or system_name in self.family.systems


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise WrongResult(what)


# -- futures workloads ------------------------------------------------------------------------


def _merge(n: int) -> Workload:
    expected = n * (n + 1) // 2

    def run(system, inputs):
        c = system.client
        futs = c.map(inc, inputs, pure=False)
        total = c.submit(sum_all, futs, pure=False)
        return c.gather(total)

    def check(value, inputs):
        _expect(value == expected, f"merge-{n}: got {value!r}, expected {expected}")

    return Workload(f"merge-{n}", FAMILIES["merge"], n, n + 1, lambda: list(range(n)), run, check)


def _zero(n: int) -> Workload:
    # merge-N on zero workers: tasks are reported finished without running,
    # and the (fake) result is None; what is timed is the runtime alone.
    def run(system, inputs):
        c = system.client
        futs = c.map(inc, inputs, pure=False)
        total = c.submit(sum_all, futs, pure=False)
        value = c.gather(total)
        return total.status, value

    def check(value, inputs):
        _expect(value == ("finished", None), f"zero-{n}: got {value!r}, expected ('finished', None) from a zero worker")

    return Workload(f"zero-{n}", FAMILIES["zero"], n, n + 1, lambda: list(range(n)), run, check)


def _tree(k: int) -> Workload:
    leaves = 2**k
    expected = leaves * (leaves + 1) // 2

    def run(system, inputs):
        c = system.client
        layer = c.map(inc, inputs, pure=False)
        while len(layer) > 1:
            layer = [c.submit(add, layer[i], layer[i + 1], pure=False) for i in range(0, len(layer), 2)]
        return c.gather(layer[0])

    def check(value, inputs):
        _expect(value == expected, f"tree-{k}: got {value!r}, expected {expected}")

    return Workload(f"tree-{k}", FAMILIES["tree"], k, 2 * leaves - 1, lambda: list(range(leaves)), run, check)


def _map(n: int) -> Workload:
    expected = n * (n + 1) // 2

    def run(system, inputs):
        c = system.client
        return c.gather(c.map(inc, inputs, pure=False))

    def check(value, inputs):
        _expect(len(value) == n and sum(value) == expected and value[-1] == n, f"map-{n}: wrong results")

    return Workload(f"map-{n}", FAMILIES["map"], n, n, lambda: list(range(n)), run, check)


def _chain(n: int) -> Workload:
    def run(system, _):
        c = system.client
        f = c.submit(inc, 0, pure=False)
        for _ in range(n - 1):
            f = c.submit(inc, f, pure=False)
        return c.gather(f)

    def check(value, _):
        _expect(value == n, f"chain-{n}: got {value!r}, expected {n}")

    return Workload(f"chain-{n}", FAMILIES["chain"], n, n, lambda: None, run, check)


# -- Dask collections ---------------------------------------------------------------------------


def count_tasks(collection) -> int | None:
    """Tasks in the graph ``dask.compute`` would schedule (optimized)."""
    try:
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr

        expr = FinalizeCompute(collections_to_expr([collection], True)).optimize()
        return len(expr.__dask_graph__())
    except Exception:
        try:
            return len(collection.__dask_graph__())
        except Exception:
            return None


class _Prepared:
    __slots__ = ("collection", "expected")

    def __init__(self, collection, expected):
        self.collection = collection
        self.expected = expected


def _collection_workload(name: str, family: "Family", n: int, make: Callable[[], Any], check_value) -> Workload:
    cache: dict = {}

    def prepare():
        if "p" not in cache:
            coll = make()
            # The reference result: the same graph on dask's local synchronous
            # scheduler, computed once (outside the clock) for every system.
            cache["p"] = _Prepared(coll, coll.compute(scheduler="sync"))
            wl.n_tasks = count_tasks(coll)
        return cache["p"]

    def run(system, prep):
        get, reason = system.dask_get()
        if get is None:
            raise Skip(reason)
        try:
            return prep.collection.compute(scheduler=get)
        except NotImplementedError as e:
            raise Skip(f"{type(e).__name__}: {e}") from e

    def check(value, prep):
        check_value(value, prep.expected)

    wl = Workload(name, family, n, None, prepare, run, check)
    return wl


def _close(a, b) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def _bag(p: int) -> Workload:
    def make():
        import dask.bag as db

        return db.range(500 * p, npartitions=p).map(inc).filter(is_even).sum()

    def check(value, expected):
        _expect(value == expected, f"bag-{p}: got {value!r}, expected {expected!r}")

    return _collection_workload(f"bag-{p}", FAMILIES["bag"], p, make, check)


def _numpy(n: int) -> Workload:
    def make():
        import dask.array as da

        c = max(1, n // 10)
        x = da.random.default_rng(0).random((n, n), chunks=(c, c))
        return (x + x.T)[::2, ::2].sum()

    def check(value, expected):
        _expect(_close(value, expected), f"numpy-{n}: got {value!r}, expected {expected!r}")

    return _collection_workload(f"numpy-{n}", FAMILIES["numpy"], n, make, check)


def _groupby(p: int) -> Workload:
    def make():
        import dask
        import pandas as pd

        start = pd.Timestamp("2000-01-01")
        end = start + pd.Timedelta(days=p)
        ts = dask.datasets.timeseries(start=start, end=end, freq="1s", partition_freq="1D", seed=0)
        return ts.groupby("name").x.sum()

    def check(value, expected):
        import pandas as pd

        try:
            pd.testing.assert_series_equal(value.sort_index(), expected.sort_index(), check_exact=False, rtol=1e-9)
        except AssertionError as e:
            raise WrongResult(f"groupby-{p}: {e}") from None

    return _collection_workload(f"groupby-{p}", FAMILIES["groupby"], p, make, check)


def _join(p: int) -> Workload:
    def make():
        import dask.dataframe as dd
        import numpy as np
        import pandas as pd

        rng = np.random.default_rng(0)
        m = 10_000
        left = pd.DataFrame({"k": rng.integers(0, m, 20_000 * p), "v": rng.random(20_000 * p)})
        right = pd.DataFrame({"k": np.arange(m), "w": rng.random(m)})
        lhs = dd.from_pandas(left, npartitions=p)
        rhs = dd.from_pandas(right, npartitions=p)
        # A hash join with task-based shuffles: the same graph on every
        # system (dask would pick its P2P shuffle extension otherwise).
        j = lhs.merge(rhs, on="k", shuffle_method="tasks", broadcast=False)
        return (j.v * j.w).sum()

    def check(value, expected):
        _expect(_close(value, expected), f"join-{p}: got {value!r}, expected {expected!r}")

    return _collection_workload(f"join-{p}", FAMILIES["join"], p, make, check)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("merge", "N", "merge-5000", "N `inc` tasks, then one `sum_all` over all of them", "futures", _merge),
        Family("tree", "K", "tree-12", "binary reduction (`add`) over 2^K `inc` leaves: 2^(K+1)-1 tasks", "futures", _tree),
        Family("map", "N", "map-5000", "client.map(inc, range(N)), results gathered", "futures", _map),
        Family("chain", "N", "chain-1000", "N tasks, each depending on the previous one (round-trip latency)", "futures", _chain),
        Family("bag", "P", "bag-200", "dask.bag range(500P).map(inc).filter(is_even).sum(), P partitions",
               "collection", _bag, modules=("dask.bag",)),
        Family("numpy", "N", "numpy-4000", "dask.array (x + x.T)[::2, ::2].sum(), N x N random, 10x10 chunks",
               "collection", _numpy, modules=("numpy", "dask.array")),
        Family("groupby", "P", "groupby-50", "dask.dataframe timeseries (P days at 1s) groupby('name').x.sum()",
               "collection", _groupby, modules=("pandas", "dask.dataframe")),
        Family("join", "P", "join-20", "dask.dataframe hash join (task shuffle) of 20000P x 10000 rows, P partitions",
               "collection", _join, modules=("pandas", "dask.dataframe")),
        Family("zero", "N", "zero-100000", "merge-N on zero workers (Shoal only): the runtime's own per-task cost",
               "zero", _zero, systems=("shoal",)),
    ]
}

_NAME = re.compile(r"^([a-z]+)-([0-9_]+(?:\.[0-9]+)?)([kKmM]?)$")


def parse(name: str) -> Workload:
    """``merge-5000``, ``zero-100k``, ``merge-1M`` -> a Workload."""
    m = _NAME.match(name.strip())
    if not m or m.group(1) not in FAMILIES:
        known = ", ".join(f.example for f in FAMILIES.values())
        raise ValueError(f"unknown workload {name!r}; known: {known}")
    value = float(m.group(2).replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6}[m.group(3).lower()]
    n = int(value)
    if n != value or n < 1:
        raise ValueError(f"workload {name!r}: the size must be a positive integer")
    fam = FAMILIES[m.group(1)]
    if fam.name == "tree" and n > 24:
        raise ValueError(f"{name}: tree-K takes K (2^K leaves); K={n} is too large")
    return fam.build(n)
