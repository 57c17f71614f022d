"""The client: submit work, hold futures, fetch results from workers.

All network I/O runs on an event loop in a background thread (``LoopThread``),
so the same ``Client`` works in a plain script, in Jupyter (where a loop is
already running) and from async code (``await fut``, or
``Client(asynchronous=True)`` whose blocking methods return awaitables).
Pickling happens in the caller's thread; the I/O thread only moves bytes.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable


from ..comm import Comm, connect
from ..errors import (
    CommClosedError,
    GraphError,
    ProtocolError,
    RetirementError,
    SchedulerUnavailableError,
    SerializationError,
)
from ..protocol import messages as m
from ..protocol.serialize import Payload, deserialize
from ..spec import DataNode, Task, TaskRef
from .futures import CANCELLED, FINISHED, LOST, Future, FutureState, _with_remote_traceback
from .loop import LoopThread
from ..utils import gc_paused
from .tasks import collect_futures, dumps_args, funcname, rebuild, run_spec, token as content_token, worker_names

# Argument types that can hold no future: ``map`` over numbers skips the walk.
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})

logger = logging.getLogger("shoal.client")

_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
# Graphs larger than this are sent in parts (see SubmitGraph.more).
GRAPH_PART = 4096
_current: list = []  # stack of clients made current by ``as_current``


def default_client() -> "Client":
    """The most recently created client that is still open."""
    for c in reversed(list(_current)):
        if c.status == "running":
            return c
    live = [c for c in _clients if c.status == "running"]
    if not live:
        raise ValueError("no running shoal.Client")
    return max(live, key=lambda c: c._created)


class Client:
    """Connect to a Shoal cluster.

    ``Client()`` starts a :class:`~shoal.LocalCluster` sized to this machine;
    ``Client(cluster)`` or ``Client("tcp://host:8786")`` connects to one.
    """

    _ids = itertools.count()

    def __init__(
        self,
        address: Any = None,
        *,
        timeout: float = 30.0,
        reconnect_timeout: float | None = None,
        asynchronous: bool = False,
        name: str | None = None,
        set_as_default: bool = True,
        **cluster_kwargs,
    ):
        self.id = f"client-{uuid.uuid4().hex[:12]}"
        self.name = name or self.id
        self.timeout = timeout
        # How long to keep trying when the scheduler connection drops (0: give
        # up at once).  Futures wait meanwhile; the scheduler keeps this
        # client's data for its grace period (``shoal scheduler --client-grace``).
        self.reconnect_timeout = timeout if reconnect_timeout is None else reconnect_timeout
        self.scheduler_id = ""
        self.asynchronous = asynchronous
        self.status = "connecting"
        self._created = next(Client._ids)
        self._cluster = None
        self._owns_cluster = False
        if address is None:
            from ..cluster import LocalCluster

            address = LocalCluster(**cluster_kwargs)
            self._owns_cluster = True
        elif cluster_kwargs:
            raise TypeError(f"unexpected arguments {sorted(cluster_kwargs)} when connecting to an existing cluster")
        if hasattr(address, "scheduler_address"):
            self._cluster = address
            address = address.scheduler_address
        self.scheduler_address: str = address
        # Re-entrant: garbage collection may run Future.__del__ (which takes this
        # lock) in a thread that already holds it.
        self._lock = threading.RLock()
        self._states: dict[Any, FutureState] = {}
        self._refs: dict[Any, int] = {}
        self._workers: list[str] = []
        self._workers_changed: asyncio.Condition | None = None
        self._comm: Comm | None = None
        self._reconnecting: asyncio.Task | None = None
        self._lost_reason = ""  # set when a restarted scheduler forgot our keys
        self._worker_comms: dict[str, Comm] = {}
        self._requests: dict[int, asyncio.Future] = {}
        self._request_ids = itertools.count()
        self._outq: list = []
        self._func_cache: dict[int, tuple] = {}
        self._key_prefix = uuid.uuid4().hex[:16] + "-"
        self._key_counter = itertools.count()
        self._io = LoopThread(name=f"shoal-{self.id}")
        self._callbacks = ThreadPoolExecutor(1, thread_name_prefix="shoal-callback")
        self._connected = self._io.submit(self._connect())
        if not asynchronous:
            self._wait_connected()
        _clients.add(self)
        self._dask_config = None
        if set_as_default:
            self._set_dask_default()
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- connecting -----------------------------------------------------------------

    def _wait_connected(self) -> None:
        try:
            self._connected.result(self.timeout + 5)
        except BaseException:
            self._shutdown_io()
            if self._owns_cluster and self._cluster is not None:
                self._cluster.close()
            raise
        if self._cluster is not None and getattr(self._cluster, "n_workers", 0):
            self.wait_for_workers(self._cluster.n_workers, timeout=self.timeout)

    def __await__(self):
        async def _wait():
            await asyncio.wrap_future(self._connected)
            if self._cluster is not None and getattr(self._cluster, "n_workers", 0):
                await self.wait_for_workers(self._cluster.n_workers, timeout=self.timeout)
            return self

        return _wait().__await__()

    async def _connect(self) -> None:
        self._workers_changed = asyncio.Condition()
        welcome = await self._open(time.monotonic() + self.timeout)
        self.scheduler_id = welcome.scheduler_id
        self.status = "running"

    async def _open(self, deadline: float) -> m.Welcome:
        """Connect to the scheduler and register, retrying with backoff until
        ``deadline``; the new connection becomes ``_comm``."""
        delay = 0.05
        patience = 2.0  # for an answer to RegisterClient; doubles per attempt
        while True:
            try:
                return await self._handshake(min(deadline, time.monotonic() + patience))
            except (CommClosedError, TimeoutError) as e:
                patience *= 2
                if time.monotonic() + delay > deadline:
                    raise SchedulerUnavailableError(
                        f"could not reach the scheduler at {self.scheduler_address} in time: {e}"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _handshake(self, deadline: float) -> m.Welcome:
        """One attempt: connect, register, await the welcome until ``deadline``.

        A connection can be accepted and then never served (made to a
        scheduler in the middle of dying), so the wait is bounded and the
        caller tries again."""
        comm = await connect(self.scheduler_address, m.ToClient, timeout=max(0.1, deadline - time.monotonic()))
        welcomed = asyncio.get_running_loop().create_future()
        self._welcomed = welcomed  # failed by _on_scheduler_closed if the connection drops first
        comm.handler = self._on_scheduler_msgs
        comm.on_closed = self._on_scheduler_closed
        if comm.closed:  # dropped before on_closed was set (a scheduler dying as we connect)
            raise CommClosedError(f"connection to {self.scheduler_address} closed at once: {comm.close_reason}")
        comm.send(m.RegisterClient(self.id, self.name))
        comm.flush()
        self._comm = comm
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                return await welcomed
        except TimeoutError:
            self._comm = None  # so that its closing is not taken for a lost scheduler
            comm.abort()
            raise TimeoutError(f"the scheduler at {self.scheduler_address} did not answer") from None

    # -- messages from the scheduler (I/O thread) ---------------------------------------

    def _on_scheduler_msgs(self, comm: Comm, msgs: list) -> None:
        states = self._states
        for msg in msgs:
            t = type(msg)
            if t is m.KeysInMemory:
                with gc_paused():  # (a batch may finish 100k futures: see gc_paused)
                    for key, tid, workers, nbytes, type_name in msg.entries():
                        st = states.get(key)
                        if st is not None:
                            st.set_finished(tid, workers, nbytes, type_name)
            elif t is m.KeyErred:
                st = states.get(m.as_key(msg.key))
                if st is not None:
                    try:
                        exc = deserialize(msg.exception, what="a task's exception")
                    except SerializationError as e:
                        exc = e
                    if not isinstance(exc, BaseException):
                        exc = RuntimeError(repr(exc))
                    st.set_error(exc, msg.traceback)
            elif t is m.GraphRejected:
                for k in msg.keys:
                    st = states.get(m.as_key(k))
                    if st is not None:
                        st.set_error(GraphError(msg.reason))
            elif t is m.KeysLost:
                reason = self._lost_reason or msg.reason
                for k in msg.keys:
                    st = states.get(m.as_key(k))
                    if st is not None:
                        st.set_lost(reason)
            elif t is m.KeysCancelled:
                for k in msg.keys:
                    st = states.get(m.as_key(k))
                    if st is not None:
                        st.set_cancelled(msg.reason)
            elif t is m.WorkersChanged:
                ws = [w for w in self._workers if w not in msg.removed]
                ws.extend(a for a in msg.added if a not in ws)
                self._workers = ws
                self._notify_workers()
            elif t is m.Info:
                fut = self._requests.pop(msg.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.data)
            elif t is m.RequestDone:
                fut = self._requests.pop(msg.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.error)
            elif t is m.Welcome:
                self._workers = list(msg.workers)
                self._notify_workers()
                if not self._welcomed.done():
                    self._welcomed.set_result(msg)
            else:
                raise ProtocolError(f"the scheduler sent {t.__name__} on a client connection")

    def _notify_workers(self) -> None:
        cond = self._workers_changed

        async def notify():
            async with cond:
                cond.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _on_scheduler_closed(self, comm: Comm, exc) -> None:
        if comm is not self._comm or self.status in ("closing", "closed"):
            return  # an older connection, or we are the ones closing
        reason = f"lost the scheduler at {self.scheduler_address}: {exc or 'connection closed'}"
        if not self._welcomed.done():  # dropped during the handshake: _open tries again
            self._welcomed.set_exception(CommClosedError(reason))
            return
        for rid, fut in list(self._requests.items()):
            if getattr(fut, "comm", None) is comm and not fut.done():
                self._requests.pop(rid, None)
                fut.set_exception(CommClosedError(reason))
        if self.status != "running" or self.reconnect_timeout <= 0:
            self._give_up(reason)
            return
        logger.warning("%s; reconnecting (for up to %gs)", reason, self.reconnect_timeout)
        self.status = "reconnecting"
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(reason))

    async def _reconnect(self, reason: str) -> None:
        """Connect again and tell the scheduler which futures this client holds.

        A scheduler that kept our record (we were back within its grace
        period) re-sends what we missed; a restarted one -- or one that gave
        up on us -- answers ``KeysLost`` for what it does not know."""
        deadline = time.monotonic() + self.reconnect_timeout
        # A scheduler that just dropped us may be dying: a connection made to
        # it now could be accepted and never served.  Give it a moment.
        await asyncio.sleep(min(0.1, self.reconnect_timeout / 2))
        try:
            welcome = await self._open(deadline)
        except SchedulerUnavailableError as e:
            self._give_up(f"{reason}; could not reconnect within {self.reconnect_timeout:g}s ({e})")
            return
        finally:
            self._reconnecting = None
        if self.status != "reconnecting":
            return  # closed meanwhile
        restarted = welcome.scheduler_id != self.scheduler_id
        self.scheduler_id = welcome.scheduler_id
        self._lost_reason = (
            f"the scheduler at {self.scheduler_address} restarted and no longer knows it; submit it again"
            if restarted
            else ""
        )
        with self._lock:
            # Keys submitted while away are not the scheduler's to know yet:
            # their SubmitGraph follows the resume (see _drain_outq below).
            queued = {m.as_key(k) for item in self._outq if type(item) is m.SubmitGraph for k in item.wanted}
            keys = [k for k in self._refs if k not in queued]
        self._comm.send(m.ResumeClient(keys))
        self.status = "running"
        note = " (it restarted)" if restarted else ""
        logger.warning("reconnected to the scheduler at %s%s", self.scheduler_address, note)
        self._drain_outq()  # what was submitted or released while away

    def _give_up(self, reason: str) -> None:
        self.status = "disconnected"
        logger.warning(reason)
        for st in list(self._states.values()):
            if not st.done():
                st.set_lost(reason)

    # -- futures bookkeeping (any thread) -------------------------------------------------

    def _track(self, key: Any, state: FutureState | None, submitted: bool = False) -> FutureState:
        with self._lock:
            return self._track_locked(key, state, submitted)

    def _track_locked(self, key: Any, state: FutureState | None, submitted: bool) -> FutureState:
        self._refs[key] = self._refs.get(key, 0) + 1
        st = self._states.get(key)
        if st is None or (submitted and st.status in (CANCELLED, LOST)):
            # A key submitted again after a cancel (or loss) runs again:
            # new futures get a fresh state; old ones stay cancelled.
            st = state or FutureState(key)
            self._states[key] = st
        return st

    def _submitted_futures(self, keys: list) -> list[Future]:
        """Futures for keys about to be submitted, tracked under one lock
        acquisition (the I/O thread takes the same lock: per-key locking
        made ``map`` trade the GIL with it for every task)."""
        with self._lock:
            return [Future._tracked(k, self, self._track_locked(k, None, True)) for k in keys]

    def _untrack(self, key: Any) -> None:
        with self._lock:
            n = self._refs.get(key, 0) - 1
            if n > 0:
                self._refs[key] = n
                return
            self._refs.pop(key, None)
            self._states.pop(key, None)
        self._enqueue(_Release(key))

    def _send(self, msg) -> None:
        if self.status not in ("running", "connecting", "reconnecting"):
            raise CommClosedError(f"client is {self.status}")
        self._enqueue(msg)

    def _enqueue(self, item) -> None:
        # One ordered queue for submissions and releases: a release must never
        # overtake the submission of a task that depends on the released key.
        with self._lock:
            self._outq.append(item)
            if len(self._outq) > 1:
                return  # a drain is already scheduled
        if self.status in ("running", "connecting"):
            self._io.call_soon(self._drain_outq)

    def _drain_outq(self) -> None:
        comm = self._comm
        if comm is None or comm.closed:
            return  # kept for the next connection (see _reconnect)
        with self._lock:
            items, self._outq = self._outq, []
        releases: list = []
        for item in items:
            if type(item) is _Release:
                releases.append(item.key)
                continue
            if releases:
                comm.send(m.ReleaseKeys(releases))
                releases = []
            comm.send(item)
            if type(item) is m.SubmitGraph and len(item.tasks) >= GRAPH_PART // 2:
                comm.flush()  # one packet per graph part: the scheduler decodes them one by one
        if releases:
            comm.send(m.ReleaseKeys(releases))

    # -- building tasks --------------------------------------------------------------------

    def _unpack(self, obj: Any, deps: dict) -> Any:
        """Replace futures (inside lists, tuples, dicts, sets) by references."""
        t = type(obj)
        if t in _PLAIN:
            return obj
        if t is Future or isinstance(obj, Future):
            if obj.client is not self:
                raise ValueError(f"future {obj.key!r} belongs to another client")
            deps[obj.key] = obj
            return TaskRef(obj.key)
        if t is list or t is tuple or t is set or t is frozenset:
            items = [self._unpack(x, deps) for x in obj]
            return t(items) if t is not list else items
        if t is dict:
            return {k: self._unpack(v, deps) for k, v in obj.items()}
        return obj

    def _unique(self) -> str:
        """A key suffix no other client or call produces (cheaper than uuid4 per task)."""
        return f"{self._key_prefix}{next(self._key_counter)}"

    def _function(self, func: Callable) -> tuple[str, Payload]:
        """``func`` pickled once, with a content token; cached by identity."""
        hit = self._func_cache.get(id(func))
        if hit is not None and hit[0] is func:
            return hit[1], hit[2]
        try:
            payload = run_spec(func)
        except Exception as e:
            raise SerializationError(f"cannot serialize function {funcname(func)!r}: {type(e).__name__}: {e}") from e
        token = content_token(payload)
        if len(self._func_cache) >= 256:
            self._func_cache.pop(next(iter(self._func_cache)))
        self._func_cache[id(func)] = (func, token, payload)
        return token, payload

    def _task_maker(self, func, kwargs, pure, opts, functions: dict) -> Callable:
        """``make(args, key=None) -> (TaskSpec, key)`` for calls of ``func``.

        What every call shares (the pickled function, the annotations, the
        keyword arguments when they hold no futures) is worked out once, so
        a ``map`` over 100k items pays only for each item's own arguments."""
        ftoken, fpayload = self._function(func)
        functions[ftoken] = fpayload
        name = funcname(func)
        priority = opts.get("priority", 0)
        retries = opts.get("retries") or 0
        workers = worker_names(opts.get("workers"))
        allow_other = bool(opts.get("allow_other_workers", False))
        resources = opts.get("resources")
        kw_deps: dict = {}
        kwargs = self._unpack(kwargs, kw_deps) if kwargs else {}
        unpack, plain, spec_type, unique = self._unpack, _PLAIN, m.TaskSpec, self._unique

        def make(args: tuple, key=None) -> tuple[m.TaskSpec, Any]:
            deps = dict(kw_deps) if kw_deps else {}
            for a in args:
                if type(a) not in plain:
                    args = unpack(args, deps)
                    break
            try:
                payload = dumps_args((args, kwargs))
            except Exception as e:
                raise SerializationError(
                    f"cannot serialize the arguments of task {key or name!r}: {type(e).__name__}: {e}"
                ) from e
            if key is None:
                key = f"{name}-{content_token(payload, ftoken) if pure else unique()}"
            spec = spec_type(key, list(deps), payload, 0, priority, retries, workers, allow_other, resources, False, ftoken)
            return spec, key

        return make

    # -- the public API ---------------------------------------------------------------------

    @gc_paused()
    def submit(
        self,
        func: Callable,
        *args,
        key: Any = None,
        pure: bool = True,
        priority: int = 0,
        retries: int = 0,
        workers=None,
        allow_other_workers: bool = False,
        resources: dict | None = None,
        **kwargs,
    ) -> Future:
        """Run ``func(*args, **kwargs)`` on the cluster; futures in the
        arguments (also inside lists, tuples, dicts) are its dependencies."""
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        opts = dict(priority=priority, retries=retries, workers=workers, allow_other_workers=allow_other_workers, resources=resources)
        functions: dict = {}
        spec, key = self._task_maker(func, kwargs, pure, opts, functions)(args, key)
        fut = Future(key, self, submitted=True)
        self._send(m.SubmitGraph([spec], [key], functions))
        return fut

    @gc_paused()
    def map(
        self,
        func: Callable,
        *iterables: Iterable,
        key: Any = None,
        pure: bool = True,
        priority: int = 0,
        retries: int = 0,
        workers=None,
        allow_other_workers: bool = False,
        resources: dict | None = None,
        batch_size: int = 4096,
        **kwargs,
    ) -> list[Future]:
        """``submit`` over zipped iterables, as one graph submission per batch."""
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        opts = dict(priority=priority, retries=retries, workers=workers, allow_other_workers=allow_other_workers, resources=resources)
        keys = list(key) if isinstance(key, (list, tuple)) else None
        prefix = key if isinstance(key, str) else None
        futures: list[Future] = []
        specs: list = []
        functions: dict = {}
        make = self._task_maker(func, kwargs, pure, opts, functions)
        for i, args in enumerate(zip(*iterables)):
            k = keys[i] if keys is not None else None
            spec, k = make(args, k)
            if prefix is not None:
                k = spec.key = f"{prefix}-{k.rsplit('-', 1)[-1]}"
            spec.order = i
            specs.append(spec)
            if len(specs) >= batch_size:
                keys_now = [s.key for s in specs]
                futures.extend(self._submitted_futures(keys_now))  # tracked before the results can arrive
                self._send(m.SubmitGraph(specs, keys_now, functions))
                specs = []
        if specs:
            keys_now = [s.key for s in specs]
            futures.extend(self._submitted_futures(keys_now))
            self._send(m.SubmitGraph(specs, keys_now, functions))
        return futures

    @gc_paused()
    def submit_graph(
        self,
        graph: dict,
        keys: Iterable,
        *,
        priorities: dict | None = None,
        annotations: dict | None = None,
        fuse: bool = True,
    ) -> list[Future]:
        """Submit a ``{key: spec.Node}`` graph; return futures for ``keys``.

        Keys the graph references but does not define must be held by futures
        of this client (or be known to the scheduler).  With ``fuse``, linear
        chains of tasks that nothing else reads run as one task
        (:func:`shoal.spec.fuse_linear`; annotations are respected)."""
        from ..spec import fuse_linear
        from ..spec import order as graph_order

        keys = list(keys)
        prio = priorities if priorities is not None else graph_order(graph)
        annotations = annotations or {}
        if fuse:
            graph = fuse_linear(graph, keys, annotations, priorities=prio)
        specs = []
        functions: dict = {}
        for k, node in graph.items():
            ftoken = ""
            try:
                if type(node) is Task:
                    # The function travels once per graph, the arguments alone per task.
                    ftoken, fpayload = self._function(node.func)
                    functions[ftoken] = fpayload
                    payload = dumps_args((node.args, node.kwargs))
                else:
                    payload = run_spec(node)
            except SerializationError:
                raise
            except Exception as e:
                raise SerializationError(f"cannot serialize task {k!r}: {type(e).__name__}: {e}") from e
            ann = annotations.get(k, {})
            specs.append(
                m.TaskSpec(
                    k,
                    list(node.dependencies),
                    payload,
                    prio.get(k, 0),
                    ann.get("priority", 0),
                    ann.get("retries") or 0,
                    worker_names(ann.get("workers")),
                    bool(ann.get("allow_other_workers", False)),
                    ann.get("resources"),
                    False,
                    ftoken,
                )
            )
        futures = self._submitted_futures(keys)
        if len(specs) <= GRAPH_PART:
            self._send(m.SubmitGraph(specs, keys, functions))
            return futures
        # In parts, dependencies first (the graph order is topological), so
        # the scheduler can handle one part at a time.
        specs.sort(key=lambda s: s.order)
        for i in range(0, len(specs), GRAPH_PART):
            part = specs[i : i + GRAPH_PART]
            last = i + GRAPH_PART >= len(specs)
            used = {s.func for s in part if s.func}
            self._send(m.SubmitGraph(part, keys if last else [], {t: functions[t] for t in used}, not last))
        return futures

    def scatter(self, data: Any, *, hash: bool = True):
        """Send local data to the cluster; returns futures in the same shape
        (a list, a dict, or one future for one object)."""
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, (list, tuple, set, frozenset)):
            items = [(None, v) for v in data]
        else:
            items = [(None, data)]
        specs, futures = [], []
        for k, value in items:
            payload = run_spec(DataNode(None, value))
            if k is None:
                k = f"{type(value).__name__}-{content_token(payload) if hash else self._unique()}"
            specs.append(m.TaskSpec(k, [], payload, 0, 0, 0, None, False, None, True))
            futures.append(Future(k, self, submitted=True))
        self._send(m.SubmitGraph(specs, [s.key for s in specs]))
        if isinstance(data, dict):
            return {k: f for (k, _), f in zip(items, futures)}
        if isinstance(data, (list, tuple, set, frozenset)):
            return futures if not isinstance(data, tuple) else tuple(futures)
        return futures[0]

    def cancel(self, futures, reason: str = "cancelled by the client") -> None:
        fs = [futures] if isinstance(futures, Future) else list(futures)
        self._cancel([f.key for f in fs], reason)

    def _cancel(self, keys: list, reason: str) -> None:
        with self._lock:
            states = [self._states[k] for k in keys if k in self._states]
        self._send(m.CancelKeys(keys))

        def mark():
            for st in states:
                if not st.done():
                    st.set_cancelled(reason)

        self._io.call_soon(mark)

    def gather(self, futures, errors: str = "raise"):
        """Results for futures inside any nesting of lists, tuples, dicts and sets."""
        if self.asynchronous:
            return self._gather_async(futures, errors)
        flat: list[Future] = []
        collect_futures(futures, flat)
        values = self._results(flat, errors, None)
        return rebuild(futures, values)

    async def _gather_async(self, futures, errors: str = "raise"):
        flat: list[Future] = []
        collect_futures(futures, flat)
        loop = asyncio.get_running_loop()
        values = await loop.run_in_executor(None, self._results, flat, errors, None)
        return rebuild(futures, values)

    def _result(self, fut: Future, deadline: float | None) -> Any:
        return self._results([fut], "raise", deadline)[fut.key]

    async def _result_async(self, fut: Future) -> Any:
        loop = asyncio.get_running_loop()
        values = await loop.run_in_executor(None, self._results, [fut], "raise", None)
        return values[fut.key]

    def _results(self, futures: list[Future], errors: str, deadline: float | None) -> dict:
        """Wait for futures and fetch their values from the workers."""
        out: dict = {}
        todo = {f.key: f for f in futures}
        attempts = 0
        while todo:
            for f in todo.values():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0 or not f._state.wait(left):
                    raise TimeoutError(f"result of {f.key!r} not ready within the timeout")
            ready = []
            for k, f in list(todo.items()):
                st = f._state
                if st.status == FINISHED:
                    ready.append(st)
                elif errors == "skip":
                    del todo[k]
                else:
                    raise _with_remote_traceback(st.exception, st.traceback)
            if not ready:
                break
            payloads, failed = self._io.run(self._fetch(ready))
            for st in ready:
                if st.id in payloads:
                    out[st.key] = deserialize(payloads[st.id], what=f"the result of {st.key!r}")
                    todo.pop(st.key, None)
            for st, why, _ in failed:
                if isinstance(why, SerializationError):
                    raise why
            if failed:
                attempts += 1
                if attempts > 20:
                    raise CommClosedError(f"could not fetch {[f[0].key for f in failed][:5]}: {failed[0][1]}")
                self._io.run(self._reset_states([(st, address) for st, _, address in failed]))
        return out

    async def _reset_states(self, failed: list[tuple[FutureState, str]]) -> None:
        """Forget holders that failed; with none left, wait for the scheduler to
        report the data again (held elsewhere, or recomputed)."""
        for st, address in failed:
            if st.status != FINISHED:
                continue
            # The scheduler may have named new holders meanwhile: keep those.
            st.workers = [w for w in st.workers if w != address and w in self._workers]
            if not st.workers:
                st.reset()

    async def _fetch(self, states: list[FutureState]) -> tuple[dict, list]:
        by_worker: dict[str, list[FutureState]] = {}
        for st in states:
            by_worker.setdefault(st.workers[0] if st.workers else "", []).append(st)
        payloads: dict = {}
        failed: list = []

        async def one(address: str, sts: list[FutureState]) -> None:
            if not address:
                failed.extend((st, CommClosedError("no holder known"), address) for st in sts)
                return
            ids = [st.id for st in sts]
            errors: dict = {}
            bad: set = set()
            while ids:  # a worker answers in parts of bounded size (``later``: ask again)
                try:
                    resp = await self._get_data(address, ids)
                except (CommClosedError, OSError, TimeoutError) as e:
                    failed.extend((st, e, address) for st in sts if st.id not in payloads)
                    return
                for tid, payload in zip(resp.ids, resp.payloads):
                    payloads[tid] = payload
                bad.update(resp.missing)
                errors.update(resp.errors)
                ids = list(resp.later)
            for st in sts:
                if st.id in errors:
                    failed.append((st, SerializationError(errors[st.id]), address))
                elif st.id in bad:
                    failed.append((st, CommClosedError(f"{address} no longer holds it"), address))

        await asyncio.gather(*(one(a, s) for a, s in by_worker.items()))
        return payloads, failed

    async def _get_data(self, address: str, ids: list[int]) -> m.DataResponse:
        comm = self._worker_comms.get(address)
        if comm is None or comm.closed:
            comm = await connect(address, m.ToClient, timeout=self.timeout)
            comm.send(m.PeerHello(self.id))
            comm.handler = self._on_worker_msgs
            comm.on_closed = self._on_worker_closed
            self._worker_comms[address] = comm
        rid = next(self._request_ids)
        fut = asyncio.get_running_loop().create_future()
        fut.comm = comm  # type: ignore[attr-defined]
        self._requests[rid] = fut
        comm.send(m.GetData(rid, ids))
        return await fut

    def _on_worker_msgs(self, comm: Comm, msgs: list) -> None:
        for msg in msgs:
            if type(msg) is not m.DataResponse:
                raise ProtocolError(f"worker sent {type(msg).__name__} on a data connection")
            fut = self._requests.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_worker_closed(self, comm: Comm, exc) -> None:
        for rid, fut in list(self._requests.items()):
            if getattr(fut, "comm", None) is comm and not fut.done():
                self._requests.pop(rid, None)
                fut.set_exception(CommClosedError(f"worker {comm.peer_address} closed: {exc}"))

    # -- cluster information ---------------------------------------------------------------

    def scheduler_info(self, validate: bool = False) -> dict:
        """The scheduler's task counts by state, workers, and process/wire counters.

        ``validate=True`` also checks every invariant of the scheduler's state
        (a pass over all its tasks) and reports the first broken one as
        ``invariant_error`` ("" when all hold)."""
        return self._run(self._ask(lambda rid: m.RequestInfo(rid, validate)))

    def retire_workers(self, workers: Iterable[str], *, close: bool = True, timeout: float | None = None):
        """Retire ``workers`` (names or addresses) gracefully; block until done.

        They are sent no new tasks and hand back those they have not started;
        tasks already running there finish.  Data held only by them is copied
        to the other workers: nothing is recomputed.  Then, with ``close``,
        they stop for good (their nanny does not restart them); without it,
        they stay connected but idle, for an outside system to stop them.

        Raises :class:`~shoal.RetirementError` for unknown workers, or when no
        other worker would remain to take their data; ``TimeoutError`` after
        ``timeout`` (default: the client's ``timeout``), while the retirement
        carries on in the scheduler."""
        names = [workers] if isinstance(workers, str) else list(workers)

        async def retire() -> None:
            error = await self._ask(lambda rid: m.RetireWorkers(rid, names, close), timeout)
            if error:
                raise RetirementError(error)

        return self._run(retire())

    async def _ask(self, make_msg: Callable[[int], Any], timeout: float | None = None) -> Any:
        """Send the scheduler a request (``make_msg(request_id)``) and await its answer."""
        timeout = self.timeout if timeout is None else timeout
        comm = self._comm
        if comm is None or comm.closed or self.status != "running":
            raise CommClosedError(f"client is {self.status}")
        rid = next(self._request_ids)
        fut = asyncio.get_running_loop().create_future()
        fut.comm = comm  # type: ignore[attr-defined]  (failed if this connection drops)
        self._requests[rid] = fut
        comm.send(make_msg(rid))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise TimeoutError(f"the scheduler did not answer within {timeout:g}s") from None
        finally:
            self._requests.pop(rid, None)

    def _run(self, coro):
        """Run ``coro`` on the I/O loop: its result, or an awaitable when asynchronous."""
        if self.asynchronous:
            return asyncio.wrap_future(self._io.submit(coro))
        return self._io.run(coro)

    @property
    def workers(self) -> list[str]:
        """Addresses of the workers the scheduler knows of now."""
        return list(self._workers)

    def wait_for_workers(self, n: int = 1, timeout: float | None = None):
        async def _wait():
            async with self._workers_changed:
                await asyncio.wait_for(
                    self._workers_changed.wait_for(lambda: len(self._workers) >= n), timeout
                )

        if self.asynchronous:
            return asyncio.wrap_future(self._io.submit(_wait()))
        try:
            self._io.run(_wait())
        except (TimeoutError, asyncio.TimeoutError):
            raise TimeoutError(f"only {len(self._workers)} of {n} workers joined within {timeout}s") from None

    # -- closing ---------------------------------------------------------------------------

    def close(self, timeout: float = 10.0):
        if self.status in ("closing", "closed"):
            return _done_awaitable() if self.asynchronous else None
        self.status = "closing"
        self._unset_dask_default()

        async def _close():
            task = self._reconnecting
            if task is not None:
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
            comm = self._comm
            if comm is not None and not comm.closed:
                comm.send(m.CloseClient())
                comm.close()
            for c in list(self._worker_comms.values()):
                c.close()

        try:
            self._io.run(_close(), timeout)
        except Exception:
            pass
        self._shutdown_io()
        self.status = "closed"
        with self._lock:
            states = list(self._states.values())
        for st in states:  # callbacks may drop futures (and edit _states)
            if not st.done():
                st.set_cancelled("client closed")
        if self._owns_cluster and self._cluster is not None:
            self._cluster.close()
        return _done_awaitable() if self.asynchronous else None

    def _shutdown_io(self) -> None:
        self._io.stop()
        self._callbacks.shutdown(wait=False)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Client":
        await self
        return self

    async def __aexit__(self, *exc) -> None:
        result = self.close()
        if result is not None:
            await result

    def __repr__(self) -> str:
        return f"<shoal.Client {self.scheduler_address} {self.status}, {len(self._workers)} workers>"

    # -- Dask integration (see shoal.integrations.dask) ----------------------------------------

    def get(self, dsk, keys, **kwargs):
        """The Dask scheduler protocol: compute ``keys`` of graph ``dsk``."""
        from ..integrations import dask as shoal_dask

        return shoal_dask.get(self, dsk, keys, **kwargs)

    def compute(self, collections, *, sync: bool = False, **kwargs):
        """Dask collection(s) -> Future(s) of their results (values if ``sync``)."""
        from ..integrations import dask as shoal_dask

        return shoal_dask.compute(self, collections, sync=sync, **kwargs)

    def persist(self, collections, **kwargs):
        """Dask collection(s) -> the same type, backed by data held on the workers."""
        from ..integrations import dask as shoal_dask

        return shoal_dask.persist(self, collections, **kwargs)

    def _set_dask_default(self) -> None:
        try:
            from ..integrations import dask as shoal_dask
        except ImportError:
            return
        self._dask_config = shoal_dask.set_default(self)

    def _unset_dask_default(self) -> None:
        if self._dask_config is not None:
            from ..integrations import dask as shoal_dask

            shoal_dask.unset_default(self, self._dask_config)
            self._dask_config = None


class _Release:
    __slots__ = ("key",)

    def __init__(self, key: Any):
        self.key = key


async def _noop() -> None:
    return None


def _done_awaitable():
    return _noop()


def _close_at_exit(ref) -> None:
    c = ref()
    if c is not None and c.status not in ("closed",):
        try:
            c.close(timeout=2)
        except Exception:
            pass
