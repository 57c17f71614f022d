"""Dask graphs and collections on Shoal.

Everything Dask-specific happens here, once, at submission:

* :func:`convert_graph` turns a Dask graph (legacy tuples, or Dask's own
  task-spec objects: ``Task``, ``Alias``, ``DataNode``, ``TaskRef`` and the
  ``List``/``Tuple``/``Set``/``Dict`` containers) into a ``{key: spec.Node}``
  graph.  Keys stay exactly what Dask named them; nothing parses a key.
* Annotations (``dask.annotate``: priority, retries, workers,
  allow_other_workers, resources) are read from the graph's layers and from
  the annotations active at submission, and travel on each task's spec.
* :func:`get`, :func:`compute` and :func:`persist` implement Dask's scheduler
  protocol and distributed's ``Client.compute``/``persist``.
* :func:`set_default` makes a client Dask's default scheduler while it is open.

Shoal futures may appear inside Dask graphs (``dask.delayed(f)(future)``, the
graphs of persisted collections): they become references to their keys, which
the scheduler already holds, and are never shipped themselves.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import dask  # ImportError here means: dask not installed (pip install "shoal[dask]")
import dask.config
from dask import _task_spec as dts
from dask._expr import CompositeExpr, Expr, FinalizeCompute, HLGExpr, _ExprSequence
from dask.base import collections_to_expr, is_dask_collection, named_schedulers
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from .. import spec
from ..client.futures import Future
from ..utils import gc_paused

__all__ = ["convert_graph", "get", "compute", "persist", "set_default", "unset_default"]

#: Annotations the scheduler honours; others (Dask-internal ones) are dropped.
ANNOTATIONS = ("priority", "retries", "workers", "allow_other_workers", "resources")

_PLAIN = frozenset([int, float, str, bytes, bool, type(None), complex, slice])
_SHOAL_SPEC = (spec.TaskRef, spec.Literal, spec.Node)
_CONTAINERS = (list, tuple, dict, set, frozenset)


# -- run-time helpers (pickled by reference into tasks) ----------------------------


def _identity(x):
    return x


def _make_set(*items):
    return set(items)


def _make_frozenset(*items):
    return frozenset(items)


def _make_dict(*items):
    return dict(zip(items[::2], items[1::2]))


def _run_subgraph(steps, outkey, inkeys, extra, *inputs):
    """Run a fused task's inner graph, as Dask's ``_execute_subgraph`` does:
    ``steps`` are ``(key, node)`` in order; the inner graph names its inputs
    ``inkeys``; ``extra`` holds data of futures it referenced directly."""
    data = dict(extra)
    data.update(zip(inkeys, inputs))
    for k, node in steps:
        data[k] = node(data)
    return data[outkey]


def _call_dask_node(node, values):
    """Run a Dask graph node Shoal has no translation for, as Dask would."""
    return node(values)


# -- graph conversion ------------------------------------------------------------


class _Translator:
    """Dask nodes -> Shoal nodes.  Collects the Shoal futures it meets (the
    graph depends on their keys without defining them), so that they stay
    alive until the graph is submitted."""

    def __init__(self, client=None):
        self.client = client
        self.futures: dict = {}  # key -> Future referenced by the graph

    def future(self, fut: Future) -> spec.TaskRef:
        if self.client is not None and fut.client is not self.client:
            raise ValueError(f"future {fut.key!r} belongs to another client")
        self.futures[fut.key] = fut
        return spec.TaskRef(fut.key)

    # top level: one graph entry
    def node(self, key, n) -> spec.Node | None:
        t = type(n)
        if t is dts.Alias:
            if n.target == key:
                return None  # "the data of key": held elsewhere, not defined here
            return spec.Alias(key, n.target)
        if t is dts.DataNode:
            return self._data(key, n.value)
        if isinstance(n, dts.Task) and type(n).__call__ is dts.Task.__call__:
            if n.func is dts._execute_subgraph and n.args and type(n.args[0]) is dict:
                return self._fused(key, n)
            return self._task(key, n)
        if isinstance(n, dts.GraphNode):
            return self._opaque(key, n)
        return self._data(key, n)  # not converted by Dask: a literal value

    def _data(self, key, value) -> spec.Node | None:
        if isinstance(value, Future):
            self.future(value)
            if value.key == key:
                return None
            return spec.Alias(key, value.key)
        if type(value) in _CONTAINERS and _needs_rebuild(value):
            return spec.Task(key, _identity, self._rebuild(value))
        return spec.DataNode(key, value)

    def _task(self, key, n: dts.Task) -> spec.Task:
        args = [self.arg(a) for a in n.args]
        if n.kwargs:
            return spec.Task(key, n.func, *args, **{k: self.arg(v) for k, v in n.kwargs.items()})
        return spec.Task(key, n.func, *args)

    def _fused(self, key, n: dts.Task) -> spec.Task:
        """A task Dask fused from several (``GraphNode.fuse``): its inner
        graph is translated too and run in a precomputed order."""
        inner_dsk, outkey, inkeys = n.args[0], n.args[1], tuple(n.args[2])
        inner = _Translator(self.client)
        inner.futures = self.futures
        graph = {}
        for k, v in inner_dsk.items():
            node = inner.node(k, v)
            if node is not None:
                graph[k] = node
        prio = spec.order(graph)
        steps = tuple((k, graph[k]) for k in sorted(graph, key=prio.__getitem__))
        used = set().union(*(nd.dependencies for nd in graph.values()))
        extra = {d: spec.TaskRef(d) for d in used - graph.keys() - set(inkeys)}
        inputs = [self.arg(a) for a in n.args[3:]]
        return spec.Task(key, _run_subgraph, spec.Literal(steps), outkey, spec.Literal(inkeys), extra, *inputs)

    def _opaque(self, key, n: dts.GraphNode) -> spec.Task:
        deps = {d: spec.TaskRef(d) for d in n.dependencies}
        return spec.Task(key, _call_dask_node, spec.Literal(n), deps)

    # arguments: evaluated exactly as Dask's Task.__call__ evaluates them
    def arg(self, a):
        t = type(a)
        if t in _PLAIN:
            return a
        if isinstance(a, dts.GraphNode):
            return self._nested(a)
        if isinstance(a, dts.TaskRef):
            return spec.TaskRef(a.key)
        if isinstance(a, Future):
            return self.future(a)
        if t in _CONTAINERS:
            # Dask passes plain containers through untouched; only the Shoal
            # futures it cannot see need replacing.
            if _needs_rebuild(a):
                return self._rebuild(a)
            return spec.Literal(a) if a else a
        if isinstance(a, _SHOAL_SPEC):
            return spec.Literal(a)
        return a

    def _nested(self, n: dts.GraphNode):
        t = type(n)
        if t is dts.Alias:
            return spec.TaskRef(n.target)
        if t is dts.DataNode:
            v = n.value
            if isinstance(v, Future):
                return self.future(v)
            if type(v) in _PLAIN:
                return v
            if type(v) in _CONTAINERS and _needs_rebuild(v):
                return self._rebuild(v)
            return spec.Literal(v)
        if t is dts.List:
            return [self.arg(a) for a in n.args]
        if t is dts.Tuple:
            return tuple([self.arg(a) for a in n.args])
        if t is dts.Set:
            return spec.Task(None, _make_set, *[self.arg(a) for a in n.args])
        if t is dts.Dict:
            ks = n.args[::2]
            if all(type(k) in _PLAIN or type(k) is tuple for k in ks):
                return {k: self.arg(v) for k, v in zip(ks, n.args[1::2])}
            return spec.Task(None, _make_dict, *[self.arg(a) for a in n.args])
        if isinstance(n, dts.Task) and type(n).__call__ is dts.Task.__call__:
            return self._task(None, n)
        return self._opaque(None, n)

    def _rebuild(self, a):
        """A plain container holding Shoal futures (or Shoal spec objects):
        futures become references, spec objects literals."""
        t = type(a)
        if isinstance(a, Future):
            return self.future(a)
        if isinstance(a, _SHOAL_SPEC):
            return spec.Literal(a)
        if t is list or t is tuple:
            items = [self._rebuild(x) for x in a]
            return items if t is list else tuple(items)
        if t is dict:
            return {k: self._rebuild(v) for k, v in a.items()}
        if t is set or t is frozenset:
            make = _make_set if t is set else _make_frozenset
            return spec.Task(None, make, *[self._rebuild(x) for x in a])
        return a


def _needs_rebuild(a) -> bool:
    t = type(a)
    if t in _PLAIN:
        return False
    if isinstance(a, (Future, *_SHOAL_SPEC)):
        return True
    if t is dict:
        return any(_needs_rebuild(v) for v in a.values())
    if t in _CONTAINERS:
        return any(_needs_rebuild(x) for x in a)
    return False


def _materialize(dsk) -> tuple[dict, dict, Any]:
    """A Dask graph-like object -> (plain dict, ``{annotation: {key: value}}``,
    the HighLevelGraph layers' annotations before optimisation, if any)."""
    if isinstance(dsk, Expr):
        pre = _pre_optimization_annotations(dsk)
        # Dask's low-level (linear) fusion flattens annotated layers into an
        # unannotated dict; keep annotations by skipping it when there are any.
        with dask.config.set({"optimization.fuse.active": False} if pre else {}):
            graph = dsk.__dask_graph__()
            annots = dsk.__dask_annotations__()
        return dict(graph), annots, pre
    if isinstance(dsk, HighLevelGraph):
        return dict(dsk), _layer_annotations(dsk.layers.values(), by_type=True), None
    if isinstance(dsk, Mapping):
        return dict(dsk), {}, None
    raise TypeError(f"expected a Dask graph (mapping, HighLevelGraph or expression), got {type(dsk).__name__}")


def _layer_annotations(layers, by_type: bool) -> dict:
    """Annotations of HighLevelGraph layers, callables evaluated per key:
    ``{annotation: {key: value}}`` (``by_type``) or ``{key: {annotation: value}}``."""
    out: dict = {}
    for layer in layers:
        annots = getattr(layer, "annotations", None)
        if not annots:
            continue
        for name, value in annots.items():
            if name not in ANNOTATIONS:
                continue
            keys = layer.get_output_keys() if hasattr(layer, "get_output_keys") else layer
            for k in keys:
                v = value(k) if callable(value) else value
                if by_type:
                    out.setdefault(name, {})[k] = v
                else:
                    out.setdefault(k, {})[name] = v
    return out


def _pre_optimization_annotations(expr: Expr) -> dict:
    layers = []
    for node in expr.walk():
        if isinstance(node, HLGExpr):
            hlg = node.operand("dsk")
            if isinstance(hlg, HighLevelGraph):
                layers.extend(hlg.layers.values())
    return _layer_annotations(layers, by_type=False)


def _normalize(dsk, tr: _Translator) -> dict:
    """Dask task-spec nodes for every entry, Shoal futures noted."""
    for k, v in dsk.items():
        if isinstance(v, Future):
            tr.future(v)
    return dts.convert_legacy_graph(dsk)


def _convert(dsk, keys=None, client=None) -> tuple[dict, dict, _Translator]:
    """-> (Shoal graph, ``{key: annotations}`` from the graph, translator)."""
    raw, annots, pre = _materialize(dsk)
    tr = _Translator(client)
    nodes = _normalize(raw, tr)
    if keys is not None:
        nodes = _cull(nodes, keys)
    graph: dict = {}
    for k, n in nodes.items():
        node = tr.node(k, n)
        if node is not None:
            graph[k] = node
    return graph, _per_key(annots, pre, nodes, graph), tr


def _cull(nodes: dict, keys) -> dict:
    out: dict = {}
    stack = list(keys)
    while stack:
        k = stack.pop()
        if k in out or k not in nodes:
            continue
        out[k] = n = nodes[k]
        stack.extend(n.dependencies)
    return out


def convert_graph(dsk) -> dict:
    """A Dask graph (mapping of legacy tuples or task-spec objects, a
    HighLevelGraph, or a Dask expression) as a ``{key: spec.Node}`` graph.

    Entries that only name data held elsewhere (the futures of a persisted
    collection) are left out: the graph depends on those keys."""
    return _convert(dsk)[0]


# -- annotations --------------------------------------------------------------------


def _per_key(annots: dict, pre: dict | None, nodes: dict, graph: dict) -> dict:
    """``{annotation: {key: value}}`` (+ pre-optimisation fallbacks) ->
    ``{key: {annotation: value}}`` for the keys of ``graph``."""
    out: dict = {}
    for name, by_key in annots.items():
        if name not in ANNOTATIONS:
            continue
        for k, v in by_key.items():
            if k in graph and v is not None:
                out.setdefault(k, {})[name] = v
    if pre:
        for k in graph:
            if k in out:
                continue
            if k in pre:
                out[k] = dict(pre[k])
                continue
            n = nodes.get(k)
            if type(n) is dts.Task and n.func is dts._execute_subgraph and n.args and isinstance(n.args[0], dict):
                # Linear fusion keeps the fused tasks, under their own keys.
                merged = _merge([pre[i] for i in n.args[0] if i in pre])
                if merged:
                    out[k] = merged
    return out


def _merge(annots: list[dict]) -> dict:
    """One task made of several annotated ones: the most demanding wins."""
    out: dict = {}
    for a in annots:
        for name, v in a.items():
            if name not in out:
                out[name] = v
            elif name in ("priority", "retries"):
                out[name] = max(out[name], v)
            elif name == "resources":
                r = dict(out[name])
                for res, need in v.items():
                    r[res] = max(r.get(res, 0), need)
                out[name] = r
    return out


def _with_global(per_key: dict, graph: dict, explicit: dict) -> dict:
    """Add the annotations active now (``dask.annotate`` around the call) and
    the explicit keyword arguments; a layer's own annotations win."""
    glob = {k: v for k, v in dask.get_annotations().items() if k in ANNOTATIONS}
    glob.update({k: v for k, v in explicit.items() if v is not None})
    if not glob:
        return {k: _clean(k, a) for k, a in per_key.items()}
    out = {}
    for k in graph:
        a = {name: (v(k) if callable(v) else v) for name, v in glob.items()}
        a.update(per_key.get(k, ()))
        out[k] = _clean(k, a)
    return out


def _clean(key, a: dict) -> dict:
    """Annotation values as the wire's task spec types them."""
    out: dict = {}
    p = a.get("priority")
    if p:
        out["priority"] = int(round(p))
    r = a.get("retries")
    if r:
        out["retries"] = int(r)
    w = a.get("workers")
    if w:
        out["workers"] = [w] if isinstance(w, str) else [str(x) for x in w]
    if a.get("allow_other_workers"):
        out["allow_other_workers"] = True
    res = a.get("resources")
    if res:
        if not isinstance(res, Mapping):
            raise TypeError(f"task {key!r}: resources annotation must be a dict, got {res!r}")
        out["resources"] = {str(k): float(v) for k, v in res.items()}
    return out


def _explicit(priority=None, retries=None, workers=None, resources=None, allow_other_workers=None) -> dict:
    return dict(priority=priority or None, retries=retries or None, workers=workers or None,
                resources=resources or None, allow_other_workers=allow_other_workers or None)


# -- submitting ------------------------------------------------------------------------


@gc_paused()
def _submit(client, dsk, keys: list, explicit: dict) -> list[Future]:
    """Convert, cull to ``keys``, order and submit; futures for ``keys``."""
    graph, per_key, tr = _convert(dsk, keys, client)
    annotations = _with_global(per_key, graph, explicit)
    futures = client.submit_graph(graph, keys, priorities=spec.order(graph), annotations=annotations)
    del tr  # the futures the graph referenced may go now: the submission is queued
    return futures


def _pack(keys, by_key: dict):
    if isinstance(keys, list):
        return [_pack(k, by_key) for k in keys]
    return by_key[keys]


def get(client, dsk, keys, *, sync: bool = True, priority=0, retries=0, workers=None,
        resources=None, allow_other_workers=False, **kwargs):
    """The Dask scheduler protocol: compute ``keys`` (a key or nested lists of
    keys) of ``dsk`` and return the results in the same nesting.

    ``sync=False`` returns futures instead.  Other keyword arguments Dask
    passes to schedulers are accepted and ignored."""
    if getattr(client, "asynchronous", False) and sync:
        raise RuntimeError(
            "an asynchronous shoal.Client cannot compute synchronously (dask.compute, .compute()); "
            "use `await client.compute(collection)` instead"
        )
    flat = list(flatten(keys)) if isinstance(keys, list) else [keys]
    explicit = _explicit(priority, retries, workers, resources, allow_other_workers)
    futures = _submit(client, dsk, flat, explicit)
    packed = _pack(keys, dict(zip(flat, futures)))
    if not sync:
        return packed
    try:
        return client.gather(packed)
    finally:
        for f in futures:
            f.release()


def compute(client, collections, *, sync: bool = False, optimize_graph: bool = True, traverse: bool = True,
            priority=0, retries=0, workers=None, resources=None, allow_other_workers=False, **kwargs):
    """Dask collection(s) -> a Future of each one's (finalized) result, or the
    results themselves with ``sync=True``.  Non-collections pass through."""
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if traverse:
        items = [dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator)) else a for a in items]
    variables = [a for a in items if is_dask_collection(a)]
    futures: list = []
    if variables:
        expr = FinalizeCompute(collections_to_expr(variables, optimize_graph)).optimize()
        names = list(flatten(expr.__dask_keys__()))
        explicit = _explicit(priority, retries, workers, resources, allow_other_workers)
        futures = _submit(client, expr, names, explicit)
    it = iter(futures)
    result = [next(it) if is_dask_collection(a) else a for a in items]
    if sync:
        result = client.gather(result)
    return result[0] if singleton else result


