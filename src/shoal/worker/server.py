"""The worker's reactor: sockets, threads and values around ``WorkerState``.

It turns incoming batches, finished threads and memory samples into events,
calls ``WorkerState.handle`` once per batch, and carries out the commands:
start tasks, fetch inputs from peers, keep, drop, spill and unspill values
(``DataStore``), message the scheduler.  It also serves its data to peers and
clients (``GetData``), answering peers "busy" when it cannot afford to send.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import resource
import tempfile
import uuid
from typing import Any

import psutil

from ..comm import Comm, connect, listen
from ..errors import CommClosedError, ProtocolError, SerializationError
from ..protocol import messages as m
from ..protocol.serialize import deserialize, sizeof
from .executor import Executor, LazyFunction, Outcome
from .memory import MemoryLimits, trim_heap
from .state import (
    FetchBusy,
    FetchFailed,
    FetchSucceeded,
    MemorySampled,
    PeerRetry,
    SchedulerSent,
    SpillFailed,
    TaskCompleted,
    TaskFailed,
    WorkerState,
)
from .store import DataStore, purge_stale_spill, spill_directory

logger = logging.getLogger("shoal.worker")

PEER_ROLE_MSGS = (m.GetData,)
# Peers are answered "busy" while more than this many bytes wait to be sent
# to other peers (a quarter of the memory limit, if that is less), and while
# paused, as soon as anything does: every serialized copy costs memory.
MAX_OUTGOING_BYTES = 256 * 2**20
# Rounds of tasks finishing at once (inline or zero) handled in one go
# before the event loop gets a turn.
SYNC_ROUNDS = 64
# One answer to a data request carries at most about this many bytes (at
# least one value); the rest is listed as ``later`` and asked for again.  So
# a fetcher may name thousands of small keys in one request, and a request
# for many large ones neither builds a huge packet nor delays urgent ones.
RESPONSE_BYTES = 50 * 2**20
_worker_numbers = itertools.count()


class Worker:
    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int = 1,
        name: str | None = None,
        memory_limit: int = 0,
        memory_target: float = 0.6,
        memory_spill: float = 0.7,
        memory_pause: float = 0.8,
        memory_terminate: float = 0.95,
        memory_monitor_interval: float = 0.1,
        local_directory: str | None = None,
        resources: dict | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_interval: float = 1.0,
        connect_timeout: float = 30.0,
        validate: bool = False,
        zero: bool = False,
        inline_tasks: bool = True,
    ):
        self.scheduler_address = scheduler_address
        self.inline_tasks = inline_tasks  # see shoal.worker.executor
        self.nthreads = nthreads
        self.name = name or f"worker-{uuid.uuid4().hex[:8]}"
        self.memory_limit = memory_limit
        self.limits = MemoryLimits(memory_limit, memory_target, memory_spill, memory_pause, memory_terminate)
        # 0 turns sampling off (in-process workers share one process's memory).
        self.memory_monitor_interval = memory_monitor_interval
        self.max_outgoing_bytes = min(MAX_OUTGOING_BYTES, memory_limit // 4) if memory_limit else MAX_OUTGOING_BYTES
        self.response_bytes = RESPONSE_BYTES
        self.local_directory = local_directory or tempfile.gettempdir()
        self.resources = dict(resources or {})
        self.host = host
        self.port = port
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = connect_timeout
        # A zero worker reports every task finished, with a tiny fake result,
        # without running it: what remains is the runtime's own cost per task.
        self.zero = zero
        self._zero_done: list[Outcome] = []  # finished at once, taken by _handle
        self._functions: dict[int, LazyFunction] = {}
        self.state = WorkerState(nthreads, memory=self.limits, validate=validate)
        # Several workers may share a process (LocalCluster(processes=False)):
        # each spills in its own folder of the process's spill directory.
        self.store = DataStore(
            os.path.join(spill_directory(self.local_directory, os.getpid()), str(next(_worker_numbers)))
        )
        self._arrived: dict[int, Any] = {}  # fetched values, until the core accepts them
        self._data_comms: set[Comm] = set()  # connections peers fetch from us on
        self.busy_answers = 0
        self.address = ""
        self._scheduler: Comm | None = None
        self._listener = None
        self._executor: Executor | None = None
        self._peer_comms: dict[str, Comm] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._requests: dict[int, asyncio.Future] = {}
        self._request_ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._welcomed: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self.close_reason = ""
        self._process = psutil.Process()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> "Worker":
        loop = asyncio.get_running_loop()
        self._welcomed = asyncio.Event()
        self._closed = asyncio.Event()
        self._executor = Executor(self.nthreads, self._on_outcomes, loop, inline=self.inline_tasks)
        self._listener = await listen(f"tcp://{self.host}:{self.port}", self._on_incoming, m.ToWorker)
        self.address = self._listener.address
        try:
            comm = await connect(self.scheduler_address, m.ToWorker, timeout=self.connect_timeout)
        except CommClosedError:
            await self._listener.close()
            raise
        self._scheduler = comm
        comm.on_closed = self._on_scheduler_lost
        comm.send(
            m.RegisterWorker(
                self.name, self.address, self.nthreads, self.memory_limit, self.resources, os.getpid()
            )
        )
        comm.flush()
        comm.handler = self._on_scheduler_msgs
        welcomed = asyncio.ensure_future(self._welcomed.wait())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([welcomed, closed], timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            welcomed.cancel()
            closed.cancel()
        if self._closed.is_set():
            raise CommClosedError(f"closed while registering with {self.scheduler_address}: {self.close_reason}")
        if not self._welcomed.is_set():
            await self.close("scheduler did not answer registration")
            raise CommClosedError(f"scheduler at {self.scheduler_address} did not welcome us")
        self._spawn(self._heartbeat())
        if self.limits.limit and self.memory_monitor_interval:
            self._spawn(self._monitor_memory())
        for path in purge_stale_spill(self.local_directory):
            logger.info("removed %s, left by a worker process that no longer runs", path)
        logger.info("worker %s at %s registered with %s", self.name, self.address, self.scheduler_address)
        return self

    async def finished(self) -> str:
        await self._closed.wait()
        return self.close_reason

    async def close(self, reason: str = "closed") -> None:
        if self._closed is None or self._closed.is_set():
            return
        self.close_reason = reason
        self._closed.set()
        sched = self._scheduler
        if sched is not None and not sched.closed:
            sched.send(m.WorkerClosing(reason))
            sched.flush()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except BaseException:
                pass
        if self._scheduler is not None:
            self._scheduler.close()
        for c in list(self._peer_comms.values()):
            c.close()
        if self._listener is not None:
            await self._listener.close()
        if self._executor is not None:
            self._executor.shutdown()
        self.store.close()
        try:
            os.rmdir(os.path.dirname(self.store.directory))  # the process's, once its last worker closed
        except OSError:
            pass
        logger.info("worker %s closed: %s", self.name, reason)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _on_scheduler_lost(self, comm: Comm, exc) -> None:
        if not self._closed.is_set():
            self._spawn_close(f"lost the scheduler: {exc or 'connection closed'}")

    def _spawn_close(self, reason: str) -> None:
        asyncio.get_running_loop().create_task(self.close(reason))

    def _rss(self) -> int:
        try:
            return self._process.memory_info().rss
        except psutil.Error:
            return 0

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if self._scheduler is not None and not self._scheduler.closed:
                self._scheduler.send(self.heartbeat())

    def heartbeat(self) -> m.WorkerHeartbeat:
        res = self.state.residency
        return m.WorkerHeartbeat(
            self._rss(),
            len(self.state.executing),
            len(self.store),
            managed=res.fast_bytes,
            spilled=res.slow_bytes,
            spilled_count=len(res.slow),
            spilled_total=res.spilled_total,
            peak_memory=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        )

    async def _monitor_memory(self) -> None:
        # Memory the worker freed (a spilled result, say) may stay in glibc's
        # heap and keep RSS high: above the spill threshold, hand it back
        # first, so spilling and pausing act on what is really held (see
        # also MALLOC_MMAP_THRESHOLD_ in nanny.py).
        limits = self.limits
        high = limits.bytes(limits.spill) or limits.bytes(limits.pause)
        while True:
            await asyncio.sleep(self.memory_monitor_interval)
            rss = self._rss()
            if high is not None and rss > high and trim_heap():
                rss = self._rss()
            self._handle([MemorySampled(rss)])

    # -- the core loop --------------------------------------------------------------

    def _on_scheduler_msgs(self, comm: Comm, msgs: list) -> None:
        close = None
        for i, msg in enumerate(msgs):
            if type(msg) not in _FROM_SCHEDULER:
                raise ProtocolError(f"scheduler sent {type(msg).__name__}, which is not a scheduler message")
            if type(msg) is m.CloseWorker:
                close = msg
                msgs = msgs[:i]
                break
        if msgs:
            self._handle([SchedulerSent(msgs)])
        if not self._welcomed.is_set() and self.state.wid is not None:
            self._welcomed.set()
        if close is not None:
            self._spawn_close(f"scheduler asked: {close.reason}")

    def _handle(self, events: list) -> None:
        """Handle events and carry out the commands; tasks that finish at once
        (run inline, or on a zero worker) are handled in the same call, round
        after round, so a thousand tiny tasks cost no event-loop turn each and
        their TaskFinished messages leave together."""
        for _ in range(SYNC_ROUNDS):
            self._apply(self.state.handle(events))
            done = self._take_finished()
            if not done:
                return
            events = self._outcome_events(done)
            if not events:
                return
        # A long burst: let the loop serve heartbeats and peers, then go on.
        asyncio.get_running_loop().call_soon(self._handle, events)

    def _take_finished(self) -> list:
        """Outcomes of the tasks that finished while commands were carried out."""
        done = self._zero_done
        if done:
            self._zero_done = []
        ex = self._executor
        if ex is not None and ex.inline_done:
            done = done + ex.take_inline() if done else ex.take_inline()
        return done

    def _apply(self, cmds) -> None:
        store = self.store
        arrived = self._arrived
        for tid in cmds.accept:
            store.put(tid, arrived[tid])
        arrived.clear()
        for tid in cmds.forget:
            store.forget(tid)
        for tid in cmds.unspill:
            store.unspill(tid, what=self._describe(tid))
        failed = self._spill(cmds.spill) if cmds.spill else None
        sched = self._scheduler
        to_scheduler = cmds.to_scheduler
        if self.zero and to_scheduler:
            # Nothing runs on a zero worker, so nothing can crash it: what it
            # started needs no telling (and no packet before each start).
            to_scheduler = [x for x in to_scheduler if type(x) is not m.TasksStarted]
        if to_scheduler and sched is not None and not sched.closed:
            sched.send_many(to_scheduler)
            if cmds.run and type(to_scheduler[-1]) is m.TasksStarted:
                sched.flush()  # TasksStarted reaches the kernel before any task can crash us
        if self.zero and cmds.run:
            self._zero_run(cmds.run)
            cmds.run = []
        for ts in cmds.run:
            try:
                data = {d.key: store.memory[d.id] for d in ts.deps}
            except KeyError as e:  # an invariant broke: fail loudly, not silently
                logger.error("task %r started without input %r", ts.key, e)
                raise
            func = self._function(ts.func) if ts.func else None
            self._executor.submit(ts.id, ts.key, ts.run_spec, data, func)
        for peer, address, ids in cmds.fetch:
            self._spawn(self._fetch(peer, address, ids))
        loop = None
        for peer, delay in cmds.retry:
            loop = loop or asyncio.get_running_loop()
            loop.call_later(delay, self._retry_peer, peer)
        if failed:
            self._handle([SpillFailed(failed)])

    def _spill(self, ids) -> list[int]:
        """Write values to disk; return those that could not be."""
        failed = []
        for tid in ids:
            try:
                self.store.spill(tid, what=self._describe(tid))
            except (SerializationError, OSError) as e:
                logger.warning("cannot spill %s to disk, keeping it in memory: %s", self._describe(tid), e)
                failed.append(tid)
        return failed

    def _retry_peer(self, peer: int) -> None:
        if not self._closed.is_set():
            self._handle([PeerRetry(peer)])

    def _function(self, fid: int) -> "LazyFunction":
        """The shared function ``fid``, unpickled once (in a task thread)."""
        fn = self._functions.get(fid)
        payload = self.state.functions.get(fid)
        if fn is None or fn.payload is not payload:
            fn = self._functions[fid] = LazyFunction(fid, payload)
        if len(self._functions) > 2 * len(self.state.functions) + 64:
            for f in [f for f in self._functions if f not in self.state.functions]:
                del self._functions[f]
                self._executor.forget(f)
        return fn

    def _zero_run(self, tasks: list) -> None:
        for ts in tasks:
            out = Outcome(ts.id)
            out.ok = True
            out.nbytes = 8
            out.type_name = "NoneType"
            self._zero_done.append(out)

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        events = self._outcome_events(outcomes)
        if events:
            self._handle(events)

    def _outcome_events(self, outcomes: list[Outcome]) -> list:
        if self._closed.is_set():
            return []
        events = []
        for out in outcomes:
            if out.ok:
                self.store.put(out.id, out.value)
                events.append(TaskCompleted(out.id, out.nbytes, out.type_name, out.duration))
            else:
                events.append(TaskFailed(out.id, out.exception, out.traceback))
        return events

    # -- fetching from peers --------------------------------------------------------------

    async def _peer(self, address: str) -> Comm:
        comm = self._peer_comms.get(address)
        if comm is not None and not comm.closed:
            return comm
        pending = self._connecting.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        fut = asyncio.get_running_loop().create_future()
        self._connecting[address] = fut
        try:
            comm = await connect(address, m.ToWorker, timeout=self.connect_timeout)
            comm.send(m.PeerHello(self.name, address=self.address))
            comm.handler = self._on_peer_answer
            comm.on_closed = self._on_peer_closed
            self._peer_comms[address] = comm
            fut.set_result(comm)
            return comm
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            self._connecting.pop(address, None)

    def _on_peer_answer(self, comm: Comm, msgs: list) -> None:
        for msg in msgs:
            if type(msg) is not m.DataResponse:
                raise ProtocolError(f"peer sent {type(msg).__name__} on a data connection")
            fut = self._requests.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_peer_closed(self, comm: Comm, exc) -> None:
        for rid, fut in list(self._requests.items()):
            if getattr(fut, "comm", None) is comm and not fut.done():
                fut.set_exception(CommClosedError(f"peer {comm.peer_address} closed: {exc}"))
                self._requests.pop(rid, None)

    async def _fetch(self, peer: int, address: str, ids: list[int]) -> None:
        try:
            comm = await self._peer(address)
            rid = next(self._request_ids)
            fut = asyncio.get_running_loop().create_future()
            fut.comm = comm  # type: ignore[attr-defined]
            self._requests[rid] = fut
            comm.send(m.GetData(rid, ids))
            async with asyncio.timeout(300):
                resp: m.DataResponse = await fut
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.info("fetch of %d keys from %s failed: %s", len(ids), address, e)
            self._handle([FetchFailed(peer, ids, str(e))])
            return
        if resp.busy:
            self._handle([FetchBusy(peer, ids)])
            return
        got, nbytes, errors = [], [], dict(resp.errors)
        for tid, payload in zip(resp.ids, resp.payloads):
            try:
                value = deserialize(payload)
            except SerializationError:
                try:  # again, for an error that names the task
                    deserialize(payload, what=self._describe(tid))
                except SerializationError as e:
                    errors[tid] = str(e)
                continue
            self._arrived[tid] = value
            got.append(tid)
            nbytes.append(sizeof(value))
        self._handle([FetchSucceeded(peer, got, nbytes, list(resp.missing), errors, list(resp.later))])

    # -- serving data ------------------------------------------------------------------------

    def _on_incoming(self, comm: Comm) -> None:
        comm.handler = self._on_first_peer_msgs

    def _on_first_peer_msgs(self, comm: Comm, msgs: list) -> None:
        hello = msgs[0]
        if type(hello) is not m.PeerHello:
            raise ProtocolError(f"expected PeerHello first, got {type(hello).__name__}")
        comm.info["peer"] = hello.name
        comm.info["worker"] = bool(hello.address)
        self._data_comms.add(comm)
        comm.on_closed = self._on_data_comm_closed
        comm.handler = self._on_peer_request
        if len(msgs) > 1:
            self._on_peer_request(comm, msgs[1:])

    def _on_peer_request(self, comm: Comm, msgs: list) -> None:
        for msg in msgs:
            if type(msg) is not m.GetData:
                raise ProtocolError(f"{type(msg).__name__} is not a data request")
            if comm.info["worker"] and self._too_busy_for(comm):
                self.busy_answers += 1
                comm.send(m.DataResponse(msg.request_id, [], [], busy=True))
                continue
            ids, payloads, missing, errors = [], [], [], {}
            store = self.store
            size, limit = 0, self.response_bytes
            later: list = []
            for i, tid in enumerate(msg.ids):
                if size >= limit:
                    later = [t for t in msg.ids[i:] if t in store]
                    missing.extend(t for t in msg.ids[i:] if t not in store)
                    break
                if tid in store:
                    try:
                        payload = store.payload(tid)
                    except SerializationError:
                        try:  # again, for an error that names the task (rare: not described up front)
                            store.payload(tid, what=self._describe(tid))
                        except SerializationError as e:
                            errors[tid] = str(e)
                        continue
                    payloads.append(payload)
                    ids.append(tid)
                    for f in payload.frames:
                        size += memoryview(f).nbytes
                else:
                    missing.append(tid)
            comm.send(m.DataResponse(msg.request_id, ids, payloads, missing, errors, later=later))

    def _too_busy_for(self, comm: Comm) -> bool:
        """Whether to answer a peer's request "busy" instead of sending.

        Only what other peers are still being sent counts: a request that
        finds nothing else under way is always served, so "busy" delays a
        transfer (the fetcher asks another holder or waits), never refuses it.
        """
        others = [c for c in self._data_comms if c is not comm and c.sending]
        if self.state.paused:
            return bool(others)
        return sum(c.unsent_bytes for c in others) > self.max_outgoing_bytes

    def _on_data_comm_closed(self, comm: Comm, exc) -> None:
        self._data_comms.discard(comm)

    def _describe(self, tid: int) -> str:
        ts = self.state.tasks.get(tid)
        return f"the result of task {ts.key!r}" if ts is not None else f"the result of task id {tid}"


_FROM_SCHEDULER = (
    m.WorkerWelcome,
    m.PeersChanged,
    m.Execute,
    m.ReleaseData,
    m.CancelTasks,
    m.CloseWorker,
    m.DefineFunction,
    m.ReleaseFunctions,
    m.AcquireData,
    m.DrainWorker,
    m.StealTasks,
)


async def run_worker(scheduler_address: str, **kwargs) -> str:
    """Start a worker and serve until it closes; return why it closed."""
    w = Worker(scheduler_address, **kwargs)
    await w.start()
    try:
        return await w.finished()
    finally:
        await w.close("stopping")
