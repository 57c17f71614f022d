"""Task objects and graph helpers (``shoal.spec``)."""

from __future__ import annotations

import pickle
import random

import cloudpickle
import pytest

from shoal.errors import CycleError, GraphError, MissingDependencyError
from shoal.spec import (
    Alias,
    DataNode,
    Literal,
    Task,
    TaskRef,
    cull,
    dependencies,
    dependents,
    fuse_linear,
    order,
    validate_graph,
)


def ident(*args, **kwargs):
    return args, kwargs


def inc(x):
    return x + 1


def add(x, y):
    return x + y


# -- dependencies -----------------------------------------------------------------


def test_dependencies_found_in_nested_containers():
    t = Task(
        "t",
        ident,
        TaskRef("a"),
        [1, (TaskRef("b"), [TaskRef("c")])],
        {"k": {"kk": TaskRef("d")}},
        {TaskRef("e")},
        frozenset([TaskRef("f")]),
        kw=[{"x": (TaskRef("g"),)}],
    )
    assert t.dependencies == frozenset("abcdefg")


def test_dependencies_of_nested_tasks_belong_to_the_outer_task():
    inner = Task(None, add, TaskRef("x"), Task(None, inc, TaskRef("y")))
    outer = Task("o", ident, [inner], z=Task(None, inc, TaskRef("z")))
    assert inner.dependencies == {"x", "y"}
    assert outer.dependencies == {"x", "y", "z"}


def test_tuple_and_int_keys():
    t = Task("t", ident, TaskRef(("x", 0)), TaskRef(3))
    assert t.dependencies == {("x", 0), 3}


def test_strings_that_look_like_keys_are_not_dependencies():
    graph = {
        "a": DataNode("a", 1),
        ("a", 0): DataNode(("a", 0), 2),
        "b": Task("b", ident, "a", ("a", 0), ["a"], {"a": "a"}, k="a"),
    }
    assert graph["b"].dependencies == frozenset()
    assert graph["b"]({"a": 100, ("a", 0): 200}) == (
        ("a", ("a", 0), ["a"], {"a": "a"}),
        {"k": "a"},
    )
    assert dependencies(graph)["b"] == frozenset()


def test_literal_is_not_searched():
    ref = TaskRef("a")
    t = Task("t", ident, Literal([ref, Task(None, inc, TaskRef("b"))]))
    assert t.dependencies == frozenset()
    (arg,), _ = t({})
    assert arg[0] is ref
    assert isinstance(arg[1], Task)  # passed through, not run


def test_objects_of_other_types_are_not_searched():
    class Box:
        def __init__(self, v):
            self.v = v

    box = Box(TaskRef("a"))
    t = Task("t", ident, box)
    assert t.dependencies == frozenset()
    assert t({})[0][0] is box


def test_non_callable_is_refused():
    with pytest.raises(TypeError, match="'t'"):
        Task("t", 42)


# -- calling ------------------------------------------------------------------------


def test_calling_substitutes_values_preserving_container_types():
    t = Task(
        "t",
        ident,
        TaskRef("a"),
        [TaskRef("a"), (TaskRef("b"), 5)],
        {"k": TaskRef("b"), "plain": "a"},
        {TaskRef("a")},
        frozenset([TaskRef("b")]),
        Literal(TaskRef("a")),
        kw=TaskRef("b"),
    )
    args, kwargs = t({"a": 1, "b": 2})
    assert args == (1, [1, (2, 5)], {"k": 2, "plain": "a"}, {1}, frozenset([2]), TaskRef("a"))
    assert type(args[1][1]) is tuple
    assert type(args[4]) is frozenset
    assert kwargs == {"kw": 2}


def test_nested_task_is_computed_inline():
    t = Task("t", add, Task(None, inc, TaskRef("x")), [Task(None, inc, 10)][0])
    assert t({"x": 1}) == 2 + 11


def test_task_without_references_calls_directly():
    t = Task("t", ident, [1, 2], "x", y=3)
    assert t({}) == (([1, 2], "x"), {"y": 3})


def test_missing_input_at_call_time_raises_key_error():
    with pytest.raises(KeyError):
        Task("t", inc, TaskRef("nope"))({})