def persist(client, collections, *, optimize_graph: bool = True, priority=0, retries=0, workers=None,
            resources=None, allow_other_workers=False, **kwargs):
    """Start computing collection(s) on the cluster; return collections of the
    same types whose graphs name the results, held on the workers for as long
    as the returned collections (or anything built from them) live."""
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    for a in items:
        if not is_dask_collection(a):
            raise TypeError(f"persist() expects Dask collections, got {type(a).__name__}")
    expr = collections_to_expr(items, optimize_graph)
    composite = [isinstance(e, CompositeExpr) for e in _operands(expr, len(items))]
    expr = expr.optimize()
    optimized = _operands(expr, len(items)) if any(composite) else [None] * len(items)
    keys_per = [list(flatten(ks)) for ks in expr.__dask_keys__()]
    flat = list(itertools.chain.from_iterable(keys_per))
    explicit = _explicit(priority, retries, workers, resources, allow_other_workers)
    by_key = dict(zip(flat, _submit(client, expr, flat, explicit)))
    out = []
    for a, aexpr, ks in zip(items, optimized, keys_per, strict=True):
        if isinstance(aexpr, CompositeExpr):
            from dask.base import _rebuild_composite_collection

            out.append(_rebuild_composite_collection(a, aexpr, by_key, cull_to_child_keys=True))
        else:
            rebuild, state = a.__dask_postpersist__()
            out.append(rebuild({k: by_key[k] for k in ks}, *state))
    return out[0] if singleton else out


