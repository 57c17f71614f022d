"""Explicit task objects and graph helpers.

A graph is a ``dict[key, Node]``.  A node is one of

* :class:`Task` -- call ``func(*args, **kwargs)``; arguments may contain
  :class:`TaskRef` (the value of another key) and nested :class:`Task` objects
  (computed inline, no key of their own) inside lists, tuples, dicts and sets;
* :class:`Alias` -- the value of another key, under a new name;
* :class:`DataNode` -- a literal value.

Dependencies are computed once, at construction, by looking for ``TaskRef``
*objects*: nothing ever guesses that a string is a key.  Values that must not
be searched (large lists, user objects) can be wrapped in :class:`Literal`.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Mapping

from .errors import CycleError, MissingDependencyError

Key = Hashable

__all__ = [
    "Key",
    "TaskRef",
    "Literal",
    "Node",
    "Task",
    "Alias",
    "DataNode",
    "dependencies",
    "dependents",
    "validate_graph",
    "order",
    "cull",
    "fuse_linear",
    "find_cycle",
]


class TaskRef:
    """A reference to the value of the task named ``key``."""

    __slots__ = ("key",)

    def __init__(self, key: Key):
        self.key = key

    def __repr__(self) -> str:
        return f"TaskRef({self.key!r})"

    def __eq__(self, other) -> bool:
        return type(other) is TaskRef and other.key == self.key

    def __hash__(self) -> int:
        return hash(("TaskRef", self.key))

    def __reduce__(self):
        return TaskRef, (self.key,)


class Literal:
    """A value passed through untouched: never searched for references."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Literal({self.value!r})"

    def __eq__(self, other) -> bool:
        return type(other) is Literal and other.value == self.value

    def __reduce__(self):
        return Literal, (self.value,)


def _find_refs(obj: Any, out: set) -> bool:
    """Add keys referenced in ``obj`` to ``out``; return whether ``obj`` needs
    substitution at run time (contains a ref, a nested task or a Literal)."""
    t = type(obj)
    if t is TaskRef:
        out.add(obj.key)
        return True
    if t is Task:
        out.update(obj.dependencies)
        return True
    if t is Literal:
        return True
    if t is list or t is tuple or t is set or t is frozenset:
        found = False
        for item in obj:
            if _find_refs(item, out):
                found = True
        return found
    if t is dict:
        found = False
        for item in obj.values():
            if _find_refs(item, out):
                found = True
        return found
    return False


def _substitute(obj: Any, data: Mapping) -> Any:
    t = type(obj)
    if t is TaskRef:
        return data[obj.key]
    if t is Task:
        return obj(data)
    if t is Literal:
        return obj.value
    if t is list:
        return [_substitute(x, data) for x in obj]
    if t is tuple:
        return tuple([_substitute(x, data) for x in obj])
    if t is dict:
        return {k: _substitute(v, data) for k, v in obj.items()}
    if t is set or t is frozenset:
        return t(_substitute(x, data) for x in obj)
    return obj


class Node:
    """Base class of graph nodes: something with a key that produces a value."""

    __slots__ = ("key", "dependencies")

    key: Key
    dependencies: frozenset

    def __call__(self, data: Mapping) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class Task(Node):
    """``func(*args, **kwargs)`` under ``key``.

    ``key`` may be ``None`` for a task nested inside another task's arguments.
    """

    __slots__ = ("func", "args", "kwargs", "_needs_subs")

    def __init__(self, key: Key, func: Callable, /, *args: Any, **kwargs: Any):
        if not callable(func):
            raise TypeError(f"task {key!r}: {func!r} is not callable")
        self.key = key
        self.func = func
        self.args = args
        self.kwargs = kwargs
        refs: set = set()
        a = _find_refs(args, refs)
        k = _find_refs(kwargs, refs) if kwargs else False
        self._needs_subs = a or k
        self.dependencies = frozenset(refs)

    def __call__(self, data: Mapping) -> Any:
        if not self._needs_subs:
            return self.func(*self.args, **self.kwargs)
        args = _substitute(self.args, data)
        kwargs = _substitute(self.kwargs, data) if self.kwargs else {}
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.func, "__name__", type(self.func).__name__)
        return f"Task({self.key!r}, {name}, deps={sorted(map(repr, self.dependencies))})"

    def __reduce__(self):
        return _rebuild_task, (self.key, self.func, self.args, self.kwargs)


