"""The worker as a pure state machine: ``handle(events) -> WorkerCommands``.

It decides what runs next, what to fetch from which peer, which values live
in memory and which on disk, when to pause for memory, and what to tell the
scheduler; the reactor (``worker/server.py``) runs tasks in threads, moves
bytes and keeps the values (``worker/store.py``).  No I/O, no clock reads:
memory use arrives as an event (``MemorySampled``).

Every piece of data the worker holds was announced to the scheduler (by
``TaskFinished`` or ``DataAcquired``), and it is dropped only when the
scheduler says so (``ReleaseData``): the scheduler's view of who has what
stays exact.

A worker's view of a task (``WorkerTask``) moves through::

    FETCH -> FLIGHT -> MEMORY                       (an input held elsewhere)
    WAITING -> READY -> EXECUTING -> MEMORY         (a task assigned here)
                            \\-> CANCELLED           (released while running)
"""

from __future__ import annotations

import enum
import heapq
import itertools
from typing import Any, Iterable

import msgspec

from ..errors import SerializationError
from ..protocol import messages as m
from ..protocol.serialize import serialize
from .memory import MemoryLimits, Residency

# A batch sent to one peer asks for at most this many keys (its answer is
# bounded in bytes by the holder, which lists the rest as ``later``) ...
FETCH_BATCH = 50_000
# ... and at most this many peers are asked at once.
MAX_PEERS_IN_FLIGHT = 16
# A peer that answered "busy" is asked again after this many seconds,
# doubling with each busy answer in a row up to BUSY_RETRY_MAX.
BUSY_RETRY_FIRST = 0.02
BUSY_RETRY_MAX = 1.0


class WTState(enum.Enum):
    FETCH = "fetch"
    FLIGHT = "flight"
    WAITING = "waiting"
    READY = "ready"
    EXECUTING = "executing"
    CANCELLED = "cancelled"
    MEMORY = "memory"

    __hash__ = object.__hash__  # singletons: identity hashing, in C (see scheduler.records)


FETCH = WTState.FETCH
FLIGHT = WTState.FLIGHT
WAITING = WTState.WAITING
READY = WTState.READY
EXECUTING = WTState.EXECUTING
CANCELLED = WTState.CANCELLED
MEMORY = WTState.MEMORY


class WorkerTask:
    """The worker's view of one task or one piece of data it needs."""

    __slots__ = ("id", "key", "state", "run_spec", "func", "priority", "deps", "dependents", "missing", "who_has", "nbytes")

    def __init__(self, id: int, key: Any, state: WTState):
        self.id = id
        self.key = key
        self.state = state
        self.run_spec = None  # None: data only, never run here
        self.func = 0  # id of a shared function (see WorkerState.functions); 0: none
        self.priority: tuple = ()
        self.deps: list[WorkerTask] = []
        self.dependents: set[WorkerTask] = set()
        self.missing = 0  # inputs not in memory yet, while WAITING
        self.who_has: list[int] = []  # peers believed to hold it, while FETCH/FLIGHT
        self.nbytes = 0

    def __repr__(self) -> str:
        return f"<WorkerTask {self.id} {self.key!r} {self.state.value}>"


# -- events ---------------------------------------------------------------------


class WorkerEvent(msgspec.Struct):
    pass


class SchedulerSent(WorkerEvent):
    """A batch of messages from the scheduler."""

    msgs: list


class TaskCompleted(WorkerEvent):
    id: int
    nbytes: int
    type_name: str = ""
    duration: float = 0.0


class TaskFailed(WorkerEvent):
    id: int
    exception: Any  # Payload
    traceback: str


class FetchSucceeded(WorkerEvent):
    peer: int
    ids: list
    nbytes: list
    missing: list = []
    errors: dict = {}  # id -> why the holder could not send it (unserializable)
    later: list = []  # held, but past the answer's size limit: ask again


class FetchFailed(WorkerEvent):
    peer: int
    ids: list
    reason: str = ""


class FetchBusy(WorkerEvent):
    """The peer sent nothing: it is paused or already sending too much."""

    peer: int
    ids: list


class PeerRetry(WorkerEvent):
    """The wait after a busy answer from ``peer`` is over."""

    peer: int


class MemorySampled(WorkerEvent):
    rss: int  # the process's resident memory, bytes


class SpillFailed(WorkerEvent):
    """The store could not write these values to disk; they stay in memory."""

    ids: list


