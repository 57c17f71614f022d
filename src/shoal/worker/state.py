"""The worker as a pure state machine: ``handle(events) -> WorkerCommands``.

It decides what runs next, what to fetch from which peer, and what to tell
the scheduler; the reactor (``worker/server.py``) runs tasks in threads, moves
bytes and keeps the values.  No I/O, no clock reads.

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
from typing import Any, Iterable

import msgspec

from ..errors import SerializationError
from ..protocol import messages as m
from ..protocol.serialize import serialize

# A batch sent to one peer asks for at most this many keys ...
FETCH_BATCH = 1000
# ... and at most this many peers are asked at once.
MAX_PEERS_IN_FLIGHT = 16


class WTState(enum.Enum):
    FETCH = "fetch"
    FLIGHT = "flight"
    WAITING = "waiting"
    READY = "ready"
    EXECUTING = "executing"
    CANCELLED = "cancelled"
    MEMORY = "memory"


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
        self.func = ""  # token of a shared function (see WorkerState.functions)
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


class FetchFailed(WorkerEvent):
    peer: int
    ids: list
    reason: str = ""


# -- commands -------------------------------------------------------------------


class WorkerCommands:
    """``run``: tasks to start (their inputs are in the store); ``fetch``:
    ``(peer id, peer address, [ids])`` requests; ``forget``: ids whose values
    to drop; ``to_scheduler``: messages to send."""

    __slots__ = ("run", "fetch", "forget", "to_scheduler")

    def __init__(self):
        self.run: list[WorkerTask] = []
        self.fetch: list[tuple[int, str, list[int]]] = []
        self.forget: list[int] = []
        self.to_scheduler: list = []

    def __repr__(self) -> str:
        return f"WorkerCommands(run={self.run}, fetch={self.fetch}, forget={self.forget}, to_scheduler={self.to_scheduler})"


class InvariantError(AssertionError):
    pass


def _by_priority(ts: WorkerTask) -> tuple:
    return ts.priority


# Copies asked for by the scheduler are fetched after the inputs of tasks
# (whose priorities start with a finite number).
_COPY_PRIORITY = (float("inf"),)


class WorkerState:
    def __init__(self, nthreads: int = 1, *, validate: bool = False):
        self.nthreads = nthreads
        self.validate_each = validate
        self.wid: int | None = None
        self.tasks: dict[int, WorkerTask] = {}
        self.peers: dict[int, str] = {}
        self.ready: list = []  # heap of (priority, id, task)
        self.executing: set[WorkerTask] = set()
        self.to_fetch: set[WorkerTask] = set()
        # Set when fetching may start anew (new inputs to fetch, a peer free):
        # planning fetches walks ``to_fetch``, so it runs only then.
        self._fetch_dirty = False
        self.in_flight: dict[int, set[WorkerTask]] = {}  # peer -> tasks asked of it
        self.nbytes = 0
        self.functions: dict[str, Any] = {}  # token -> pickled function (Payload)
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
        }
        self._handlers = {
            SchedulerSent: self._on_scheduler_sent,
            TaskCompleted: self._on_completed,
            TaskFailed: self._on_failed,
            FetchSucceeded: self._on_fetched,
            FetchFailed: self._on_fetch_failed,
        }

    def handle(self, events: Iterable) -> WorkerCommands:
        cmds = self._cmds = WorkerCommands()
        for ev in events:
            self._handlers[type(ev)](ev)
        self._start_ready()
        self._start_fetches()
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

    def _on_define_function(self, msg: m.DefineFunction) -> None:
        self.functions[msg.token] = msg.payload

    def _on_release_functions(self, msg: m.ReleaseFunctions) -> None:
        for tok in msg.tokens:
            self.functions.pop(tok, None)

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
            ts.state = READY
            heapq.heappush(self.ready, (ts.priority, ts.id, ts))

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
        for tid in msg.ids:
            ts = self.tasks.get(tid)
            if ts is None or ts.run_spec is None:
                continue
            if ts.state is EXECUTING:
                ts.state = CANCELLED
            elif ts.state in (WAITING, READY):
                self._drop(ts)
            elif ts.state in (FETCH, FLIGHT):
                ts.run_spec = None  # no longer ours to run; maybe still an input

    # -- executor and transfer results ------------------------------------------------

    def _on_completed(self, ev: TaskCompleted) -> None:
        ts = self.tasks.get(ev.id)
        if ts is None or ts not in self.executing:
            return
        self.executing.discard(ts)
        if ts.state is CANCELLED and not self._needed_here(ts):
            self._cmds.forget.append(ts.id)
            self._drop(ts)
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
        elif self._needed_here(ts):
            # Released, then needed again as another task's input: fetch it
            # from the holders the scheduler named.
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
        for tid, nbytes in zip(ev.ids, ev.nbytes):
            ts = self.tasks.get(tid)
            if ts is None or ts not in asked:
                if ts is None or ts.state not in (MEMORY, EXECUTING):
                    self._cmds.forget.append(tid)
                continue
            asked.discard(ts)
            got_ids.append(tid)
            got_nbytes.append(nbytes)
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

    # -- internal transitions ---------------------------------------------------------

    def _to_memory(self, ts: WorkerTask, nbytes: int) -> None:
        self.to_fetch.discard(ts)
        self.copies.discard(ts)
        ts.state = MEMORY
        ts.nbytes = nbytes
        ts.who_has = []
        self.nbytes += nbytes
        for dts in ts.dependents:
            if dts.state is WAITING:
                dts.missing -= 1
                if dts.missing == 0:
                    dts.state = READY
                    heapq.heappush(self.ready, (dts.priority, dts.id, dts))

    def _drop(self, ts: WorkerTask) -> None:
        """Forget ``ts`` here; inputs that nothing else needs go with it."""
        if ts.state is MEMORY:
            self.nbytes -= ts.nbytes
            self._cmds.forget.append(ts.id)
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

    def _start_ready(self) -> None:
        ready, executing = self.ready, self.executing
        started = []
        while ready and len(executing) < self.nthreads:
            _, _, ts = heapq.heappop(ready)
            if ts.state is not READY:
                continue
            ts.state = EXECUTING
            executing.add(ts)
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
        if not self._fetch_dirty or not self.to_fetch or len(self.in_flight) >= MAX_PEERS_IN_FLIGHT:
            return
        self._fetch_dirty = False
        by_peer: dict[int, list[WorkerTask]] = {}
        for ts in self.to_fetch:
            for w in ts.who_has:
                if w in self.peers and w not in self.in_flight:
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
        check(
            self.nbytes == sum(t.nbytes for t in self.tasks.values() if t.state is MEMORY),
            "nbytes out of sync",
        )