def _rebuild_task(key, func, args, kwargs):
    return Task(key, func, *args, **kwargs)


class Alias(Node):
    """The value of ``target`` under the name ``key``."""

    __slots__ = ("target",)

    def __init__(self, key: Key, target: Key):
        self.key = key
        self.target = target
        self.dependencies = frozenset([target])

    def __call__(self, data: Mapping) -> Any:
        return data[self.target]

    def __repr__(self) -> str:
        return f"Alias({self.key!r} -> {self.target!r})"

    def __reduce__(self):
        return Alias, (self.key, self.target)


class DataNode(Node):
    """A literal value under ``key``."""

    __slots__ = ("value",)

    def __init__(self, key: Key, value: Any):
        self.key = key
        self.value = value
        self.dependencies = frozenset()

    def __call__(self, data: Mapping) -> Any:
        return self.value

    def __repr__(self) -> str:
        return f"DataNode({self.key!r})"

    def __reduce__(self):
        return DataNode, (self.key, self.value)


# -- graph helpers --------------------------------------------------------------


def dependencies(graph: Mapping[Key, Node]) -> dict[Key, frozenset]:
    return {k: node.dependencies for k, node in graph.items()}


def dependents(graph: Mapping[Key, Node]) -> dict[Key, set]:
    out: dict[Key, set] = {k: set() for k in graph}
    for k, node in graph.items():
        for d in node.dependencies:
            if d in out:
                out[d].add(k)
    return out


def validate_graph(graph: Mapping[Key, Node], known: Iterable[Key] = ()) -> None:
    """Raise :class:`MissingDependencyError` or :class:`CycleError` naming the keys.

    ``known`` are keys that exist outside the graph (data already on the cluster).
    """
    known = set(known)
    missing: dict = {}
    for k, node in graph.items():
        if node.key is not None and node.key != k:
            raise ValueError(f"graph key {k!r} holds a node keyed {node.key!r}")
        bad = [d for d in node.dependencies if d not in graph and d not in known]
        if bad:
            missing[k] = bad
    if missing:
        raise MissingDependencyError(missing)
    cycle = find_cycle(dependencies(graph))
    if cycle:
        raise CycleError(cycle)