# -- commands -------------------------------------------------------------------


class WorkerCommands:
    """Orders from one ``handle()`` call, carried out in this order:

    ``accept``: ids of fetched values to keep (others that arrived are
    dropped); ``forget``: ids whose values to drop; ``unspill`` / ``spill``:
    ids to read back from / write to disk; ``to_scheduler``: messages to
    send; ``run``: tasks to start (their inputs are in memory); ``fetch``:
    ``(peer id, peer address, [ids])`` requests; ``retry``: ``(peer, delay)``
    -- send ``PeerRetry(peer)`` after ``delay`` seconds.
    """

    __slots__ = ("run", "fetch", "accept", "forget", "spill", "unspill", "retry", "to_scheduler")

    def __init__(self):
        self.run: list[WorkerTask] = []
        self.fetch: list[tuple[int, str, list[int]]] = []
        self.accept: set[int] = set()
        self.forget: list[int] = []
        self.spill: set[int] = set()
        self.unspill: set[int] = set()
        self.retry: list[tuple[int, float]] = []
        self.to_scheduler: list = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if getattr(self, k))
        return f"WorkerCommands({fields})"


class InvariantError(AssertionError):
    pass


def _by_priority(ts: WorkerTask) -> tuple:
    return ts.priority


# Copies asked for by the scheduler are fetched after the inputs of tasks
# (whose priorities start with a finite number).
_COPY_PRIORITY = (float("inf"),)