def test_alias_and_datanode():
    a = Alias("b", "a")
    assert a.dependencies == {"a"}
    assert a({"a": 5}) == 5
    d = DataNode("d", [1, TaskRef("x")])
    assert d.dependencies == frozenset()
    assert d({}) == [1, TaskRef("x")]  # a literal value: never substituted


def test_taskref_equality_and_hash():
    assert TaskRef(("a", 1)) == TaskRef(("a", 1))
    assert TaskRef("a") != TaskRef("b")
    assert TaskRef("a") != "a"
    assert len({TaskRef("a"), TaskRef("a"), TaskRef("b")}) == 2
    assert Literal([1]) == Literal([1]) and Literal(1) != 1


# -- pickling ------------------------------------------------------------------------


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_pickle_round_trip(dumps):
    graph = {
        "a": DataNode("a", 1),
        "b": Alias("b", "a"),
        ("c", 0): Task(("c", 0), add, TaskRef("a"), Task(None, inc, TaskRef("b"))),
        "d": Task("d", ident, Literal(TaskRef("zzz")), [TaskRef(("c", 0))], k={"x": TaskRef("a")}),
    }
    back = pickle.loads(dumps(graph))
    assert list(back) == list(graph)
    for k in graph:
        assert type(back[k]) is type(graph[k])
        assert back[k].key == graph[k].key
        assert back[k].dependencies == graph[k].dependencies
    data = {"a": 1, "b": 1}
    data[("c", 0)] = back[("c", 0)](data)
    assert data[("c", 0)] == 3
    assert back["d"](data) == ((TaskRef("zzz"), [3]), {"k": {"x": 1}})
    assert back["b"](data) == 1 and back["a"]({}) == 1


def test_pickle_round_trip_of_lambda_task_with_cloudpickle():
    t = Task("t", lambda x: x * 2, TaskRef("a"))
    back = pickle.loads(cloudpickle.dumps(t))
    assert back.dependencies == {"a"}
    assert back({"a": 21}) == 42


# -- validate_graph --------------------------------------------------------------------


def test_validate_graph_accepts_a_valid_graph_and_known_keys():
    graph = {
        "a": DataNode("a", 1),
        "b": Task("b", add, TaskRef("a"), TaskRef("ext")),
        "c": Alias("c", "b"),
    }
    validate_graph(graph, known={"ext"})


def test_validate_graph_names_missing_dependencies():
    graph = {
        "a": DataNode("a", 1),
        "b": Task("b", add, TaskRef("a"), TaskRef("nope")),
        "c": Alias("c", "gone"),
    }
    with pytest.raises(MissingDependencyError) as info:
        validate_graph(graph)
    err = info.value
    assert isinstance(err, GraphError) and isinstance(err, ValueError)
    assert {k: sorted(v) for k, v in err.missing.items()} == {"b": ["nope"], "c": ["gone"]}
    assert "'b'" in str(err) and "'nope'" in str(err)
    assert "'c'" in str(err) and "'gone'" in str(err)


def test_validate_graph_refuses_a_node_under_another_key():
    with pytest.raises(ValueError, match="'x'"):
        validate_graph({"x": DataNode("y", 1)})


def test_validate_graph_names_cycle_members():
    graph = {
        "root": DataNode("root", 0),
        "a": Task("a", add, TaskRef("root"), TaskRef("c")),
        "b": Task("b", inc, TaskRef("a")),
        "c": Task("c", inc, TaskRef("b")),
        "after": Task("after", inc, TaskRef("c")),  # downstream, not on the cycle
        "other": Task("other", inc, TaskRef("root")),
    }
    with pytest.raises(CycleError) as info:
        validate_graph(graph)
    assert sorted(info.value.keys) == ["a", "b", "c"]
    for k in "abc":
        assert repr(k) in str(info.value)


def test_self_cycle():
    with pytest.raises(CycleError) as info:
        validate_graph({"a": Task("a", inc, TaskRef("a"))})
    assert info.value.keys == ["a"]


def test_cycle_through_alias():
    graph = {"a": Alias("a", "b"), "b": Task("b", inc, TaskRef("a"))}
    with pytest.raises(CycleError) as info:
        validate_graph(graph)
    assert sorted(info.value.keys) == ["a", "b"]