def find_cycle(deps: Mapping[Key, Iterable[Key]]) -> list:
    """Keys on one cycle of ``{key: dependency keys}``, or ``[]`` if it has none.

    Dependencies outside ``deps`` are ignored (known data cannot depend on new
    tasks).  Kahn's algorithm, then a walk inside what never freed.
    """
    waiting: dict = {}
    dependents: dict = {}
    for key, ds in deps.items():
        n = 0
        for d in ds:
            if d in deps:
                n += 1
                dependents.setdefault(d, []).append(key)
        waiting[key] = n
    ready = [k for k, n in waiting.items() if n == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for d in dependents.get(k, ()):
            waiting[d] -= 1
            if waiting[d] == 0:
                ready.append(d)
    if done == len(deps):
        return []
    stuck = {k for k, n in waiting.items() if n > 0}
    k = next(iter(stuck))
    seen: dict = {}
    path: list = []
    while k not in seen:
        seen[k] = len(path)
        path.append(k)
        k = next(d for d in deps[k] if d in stuck)
    return path[seen[k]:]


def order(graph: Mapping[Key, Node]) -> dict[Key, int]:
    """A priority for every key (lower runs first) that finishes branches first.

    A simulated depth-first run: once a task is ordered, the dependents it
    makes ready are ordered next, before any other root is started, so
    intermediate results are consumed and freed early (the goal of
    ``dask.order``).  Roots are taken in graph insertion order, which keeps
    neighbouring partitions together.
    """
    deps_of = dependents(graph)
    waiting = {k: sum(1 for d in n.dependencies if d in graph) for k, n in graph.items()}
    index = {k: i for i, k in enumerate(graph)}
    # A stack of ready keys: dependents pushed after a task is ordered pop first.
    stack = [k for k, c in waiting.items() if c == 0]
    stack.reverse()
    prio: dict = {}
    n = 0
    while stack:
        k = stack.pop()
        prio[k] = n
        n += 1
        newly = []
        for dep in deps_of[k]:
            waiting[dep] -= 1
            if waiting[dep] == 0:
                newly.append(dep)
        if newly:
            newly.sort(key=lambda d: index[d], reverse=True)
            stack.extend(newly)
    if len(prio) != len(graph):
        raise CycleError(find_cycle(dependencies(graph)))
    return prio


def cull(graph: Mapping[Key, Node], keys: Iterable[Key]) -> dict[Key, Node]:
    """The subgraph needed to compute ``keys``."""
    out: dict = {}
    stack = [k for k in keys]
    while stack:
        k = stack.pop()
        if k in out or k not in graph:
            continue
        node = graph[k]
        out[k] = node
        stack.extend(node.dependencies)
    return out


def _count_refs(obj: Any, key: Key) -> int:
    """How many times ``obj`` reads ``key`` (nested tasks included)."""
    t = type(obj)
    if t is TaskRef:
        return 1 if obj.key == key else 0
    if t is Task:
        return _count_refs(obj.args, key) + _count_refs(obj.kwargs, key)
    if t is list or t is tuple or t is set or t is frozenset:
        return sum(_count_refs(x, key) for x in obj)
    if t is dict:
        return sum(_count_refs(x, key) for x in obj.values())
    return 0


def _inline(obj: Any, key: Key, node: "Task") -> Any:
    """``obj`` with ``TaskRef(key)`` replaced by the nested task ``node``."""
    t = type(obj)
    if t is TaskRef:
        return node if obj.key == key else obj
    if t is Task:
        return Task(obj.key, obj.func, *_inline(obj.args, key, node), **_inline(obj.kwargs, key, node))
    if t is list:
        return [_inline(x, key, node) for x in obj]
    if t is tuple:
        return tuple([_inline(x, key, node) for x in obj])
    if t is dict:
        return {k: _inline(v, key, node) for k, v in obj.items()}
    if t is set or t is frozenset:
        return t(_inline(x, key, node) for x in obj)
    return obj


def fuse_linear(
    graph: Mapping[Key, Node],
    keep: Iterable[Key],
    annotations: Mapping[Key, Any] | None = None,
    *,
    max_depth: int = 32,
    priorities: Mapping[Key, int] | None = None,
) -> dict[Key, Node]:
    """Fuse linear chains: a task read once, by its only dependent, runs
    inside that dependent (as a nested task) instead of as a task of its own.

    Keys in ``keep`` (what the caller wants) are never fused away, nor are
    tasks whose annotations (``annotations[key]``: priority, retries,
    resources, restrictions ...) differ from their dependent's -- fusing
    must not change where or how anything runs.  A fused task nests at most
    ``max_depth`` tasks, so running and pickling it stays far from Python's
    recursion limit.  ``priorities`` (``order(graph)``, if the caller has
    it) gives a topological order.  Returns a new graph; nodes are not modified.
    """
    keep = set(keep)
    annotations = annotations or {}
    dents = dependents(graph)
    out: dict = dict(graph)
    depth: dict = {}
    prio = priorities if priorities is not None else order(graph)
    for key in sorted(graph, key=prio.__getitem__):  # dependencies first
        node = out[key]
        if type(node) is not Task:
            continue
        inner = [d for d in node.dependencies if d in out]
        if len(inner) != 1:
            continue
        (d,) = inner
        dn = out[d]
        if (
            type(dn) is not Task
            or d in keep
            or len(dents[d]) != 1
            or annotations.get(d) != annotations.get(key)
            or depth.get(d, 1) + depth.get(key, 1) > max_depth
            or _count_refs((node.args, node.kwargs), d) != 1
        ):
            continue
        nested = Task(None, dn.func, *dn.args, **dn.kwargs)
        out[key] = Task(key, node.func, *_inline(node.args, d, nested), **_inline(node.kwargs, d, nested))
        depth[key] = depth.pop(d, 1) + depth.get(key, 1)
        del out[d]
    return out