def _operands(expr, n: int) -> list:
    ops = list(expr.operands) if isinstance(expr, _ExprSequence) else [expr]
    if len(ops) != n:
        raise RuntimeError(f"Dask gave {len(ops)} expressions for {n} collections")
    return ops


# -- the default scheduler -----------------------------------------------------------

_lock = threading.Lock()
_registered: list = []  # weakrefs to clients set as default, oldest first
_config_tokens: list = []  # dask.config.set objects to undo when the last one goes
_tokens = itertools.count(1)


class _ShoalScheduler:
    """Dask's ``scheduler`` setting while a Shoal client is the default.

    ``dask.compute`` calls it as a ``get``; ``dask.persist`` finds its
    ``persist``.  It forwards to the default client at call time, so several
    clients may come and go in any order."""

    def __call__(self, dsk, keys, **kwargs):
        return get(_default_client(), dsk, keys, **kwargs)

    def persist(self, collections, **kwargs):
        return persist(_default_client(), collections, **kwargs)

    def __repr__(self) -> str:
        return "<shoal default Dask scheduler>"


_SCHEDULER = _ShoalScheduler()
#: ``dask.compute(..., scheduler="shoal")``; the default while a client is open.
SCHEDULER_NAME = "shoal"
named_schedulers[SCHEDULER_NAME] = _SCHEDULER