# -- dependents and cull -------------------------------------------------------------------


def test_dependents():
    graph = {
        "a": DataNode("a", 1),
        "b": Task("b", inc, TaskRef("a")),
        "c": Task("c", add, TaskRef("a"), TaskRef("b")),
        "d": Task("d", inc, TaskRef("external")),
    }
    assert dependents(graph) == {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": set()}


def test_cull_keeps_only_what_the_keys_need():
    graph = {
        "a": DataNode("a", 1),
        "b": Task("b", inc, TaskRef("a")),
        "c": Alias("c", "b"),
        "unused": Task("unused", inc, TaskRef("a")),
        "x": DataNode("x", 0),
        "y": Task("y", inc, TaskRef("x")),
    }
    out = cull(graph, ["c"])
    assert set(out) == {"a", "b", "c"}
    assert all(out[k] is graph[k] for k in out)
    assert set(cull(graph, ["c", "y"])) == {"a", "b", "c", "x", "y"}
    assert cull(graph, []) == {}
    assert set(cull(graph, ["not-there", "a"])) == {"a"}


def test_cull_stops_at_external_keys():
    graph = {"b": Task("b", inc, TaskRef("ext"))}
    assert set(cull(graph, ["b"])) == {"b"}


# -- order -----------------------------------------------------------------------------


def _random_dag(n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    keys = [f"t{i}" for i in range(n)]
    graph = {}
    for i, k in enumerate(keys):
        deps = rnd.sample(keys[:i], min(i, rnd.randint(0, 3)))
        if rnd.random() < 0.1:
            deps.append("external")
        graph[k] = Task(k, ident, *[TaskRef(d) for d in deps])
    items = list(graph.items())
    rnd.shuffle(items)  # insertion order must not matter for validity
    return dict(items)


def _check_topological(graph: dict, prio: dict) -> None:
    assert set(prio) == set(graph)
    assert sorted(prio.values()) == list(range(len(graph)))
    for k, node in graph.items():
        for d in node.dependencies:
            if d in graph:
                assert prio[d] < prio[k], (d, k)


@pytest.mark.parametrize("seed", range(10))
def test_order_is_a_valid_topological_order(seed):
    graph = _random_dag(200, seed)
    _check_topological(graph, order(graph))


def test_order_of_empty_graph():
    assert order({}) == {}


def test_order_raises_cycle_error():
    graph = {"a": Task("a", inc, TaskRef("b")), "b": Task("b", inc, TaskRef("a")), "c": DataNode("c", 1)}
    with pytest.raises(CycleError) as info:
        order(graph)
    assert sorted(info.value.keys) == ["a", "b"]


def _tree_reduction(nleaves: int, leaves_first: bool = True) -> tuple[dict, list]:
    """Leaves l0.. and pairwise adds; returns the graph and the adds level by level."""
    leaves = {f"l{i}": DataNode(f"l{i}", i) for i in range(nleaves)}
    adds: dict = {}
    layer = list(leaves)
    levels = []
    lvl = 0
    while len(layer) > 1:
        nxt = []
        for j in range(0, len(layer), 2):
            k = ("add", lvl, j // 2)
            adds[k] = Task(k, add, TaskRef(layer[j]), TaskRef(layer[j + 1]))
            nxt.append(k)
        levels.append(nxt)
        layer = nxt
        lvl += 1
    graph = {**leaves, **adds} if leaves_first else {**adds, **leaves}
    return graph, levels


@pytest.mark.parametrize("leaves_first", [True, False])
def test_order_finishes_branches_first_in_a_tree_reduction(leaves_first):
    graph, levels = _tree_reduction(16, leaves_first)
    prio = order(graph)
    _check_topological(graph, prio)
    first, last = levels[0][0], levels[0][-1]
    first_leaves = graph[first].dependencies
    last_leaves = graph[last].dependencies
    assert max(prio[k] for k in first_leaves) < min(prio[k] for k in last_leaves)
    # The first add runs right after its two leaves, before any other leaf.
    assert sorted(prio[k] for k in first_leaves) == [0, 1]
    assert prio[first] == 2
    # Every add is ordered right after its last input.
    for level in levels:
        for k in level:
            assert prio[k] == max(prio[d] for d in graph[k].dependencies) + 1, k


def test_order_keeps_few_intermediate_results_alive():
    graph, levels = _tree_reduction(64)
    prio = order(graph)
    deps_of = dependents(graph)
    alive: set = set()  # results computed whose dependents have not all run
    peak = 0
    for k in sorted(prio, key=prio.get):
        alive.add(k)
        for d in graph[k].dependencies:
            if all(prio[x] <= prio[k] for x in deps_of[d]):
                alive.discard(d)
        peak = max(peak, len(alive))
    assert peak <= len(levels) + 2  # log2(64) + a little, not 64


def test_order_of_shuffled_tree_still_runs_each_add_right_after_its_inputs():
    graph, levels = _tree_reduction(32)
    items = list(graph.items())
    random.Random(7).shuffle(items)
    graph = dict(items)
    prio = order(graph)
    _check_topological(graph, prio)
    for level in levels:
        for k in level:
            assert prio[k] == max(prio[d] for d in graph[k].dependencies) + 1, k


def test_order_takes_roots_in_insertion_order():
    graph = {k: DataNode(k, 0) for k in ["z", "y", "x"]}
    assert order(graph) == {"z": 0, "y": 1, "x": 2}


# -- linear fusion ----------------------------------------------------------------------


def _run(graph: dict) -> dict:
    """Evaluate a graph locally, dependencies first."""
    data: dict = {}
    for key in sorted(graph, key=order(graph).__getitem__):
        data[key] = graph[key](data)
    return data


def _chain(n: int) -> dict:
    graph = {"c0": Task("c0", inc, 0)}
    for i in range(1, n):
        graph[f"c{i}"] = Task(f"c{i}", inc, TaskRef(f"c{i - 1}"))
    return graph


def test_linear_chain_fuses_into_one_task_with_the_same_result():
    graph = _chain(5)
    fused = fuse_linear(graph, ["c4"])
    assert list(fused) == ["c4"]
    assert fused["c4"].dependencies == frozenset()
    assert _run(fused)["c4"] == _run(graph)["c4"] == 5
    assert pickle.loads(pickle.dumps(fused["c4"]))({}) == 5


def test_wanted_keys_and_branches_are_not_fused_away():
    graph = _chain(4)
    graph["side"] = Task("side", inc, TaskRef("c1"))  # c1 now has two dependents
    fused = fuse_linear(graph, ["c3", "side", "c2"])
    # c0 fuses into c1; c1 (two readers) and c2 (wanted) stay.
    assert set(fused) == {"c1", "c2", "c3", "side"}
    assert fused["c1"].dependencies == frozenset()
    out = _run(fused)
    assert (out["c3"], out["side"]) == (4, 3)


def test_tasks_with_different_annotations_are_not_fused():
    graph = _chain(3)
    fused = fuse_linear(graph, ["c2"], {"c0": {"retries": 2}})
    assert set(fused) == {"c0", "c2"}  # c1 fused into c2; c0 keeps its retries
    assert fused["c2"].dependencies == frozenset({"c0"})


def test_input_read_twice_is_not_fused_or_it_would_run_twice():
    graph = {"x": Task("x", inc, 1), "y": Task("y", add, TaskRef("x"), TaskRef("x"))}
    assert set(fuse_linear(graph, ["y"])) == {"x", "y"}


def test_fused_depth_is_capped_and_long_chains_still_round_trip():
    graph = _chain(100)
    fused = fuse_linear(graph, ["c99"], max_depth=32)
    assert 4 <= len(fused) <= 5
    assert _run(fused)["c99"] == 100
    for node in fused.values():
        assert pickle.loads(cloudpickle.dumps(node)).key == node.key


def test_fusion_leaves_aliases_data_and_multi_input_tasks_alone():
    graph = {
        "d": DataNode("d", 3),
        "a": Alias("a", "d"),
        "x": Task("x", inc, TaskRef("a")),
        "y": Task("y", inc, 1),
        "z": Task("z", add, TaskRef("x"), TaskRef("y")),
    }
    fused = fuse_linear(graph, ["z"])
    assert set(fused) == set(graph)
    assert _run(fused)["z"] == 6