class WorkerState:
    def __init__(self, nthreads: int = 1, *, memory: MemoryLimits | None = None, validate: bool = False):
        self.nthreads = nthreads
        self.limits = limits = memory or MemoryLimits()
        # Thresholds in bytes; None where that step is off.
        self._target = limits.bytes(limits.target)
        self._spill_at = limits.bytes(limits.spill)
        self._pause_at = limits.bytes(limits.pause)
        # Every value held (state MEMORY), in memory or on disk.
        self.residency = Residency()
        self.paused = False
        self.rss = 0  # the latest memory sample
        self.validate_each = validate
        self.wid: int | None = None
        self.tasks: dict[int, WorkerTask] = {}
        self.peers: dict[int, str] = {}
        # Heap of (priority, id, arrival, task).  The arrival number keeps
        # comparisons off the task: a task dropped and sent again (stolen and
        # given back, cancelled and resubmitted) has a stale entry with the
        # same priority and id, and tasks are not orderable.
        self.ready: list = []
        self._arrivals = itertools.count()
        self.executing: set[WorkerTask] = set()
        self.to_fetch: set[WorkerTask] = set()
        # Set when fetching may start anew (new inputs to fetch, a peer free):
        # planning fetches walks ``to_fetch``, so it runs only then.
        self._fetch_dirty = False
        self.in_flight: dict[int, set[WorkerTask]] = {}  # peer -> tasks asked of it
        # Peers that answered "busy": how many times in a row, and those not
        # to be asked until their PeerRetry.
        self.busy: dict[int, int] = {}
        self.resting: set[int] = set()
        self.functions: dict[int, Any] = {}  # id -> pickled function (Payload)
        # Data fetched because the scheduler asked for a copy (AcquireData),
        # kept although no task here needs it; leaves the set once held.
        self.copies: set[WorkerTask] = set()
        self._cmds = WorkerCommands()
        self._sched_handlers = {
            m.WorkerWelcome: self._on_welcome,
            m.PeersChanged: self._on_peers_changed,
            m.Execute: self._on_execute,
            m.ReleaseData: self._on_release,
            m.CancelTasks: self._on_cancel,
            m.DefineFunction: self._on_define_function,
            m.ReleaseFunctions: self._on_release_functions,
            m.AcquireData: self._on_acquire_data,
            m.DrainWorker: self._on_drain,
            m.StealTasks: self._on_steal,
        }
        self._handlers = {
            SchedulerSent: self._on_scheduler_sent,
            TaskCompleted: self._on_completed,
            TaskFailed: self._on_failed,
            FetchSucceeded: self._on_fetched,
            FetchFailed: self._on_fetch_failed,
            FetchBusy: self._on_fetch_busy,
            PeerRetry: self._on_peer_retry,
            MemorySampled: self._on_memory_sampled,
            SpillFailed: self._on_spill_failed,
        }

    @property
    def nbytes(self) -> int:
        """Bytes of every value held here, in memory or on disk."""
        return self.residency.fast_bytes + self.residency.slow_bytes

    def handle(self, events: Iterable) -> WorkerCommands:
        cmds = self._cmds = WorkerCommands()
        for ev in events:
            self._handlers[type(ev)](ev)
        self._start_ready()
        self._start_fetches()
        self._spill_over_target()
        self._cmds = WorkerCommands()
        if self.validate_each:
            self.validate()
        return cmds

    # -- scheduler messages --------------------------------------------------------

    def _on_scheduler_sent(self, ev: SchedulerSent) -> None:
        h = self._sched_handlers
        for msg in ev.msgs:
            h[type(msg)](msg)

    def _on_welcome(self, msg: m.WorkerWelcome) -> None:
        self.wid = msg.wid
        for p in msg.peers:
            self.peers[p.wid] = p.address

    def _on_peers_changed(self, msg: m.PeersChanged) -> None:
        self._fetch_dirty = True
        for p in msg.added:
            self.peers[p.wid] = p.address
        for wid in msg.removed:
            self.peers.pop(wid, None)
            self.busy.pop(wid, None)
            self.resting.discard(wid)
            orphans = []
            for ts in self.to_fetch:
                if wid in ts.who_has:
                    ts.who_has.remove(wid)
                    if not any(w in self.peers for w in ts.who_has):
                        orphans.append(ts)
            for ts in sorted(orphans, key=_by_priority):
                # Its last known holder left: the scheduler knows the others
                # (a copy made before a retirement, say) or recomputes it.
                self._cmds.to_scheduler.append(m.DataMissing(ts.id, wid, True))
                if ts in self.copies:
                    self._drop(ts)  # asked again if still wanted
            if wid in self.in_flight:
                # Gone (dead, or dropped by the scheduler for silence): its
                # answer may never come, so do not wait for it.
                self._on_fetch_failed(FetchFailed(wid, [], "peer left the cluster"))

    def _on_define_function(self, msg: m.DefineFunction) -> None:
        self.functions[msg.id] = msg.payload

    def _on_release_functions(self, msg: m.ReleaseFunctions) -> None:
        for fid in msg.ids:
            self.functions.pop(fid, None)

    def _on_execute(self, msg: m.Execute) -> None:
        ts = self.tasks.get(msg.id)
        if ts is not None:
            if ts.state is MEMORY:
                # Already here (fetched as an input): nothing to run.
                self._cmds.to_scheduler.append(m.TaskFinished(ts.id, ts.nbytes))
                return
            if ts.state is CANCELLED:
                ts.state = EXECUTING  # still running from before: keep its result
                return
            if ts.run_spec is not None and ts.state is not FLIGHT and ts.state is not FETCH:
                return  # a duplicate assignment
        else:
            ts = WorkerTask(msg.id, msg.key, WAITING)
            self.tasks[msg.id] = ts
        in_flight = ts.state is FLIGHT
        self.to_fetch.discard(ts)
        ts.key = m.as_key(msg.key)
        ts.run_spec = msg.run_spec
        ts.func = msg.func
        ts.priority = tuple(msg.priority)
        missing = 0
        deps = []
        for i, dep_id in enumerate(msg.deps):
            dts = self.tasks.get(dep_id)
            holders = msg.who_has[i] if i < len(msg.who_has) else []
            if dts is None:
                dts = WorkerTask(dep_id, m.as_key(msg.dep_keys[i]), FETCH)
                dts.who_has = [w for w in holders if w != self.wid]
                self.tasks[dep_id] = dts
                self._fetch_later(dts)
            elif dts.state in (FETCH, FLIGHT, CANCELLED):
                # CANCELLED: still running here; if it fails, fetch it instead.
                for w in holders:
                    if w not in dts.who_has and w != self.wid:
                        dts.who_has.append(w)
                        self._fetch_dirty = True
            dts.dependents.add(ts)
            if dts.state in (FETCH, FLIGHT) and (not dts.priority or ts.priority < dts.priority):
                dts.priority = ts.priority  # an input is as urgent as its most urgent user
            deps.append(dts)
            if dts.state is not MEMORY:
                missing += 1
        ts.deps = deps
        ts.missing = missing
        if in_flight:
            # Its value is on the way: the transfer finishes it, or, if the
            # transfer fails, it runs here (see _holder_failed).
            return
        self._wait_or_ready(ts)

    def _wait_or_ready(self, ts: WorkerTask) -> None:
        if ts.missing:
            ts.state = WAITING
        else:
            self._make_ready(ts)

    def _make_ready(self, ts: WorkerTask) -> None:
        ts.state = READY
        heapq.heappush(self.ready, (ts.priority, ts.id, next(self._arrivals), ts))

    def _on_acquire_data(self, msg: m.AcquireData) -> None:
        """Fetch and keep copies of data held elsewhere (the scheduler is
        moving it off a retiring worker)."""
        held_ids, held_nbytes = [], []
        for tid, key, holders in zip(msg.ids, msg.keys, msg.who_has):
            ts = self.tasks.get(tid)
            if ts is None:
                ts = WorkerTask(tid, m.as_key(key), FETCH)
                ts.priority = _COPY_PRIORITY
                self.tasks[tid] = ts
                self._fetch_later(ts)
            elif ts.state is MEMORY:
                held_ids.append(tid)  # already here: say so again
                held_nbytes.append(ts.nbytes)
                continue
            elif ts.state not in (FETCH, FLIGHT):
                continue  # a task of ours in some other state: the scheduler asks again later
            self.copies.add(ts)
            for w in holders:
                if w not in ts.who_has and w != self.wid:
                    ts.who_has.append(w)
                    self._fetch_dirty = True
        if held_ids:
            self._cmds.to_scheduler.append(m.DataAcquired(held_ids, held_nbytes))

    def _on_drain(self, msg: m.DrainWorker) -> None:
        """Being retired: give back every task not started; running ones finish."""
        rejected = []
        for ts in list(self.tasks.values()):
            if ts.run_spec is None or ts.state in (EXECUTING, CANCELLED, MEMORY):
                continue
            rejected.append(ts.id)
            if ts.state in (WAITING, READY):
                self._drop(ts)
            else:  # FETCH/FLIGHT: its value is on the way; it stays an input at most
                ts.run_spec = None
        if rejected:
            self._cmds.to_scheduler.append(m.TasksRejected(rejected))

    def _on_steal(self, msg: m.StealTasks) -> None:
        """Another worker has free threads: give back what has not started."""
        given, kept = [], []
        for tid in msg.ids:
            ts = self.tasks.get(tid)
            if ts is not None and ts.run_spec is not None and ts.state in (WAITING, READY):
                self._drop(ts)
                given.append(tid)
            else:
                kept.append(tid)  # running, done, or its value is on the way
        self._cmds.to_scheduler.append(m.TasksStolen(given, kept))

    def _on_release(self, msg: m.ReleaseData) -> None:
        for tid in msg.ids:
            ts = self.tasks.get(tid)
            if ts is None:
                continue
            if ts.state is EXECUTING:
                ts.state = CANCELLED
            elif ts.state is MEMORY:
                if any(d.state in (WAITING, READY, EXECUTING) for d in ts.dependents):
                    continue  # a local task still reads it; the scheduler re-releases later
                self._drop(ts)
            elif ts.state in (WAITING, READY):
                self._drop(ts)
            # FETCH/FLIGHT entries go when their last dependent does.

    def _on_cancel(self, msg: m.CancelTasks) -> None:
        # Every id is answered: the scheduler counts a thread busy for each
        # until it hears that the task is not (or no longer) running.
        stopped, running = [], []
        for tid in msg.ids:
            ts = self.tasks.get(tid)
            if ts is not None and ts.state is CANCELLED:
                running.append(tid)  # cancelled before, still running
                continue
            if ts is None or ts.run_spec is None:
                stopped.append(tid)
                continue
            if ts.state is EXECUTING:
                ts.state = CANCELLED
                running.append(tid)
                continue
            if ts.state in (WAITING, READY):
                self._drop(ts)
            elif ts.state in (FETCH, FLIGHT):
                ts.run_spec = None  # no longer ours to run; maybe still an input
            stopped.append(tid)
        self._cmds.to_scheduler.append(m.TasksCancelled(stopped, running))

    # -- executor and transfer results ------------------------------------------------

    def _on_completed(self, ev: TaskCompleted) -> None:
        ts = self.tasks.get(ev.id)
        if ts is None or ts not in self.executing:
            return
        self.executing.discard(ts)
        if ts.state is CANCELLED and not self._needed_here(ts):
            self._cmds.forget.append(ts.id)
            self._drop(ts)
            self._cmds.to_scheduler.append(m.TasksCancelled([ts.id]))  # its thread is free
            return
        self._to_memory(ts, ev.nbytes)
        self._cmds.to_scheduler.append(m.TaskFinished(ts.id, ev.nbytes, ev.type_name, ev.duration))

    def _on_failed(self, ev: TaskFailed) -> None:
        ts = self.tasks.get(ev.id)
        if ts is None or ts not in self.executing:
            return
        self.executing.discard(ts)
        if ts.state is not CANCELLED:
            self._cmds.to_scheduler.append(m.TaskErred(ts.id, ev.exception, ev.traceback))
            # Tasks sent ahead to wait for this one cannot run: the scheduler
            # takes them back (or errs them); drop them now.
            stack = [ts]
            while stack:
                for dts in list(stack.pop().dependents):
                    if dts.state is WAITING:
                        stack.append(dts)
                        self._drop(dts)
        else:
            self._cmds.to_scheduler.append(m.TasksCancelled([ts.id]))  # its thread is free
            if self._needed_here(ts):
                # Released, then needed again as another task's input: fetch
                # it from the holders the scheduler named.
                ts.run_spec = None
                ts.state = FETCH
                self._fetch_later(ts)
                return
        self._drop(ts)

    @staticmethod
    def _needed_here(ts: WorkerTask) -> bool:
        return any(d.state in (WAITING, READY, FLIGHT, FETCH) and d.run_spec is not None for d in ts.dependents)

    def _on_fetched(self, ev: FetchSucceeded) -> None:
        asked = self.in_flight.pop(ev.peer, set())
        self._fetch_dirty = True
        got_ids, got_nbytes = [], []
        if ev.ids:
            self.busy.pop(ev.peer, None)
        for tid, nbytes in zip(ev.ids, ev.nbytes):
            ts = self.tasks.get(tid)
            if ts is None or ts not in asked:
                continue  # no longer wanted, or a late answer: not accepted, so dropped
            asked.discard(ts)
            got_ids.append(tid)
            got_nbytes.append(nbytes)
            self._cmds.accept.add(tid)
            self._to_memory(ts, nbytes)
            if ts.run_spec is not None:
                # Assigned here while in flight: it is now done.
                self._cmds.to_scheduler.append(m.TaskFinished(ts.id, nbytes))
        if got_ids:
            self._cmds.to_scheduler.append(m.DataAcquired(got_ids, got_nbytes))
        for tid in ev.missing:
            ts = self.tasks.get(tid)
            if ts is not None and ts in asked:
                asked.discard(ts)
                self._holder_failed(ts, ev.peer)
        for tid, why in ev.errors.items():
            ts = self.tasks.get(tid)
            if ts is not None and ts in asked:
                asked.discard(ts)
                self._input_unusable(ts, why)
        for tid in ev.later:
            ts = self.tasks.get(tid)
            if ts is not None and ts in asked:
                asked.discard(ts)
                ts.state = FETCH
                self._fetch_later(ts)  # the same holder is asked again, next in line
        for ts in asked:  # neither delivered nor reported missing
            self._holder_failed(ts, ev.peer)

    def _input_unusable(self, ts: WorkerTask, why: str) -> None:
        """An input exists but cannot travel: its dependents here fail with why."""
        exc = serialize(SerializationError(f"input {ts.key!r} cannot be moved between processes: {why}"))
        for dts in list(ts.dependents):
            if dts.run_spec is not None and dts.state in (WAITING, READY):
                self._cmds.to_scheduler.append(m.TaskErred(dts.id, exc, ""))
                self._drop(dts)
        if ts.state is FLIGHT:
            ts.state = FETCH
            self._fetch_later(ts)
        if not ts.dependents and ts.run_spec is None:
            self._drop(ts)

    def _on_fetch_failed(self, ev: FetchFailed) -> None:
        asked = self.in_flight.pop(ev.peer, set())
        self._fetch_dirty = True
        for ts in asked:
            self._holder_failed(ts, ev.peer)

    def _on_fetch_busy(self, ev: FetchBusy) -> None:
        """Ask another holder, or this one again after a growing pause."""
        asked = self.in_flight.pop(ev.peer, set())
        self._fetch_dirty = True
        for ts in asked:
            if ts.state is FLIGHT:
                ts.state = FETCH
                self._fetch_later(ts)
                if ev.peer in ts.who_has and len(ts.who_has) > 1:
                    # Others hold it too: try them first.
                    ts.who_has.remove(ev.peer)
                    ts.who_has.append(ev.peer)
        if ev.peer in self.peers:
            n = self.busy[ev.peer] = self.busy.get(ev.peer, 0) + 1
            self.resting.add(ev.peer)
            self._cmds.retry.append((ev.peer, min(BUSY_RETRY_FIRST * 2 ** (n - 1), BUSY_RETRY_MAX)))

    def _on_peer_retry(self, ev: PeerRetry) -> None:
        if ev.peer in self.resting:
            self.resting.discard(ev.peer)
            self._fetch_dirty = True

    def _holder_failed(self, ts: WorkerTask, peer: int) -> None:
        if ts.state is not FLIGHT:
            return
        if peer in ts.who_has:
            ts.who_has.remove(peer)
        if ts.run_spec is not None:
            # Assigned here while its value was in flight: compute it instead.
            ts.missing = sum(1 for d in ts.deps if d.state is not MEMORY)
            self._wait_or_ready(ts)
            return
        stuck = not any(w in self.peers for w in ts.who_has)
        self._cmds.to_scheduler.append(m.DataMissing(ts.id, peer, stuck))
        if not ts.dependents and (stuck or ts not in self.copies):
            self._drop(ts)
            return
        ts.state = FETCH
        self._fetch_later(ts)  # tried again if another holder is known or announced

    # -- memory ------------------------------------------------------------------------

    def _on_memory_sampled(self, ev: MemorySampled) -> None:
        self.rss = ev.rss
        spill_at, pause_at = self._spill_at, self._pause_at
        if spill_at is not None and ev.rss > spill_at:
            # Freed memory shows in RSS only later: move what should bring
            # it back to the target, and look again at the next sample.
            goal = self._target or spill_at
            self._spill(self.residency.evict(ev.rss - goal))
        if pause_at is None:
            return
        if not self.paused and ev.rss > pause_at:
            self.paused = True
            # First say what is running: the scheduler takes back the rest.
            if self.executing:
                self._cmds.to_scheduler.append(m.TasksStarted(sorted(t.id for t in self.executing)))
            self._cmds.to_scheduler.append(m.WorkerPaused(ev.rss))
        elif self.paused and ev.rss <= pause_at:
            self.paused = False
            self._fetch_dirty = True
            self._cmds.to_scheduler.append(m.WorkerResumed(ev.rss))

    def _on_spill_failed(self, ev: SpillFailed) -> None:
        for tid in ev.ids:
            self.residency.pin(tid)

    def _spill_over_target(self) -> None:
        target = self._target
        if target is not None and self.residency.fast_bytes > target:
            self._spill(self.residency.evict(self.residency.fast_bytes - target))

    def _spill(self, ids: list[int]) -> None:
        cmds = self._cmds
        for tid in ids:
            if tid in cmds.unspill:
                cmds.unspill.discard(tid)  # read back and out again in one call: stays on disk
            else:
                cmds.spill.add(tid)

    def _touch_inputs(self, ts: WorkerTask) -> None:
        """``ts`` starts: its inputs are used now, and must be in memory."""
        residency, cmds = self.residency, self._cmds
        for dep in ts.deps:
            if residency.touch(dep.id):
                if dep.id in cmds.spill:
                    cmds.spill.discard(dep.id)
                else:
                    cmds.unspill.add(dep.id)

    # -- internal transitions ---------------------------------------------------------

    def _to_memory(self, ts: WorkerTask, nbytes: int) -> None:
        self.to_fetch.discard(ts)
        self.copies.discard(ts)
        ts.state = MEMORY
        ts.nbytes = nbytes
        ts.who_has = []
        self.residency.add(ts.id, nbytes)
        for dts in ts.dependents:
            if dts.state is WAITING:
                dts.missing -= 1
                if dts.missing == 0:
                    self._make_ready(dts)

    def _drop(self, ts: WorkerTask) -> None:
        """Forget ``ts`` here; inputs that nothing else needs go with it."""
        if ts.state is MEMORY:
            self._forget_value(ts.id)
        self.to_fetch.discard(ts)
        self.copies.discard(ts)
        self.tasks.pop(ts.id, None)
        ts.state = CANCELLED  # stale heap entries are skipped
        for dep in ts.deps:
            dep.dependents.discard(ts)
            if not dep.dependents and dep.run_spec is None and dep.state in (FETCH, FLIGHT) and dep not in self.copies:
                if dep.state is FETCH:
                    self._drop(dep)
                # FLIGHT: dropped (or kept and announced) when the transfer ends.
        ts.deps = []

    def _forget_value(self, tid: int) -> None:
        self.residency.remove(tid)
        cmds = self._cmds
        cmds.spill.discard(tid)
        cmds.unspill.discard(tid)
        if tid in cmds.accept:
            cmds.accept.discard(tid)  # arrived in this call: never stored
        else:
            cmds.forget.append(tid)

    def _start_ready(self) -> None:
        if self.paused:
            return  # running tasks finish; nothing new starts
        ready, executing = self.ready, self.executing
        started = []
        while ready and len(executing) < self.nthreads:
            ts = heapq.heappop(ready)[-1]
            if ts.state is not READY:
                continue
            ts.state = EXECUTING
            executing.add(ts)
            self._touch_inputs(ts)
            self._cmds.run.append(ts)
            started.append(ts.id)
        if started and ready:
            # Before they run: if one of them kills this process, the
            # scheduler blames only what was running, not what was queued.
            # With nothing else queued here it would blame just these anyway,
            # so the message (and its packet) is skipped: chains stay cheap.
            self._cmds.to_scheduler.append(m.TasksStarted(started))

    def _fetch_later(self, ts: WorkerTask) -> None:
        self.to_fetch.add(ts)
        self._fetch_dirty = True

    def _start_fetches(self) -> None:
        if self.paused or not self._fetch_dirty or not self.to_fetch or len(self.in_flight) >= MAX_PEERS_IN_FLIGHT:
            return
        self._fetch_dirty = False
        by_peer: dict[int, list[WorkerTask]] = {}
        resting = self.resting
        for ts in self.to_fetch:
            for w in ts.who_has:
                if w in self.peers and w not in self.in_flight and w not in resting:
                    by_peer.setdefault(w, []).append(ts)
                    break
        for peer, wanted in by_peer.items():
            if len(self.in_flight) >= MAX_PEERS_IN_FLIGHT:
                break
            wanted.sort(key=_by_priority)  # inputs of the most urgent tasks first
            batch = [t for t in wanted[:FETCH_BATCH] if t.state is FETCH]
            if not batch:
                continue
            for t in batch:
                t.state = FLIGHT
                self.to_fetch.discard(t)
            self.in_flight[peer] = set(batch)
            self._cmds.fetch.append((peer, self.peers[peer], [t.id for t in batch]))

    # -- introspection ---------------------------------------------------------------

    def validate(self) -> None:
        def check(cond: bool, what: str, ts=None) -> None:
            if not cond:
                raise InvariantError(f"{what}: {ts!r}")

        for tid, ts in self.tasks.items():
            check(ts.id == tid, "task stored under another id", ts)
            if ts.state is WAITING:
                n = sum(1 for d in ts.deps if d.state is not MEMORY)
                check(n == ts.missing and n > 0, f"missing={ts.missing}, actual {n}", ts)
            if ts.state in (READY, EXECUTING, CANCELLED) and ts.state is not CANCELLED:
                check(all(d.state is MEMORY for d in ts.deps), "running without its inputs", ts)
            if ts.state is EXECUTING or ts.state is CANCELLED:
                check(ts in self.executing, "executing task not tracked", ts)
            if ts.state is FETCH:
                check(ts in self.to_fetch, "fetch task not queued", ts)
            if ts.state is FLIGHT:
                check(any(ts in s for s in self.in_flight.values()), "flight task not in flight", ts)
            for d in ts.deps:
                check(ts in d.dependents and d.id in self.tasks, "dependency link broken", ts)
        for ts in self.executing:
            check(ts.state in (EXECUTING, CANCELLED), "executing set holds a non-executing task", ts)
        for ts in self.copies:
            check(ts.state in (FETCH, FLIGHT) and self.tasks.get(ts.id) is ts, "copy not being fetched", ts)
        check(len(self.executing) <= self.nthreads, "more tasks executing than threads")
        held = {tid: t.nbytes for tid, t in self.tasks.items() if t.state is MEMORY}
        res = self.residency
        check(len(res) == len(held) and all(tid in res for tid in held), "residency differs from data held")
        res.check()
        check(res.fast_bytes + res.slow_bytes == sum(held.values()), "bytes held out of sync")
        check(not (self.paused and self._pause_at is None), "paused without a pause threshold")