def _default_client():
    from ..client import client as client_mod

    with _lock:
        live = [c for c in (r() for r in _registered) if c is not None and c.status == "running"]
    for c in reversed(list(client_mod._current)):
        if any(c is x for x in live):
            return c
    if not live:
        raise RuntimeError("no running shoal.Client to compute on: create one (Client(...)) or pass scheduler=client")
    return live[-1]


def set_default(client) -> int:
    """Make ``client`` Dask's default scheduler (``.compute()``,
    ``dask.compute``, ``dask.persist``) until :func:`unset_default`."""
    with _lock:
        if not _registered:
            # A name, not the object: Dask's configuration stays serialisable.
            settings = [{"scheduler": SCHEDULER_NAME}]
            if dask.config.get("dataframe.shuffle.method", None) is None:
                # Dask's default without a distributed client ("disk") needs a
                # shared local disk; task-based shuffles run anywhere.
                settings.append({"dataframe.shuffle.method": "tasks"})
            _config_tokens[:] = [(s, dask.config.set(s)) for s in settings]
        token = next(_tokens)
        _registered.append(_Registration(client, token))
    return token


def unset_default(client, token) -> None:
    """Undo :func:`set_default`; when no Shoal client is left, put back the
    settings it replaced (unless someone changed them since)."""
    with _lock:
        _registered[:] = [r for r in _registered if r.token != token and r() is not None]
        if _registered or not _config_tokens:
            return
        tokens, _config_tokens[:] = list(_config_tokens), []
    for settings, cfg in reversed(tokens):
        (name, value), = settings.items()
        if dask.config.get(name, None) == value:
            cfg.__exit__(None, None, None)


class _Registration(weakref.ref):
    __slots__ = ("token",)

    def __new__(cls, client, token):
        self = super().__new__(cls, client)
        self.token = token
        return self

    def __init__(self, client, token):
        super().__init__(client)
