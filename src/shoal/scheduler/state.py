"""The scheduler as a pure state machine: ``handle(events) -> Commands``.

No sockets, no asyncio, no clock reads, no global randomness.  Every state
change goes through a transition function chosen from a table keyed by
``(current state, recommended target)``; transitions return further
recommendations and the loop runs until none are left (the pattern of dask's
worker state machine).  ``validate()`` checks every invariant and is cheap
enough to run after each ``handle()`` in tests.

Life of a task::

    RELEASED -> WAITING -> (QUEUED | NO_WORKER) -> PROCESSING -> MEMORY -> RELEASED -> forgotten
                                                          \\-> ERRED

Who needs a task: clients holding futures (``wanted_by``) and dependents that
are not in memory yet (``waiters``).  Data nobody needs is released at once;
a released task is forgotten once it has no dependents left.
"""

from __future__ import annotations

from sys import intern as _intern
from typing import Any, Callable, Iterable

from ..errors import FutureLostError, KilledWorkerError
from ..protocol import messages as m
from ..protocol.serialize import Payload, serialize
from .commands import Commands
from .events import (
    ClientDisconnected,
    ClientJoined,
    ClientLeft,
    ClientSent,
    Ticked,
    WorkerJoined,
    WorkerLeft,
    WorkerSent,
)
from . import graphs
from .graphs import PART_HOLDER
from .placement import LocalityPolicy, PlacementPolicy
from .retire import Retirements
from .rootqueue import RootQueue
from .steal import Stealing
from .records import (
    ERRED,
    FORGOTTEN,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    QUEUED,
    READY,
    RELEASED,
    WAITING,
    ClientRecord,
    SchedulerTask,
    WorkerRecord,
    forget_client,
)
from .validate import InvariantError, validate_state  # noqa: F401  (re-exported)

# A task is sent ahead only while at most this many of its inputs are missing.
AHEAD_MAX_MISSING = 8


class SchedulerState:
    def __init__(
        self,
        policy: PlacementPolicy | None = None,
        *,
        queue_ahead: int = 16,
        queue_seconds: float = 0.05,
        queue_max: int = 1024,
        queue_bytes: int = 64 * 2**20,
        eager: bool = True,
        work_stealing: bool = True,
        allowed_failures: int = 3,
        worker_ttl: float | None = None,
        client_grace: float = 30.0,
        validate: bool = False,
    ):
        self.policy = policy or LocalityPolicy()
        # How many tasks beyond its threads a worker may hold, so it never
        # idles for a round trip; root tasks beyond that wait in ``queued``.
        self.queue_ahead = queue_ahead
        # Fine-grained tasks need a deeper queue, or the worker spends its
        # time waiting for the next message: a worker whose tasks are short
        # may hold about ``queue_seconds`` of work per thread (up to
        # ``queue_max`` tasks), as long as the results of that many tasks
        # stay under ``queue_bytes`` -- root tasks must not be over-produced.
        self.queue_seconds = queue_seconds
        self.queue_max = max(queue_max, queue_ahead)
        self.queue_bytes = queue_bytes
        # Send a task ahead to the worker that is running all of its missing
        # inputs: it starts there the moment they finish, without a round
        # trip through the scheduler (chains, and reductions over co-located
        # inputs).  Taken back (``_retract_ahead``) if an input does not finish there.
        self.eager = eager
        self._ahead: list = []  # tasks whose dependents may now go ahead
        # Workers with free threads take unstarted tasks from busy ones
        # (see ``steal.py``); None: never.
        self.stealing = Stealing(self) if work_stealing else None
        self.allowed_failures = allowed_failures
        self.worker_ttl = worker_ttl
        # How long a client whose connection dropped keeps its futures' data,
        # so that it can reconnect and carry on (see ``_on_client_resumed``).
        self.client_grace = client_grace
        self.validate_each = validate
        self.tasks: dict[Any, SchedulerTask] = {}
        self.by_id: dict[int, SchedulerTask] = {}
        self.workers: dict[int, WorkerRecord] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.disconnected: dict[str, float] = {}  # client id -> when its connection dropped
        self.retirements = Retirements(self)
        # Workers being retired get no tasks: placement checks this dict.
        self._retiring = self.retirements.workers
        self.queued = RootQueue()  # of (*priority, arrival, task)
        self.unrunnable: set[SchedulerTask] = set()
        # Graphs arriving in parts: client -> generation of the graph.
        self._partial: dict[str, int] = {}
        self.idle: set[WorkerRecord] = set()  # workers below their queue limit, not paused
        self.n_paused = 0
        # Shared functions: token -> payload, and how many tasks name each.
        self.functions: dict[str, Any] = {}
        self.function_refs: dict[str, int] = {}
        self._next_id = 0
        self._generation = 0
        self._resources_freed = False
        self._cmds = Commands()
        self._handlers: dict[type, Callable] = {
            WorkerSent: self._on_worker_sent,
            ClientSent: self._on_client_sent,
            WorkerJoined: self._on_worker_joined,
            WorkerLeft: self._on_worker_left,
            ClientJoined: self._on_client_joined,
            ClientLeft: self._on_client_left,
            ClientDisconnected: self._on_client_disconnected,
            Ticked: self._on_ticked,
        }
        self._worker_msg: dict[type, Callable] = {
            m.TaskFinished: self._on_task_finished,
            m.TaskErred: self._on_task_erred,
            m.DataAcquired: self._on_data_acquired,
            m.DataMissing: self._on_data_missing,
            m.WorkerHeartbeat: self._on_heartbeat,
            m.TasksRejected: self._on_tasks_rejected,
            m.TasksStarted: self._on_tasks_started,
            m.TasksCancelled: self._on_tasks_cancelled,
            m.TasksStolen: self._on_tasks_stolen,
            m.WorkerPaused: self._on_worker_paused,
            m.WorkerResumed: self._on_worker_resumed,
        }
        self._client_msg: dict[type, Callable] = {
            m.SubmitGraph: lambda cid, msg: graphs.submit_graph(self, cid, msg),
            m.ReleaseKeys: self._on_release_keys,
            m.CancelKeys: self._on_release_keys,
            m.ClientHeartbeat: lambda cid, msg: None,
            m.CloseClient: lambda cid, msg: self._on_client_left(ClientLeft(cid)),
            m.ResumeClient: self._on_client_resumed,
            m.RetireWorkers: self.retirements.request,
        }
        self._table: dict[tuple, Callable] = {
            (RELEASED, WAITING): self._released_to_waiting,
            (WAITING, READY): self._waiting_to_ready,
            (NO_WORKER, READY): self._waiting_to_ready,
            (RELEASED, FORGOTTEN): self._forget,
            (ERRED, FORGOTTEN): self._forget,
        }
        for state in (WAITING, QUEUED, NO_WORKER, PROCESSING, MEMORY):
            self._table[(state, RELEASED)] = self._to_released

    # -- entry point ------------------------------------------------------------

    def handle(self, events: Iterable) -> Commands:
        cmds = self._cmds = Commands()
        for ev in events:
            self._handlers[type(ev)](ev)
        if self._resources_freed:
            self._retry_unrunnable()
        self._drain_queue()
        if self._ahead:
            self._send_ahead()
        if self.stealing is not None and self.stealing.hungry:
            self.stealing.balance()
        if self._retiring or self.retirements.requests:
            self.retirements.advance()
        self._cmds = Commands()
        if self.validate_each:
            self.validate()
        return cmds

    def _transitions(self, recs: dict) -> None:
        table = self._table
        while recs:
            ts, target = recs.popitem()
            fn = table.get((ts.state, target))
            if fn is None:
                continue  # already there, or no longer applicable
            more = fn(ts)
            if more:
                for k, v in more.items():
                    recs[k] = v

    # -- events -----------------------------------------------------------------

    def _on_worker_sent(self, ev: WorkerSent) -> None:
        ws = self.workers.get(ev.wid)
        if ws is None:
            return  # messages that raced with the worker's removal
        ws.last_seen = ev.now
        handlers = self._worker_msg
        for msg in ev.msgs:
            handlers[type(msg)](ws, msg)

    def _on_client_sent(self, ev: ClientSent) -> None:
        if ev.cid not in self.clients:
            return
        handlers = self._client_msg
        for msg in ev.msgs:
            if ev.cid not in self.clients:
                break  # closed earlier in this batch
            handlers[type(msg)](ev.cid, msg)

    def _on_worker_joined(self, ev: WorkerJoined) -> None:
        ws = WorkerRecord(ev.wid, ev.name, ev.address, ev.nthreads, ev.memory_limit, ev.resources, ev.now)
        ws.ahead = self.queue_ahead
        ws.room = ws.nthreads + self.queue_ahead
        peers = [m.PeerInfo(o.wid, o.address) for o in self.workers.values()]
        for other in self.workers.values():
            self._cmds.worker(other.wid, m.PeersChanged([m.PeerInfo(ws.wid, ws.address)], []))
        self.workers[ws.wid] = ws
        self.idle.add(ws)
        if self.stealing is not None:
            self.stealing.hungry.add(ws)  # it may take work queued elsewhere
        self._cmds.worker(ws.wid, m.WorkerWelcome(ws.wid, peers))
        for cid in self.clients:
            self._cmds.client(cid, m.WorkersChanged([ws.address], []))
        if self._retiring:
            self.retirements.worker_joined()
        self._retry_unrunnable()

    def _on_worker_left(self, ev: WorkerLeft) -> None:
        ws = self.workers.pop(ev.wid, None)
        if ws is None:
            return
        self.idle.discard(ws)
        if ws.paused:
            self.n_paused -= 1
        reason = ev.reason + ws.memory_note()
        self._cmds.to_workers.pop(ws.wid, None)
        for other in self.workers.values():
            self._cmds.worker(other.wid, m.PeersChanged([], [ws.wid]))
        for cid in self.clients:
            self._cmds.client(cid, m.WorkersChanged([], [ws.address]))
        recs: dict = {}
        # Blame the crash on what was running there; only if the worker never
        # said what it had started, on everything it held.
        running = [ts for ts in ws.processing if ts.started_on is ws]
        suspects = set(running) if running else set(ws.processing)
        for ts in sorted(ws.processing, key=_by_priority):
            ws.processing.discard(ts)
            ts.processing_on = None
            ts.state = RELEASED  # waiters of its dependencies stay: it still waits
            self._free_resources(ts, ws)
            if not ev.expected and ts in suspects:
                ts.crashes += 1
            if ts.crashes > self.allowed_failures:
                exc = KilledWorkerError(
                    f"task {ts.key!r} crashed its worker {ts.crashes} times "
                    f"(last: {ws.name} at {ws.address}: {reason})"
                )
                self._mark_erred(ts, ts, serialize(exc), "", recs)
            else:
                recs[ts] = WAITING
        for ts in sorted(ws.has_what, key=_by_id):
            ts.remove_holder(ws)
            if not ts.who_has and ts.state is MEMORY:
                if ts.scattered:
                    exc = FutureLostError(
                        f"scattered data {ts.key!r} was lost with worker {ws.name} ({ws.address}): {reason}"
                    )
                    self._data_lost(ts, recs)
                    ts.state = RELEASED
                    recs.pop(ts, None)
                    self._mark_erred(ts, ts, serialize(exc), "", recs)
                else:
                    self._data_lost(ts, recs)
            elif ts.wanted_by and ts.state is MEMORY:
                # Clients would still fetch from the worker that left.
                for cid in ts.wanted_by:
                    self._tell_in_memory(cid, ts)
        ws.has_what.clear()
        if self._retiring:
            self.retirements.worker_left(ws)
        if self.stealing is not None:
            self.stealing.worker_left(ws)
        self._transitions(recs)

    def _on_client_joined(self, ev: ClientJoined) -> None:
        if ev.cid in self.clients:
            # Back within its grace period: its record, and what it wants, stay.
            self.disconnected.pop(ev.cid, None)
            return
        self.clients[ev.cid] = ClientRecord(ev.cid, ev.name)

    def _on_client_disconnected(self, ev: ClientDisconnected) -> None:
        if ev.cid not in self.clients:
            return  # it said goodbye first (CloseClient)
        if self.client_grace <= 0:
            self._on_client_left(ClientLeft(ev.cid))
        else:
            self.disconnected[ev.cid] = ev.now

    def _on_client_left(self, ev: ClientLeft) -> None:
        if ev.cid not in self.clients:
            return
        self.disconnected.pop(ev.cid, None)
        self._drop_partial(ev.cid)
        cr = self.clients.pop(ev.cid)
        forget_client(ev.cid)
        recs: dict = {}
        for ts in cr.wants:
            ts.unwant(ev.cid)
            self._maybe_release(ts, recs)
        cr.wants.clear()
        self._transitions(recs)

    def _on_ticked(self, ev: Ticked) -> None:
        if self.disconnected:
            gone = [cid for cid, since in self.disconnected.items() if ev.now - since >= self.client_grace]
            for cid in gone:
                self._on_client_left(ClientLeft(cid))
        if self._retiring:
            self.retirements.ticked()
        if self.stealing is not None:
            self.stealing.ticked()
        if self.worker_ttl is None:
            return
        for ws in list(self.workers.values()):
            if ev.now - ws.last_seen > self.worker_ttl:
                reason = f"no heartbeat for {ev.now - ws.last_seen:.1f}s"
                self._cmds.close_workers.append((ws.wid, reason))
                self._on_worker_left(WorkerLeft(ws.wid, reason))

    # -- client messages ---------------------------------------------------------

    def _drop_partial(self, cid: str) -> None:
        """Unpin the parts of a graph (completed, rejected, or its client left)."""
        if self._partial.pop(cid, None) is None:
            return
        self._on_client_left(ClientLeft(cid + PART_HOLDER))

    def _on_client_resumed(self, cid: str, msg: m.ResumeClient) -> None:
        """A client reconnected and lists the keys it holds futures for.

        It may have missed news while away and dropped futures whose release
        never arrived: tell it where each key stands now, release what it no
        longer holds, and name the keys this scheduler does not know (it
        restarted, or the client was away longer than its grace period)."""
        client = self.clients[cid]
        held = {m.as_key(k): None for k in msg.keys}
        recs: dict = {}
        lost = []
        for key in held:  # pinned first, so that no release below drops them
            ts = self.tasks.get(key)
            if ts is None:
                lost.append(key)
                continue
            self._want(cid, client, ts, recs)  # (a released one is known from its lineage: computed again)
        for ts in sorted(client.wants, key=_by_id):
            if ts.key not in held:
                ts.unwant(cid)
                client.wants.discard(ts)
                self._maybe_release(ts, recs)
        if lost:
            reason = (
                "the scheduler does not know this key: it restarted, or the client was away "
                f"longer than its grace period ({self.client_grace:g}s)"
            )
            self._cmds.client(cid, m.KeysLost(lost, reason))
        self._transitions(recs)

    def _want(self, cid: str, client: ClientRecord, ts: SchedulerTask, recs: dict) -> None:
        """``cid`` holds a future for ``ts``: pin it, and tell the client where
        it stands (or plan it, if it was released)."""
        ts.want(cid)
        client.wants.add(ts)
        if ts.state is MEMORY:
            self._tell_in_memory(cid, ts)
        elif ts.state is ERRED:
            self._cmds.client(cid, self._erred_msg(ts))
        elif ts.state is RELEASED:
            recs[ts] = WAITING

    def _on_release_keys(self, cid: str, msg) -> None:
        client = self.clients[cid]
        recs: dict = {}
        for k in msg.keys:
            ts = self.tasks.get(m.as_key(k))
            if ts is None:
                continue
            ts.unwant(cid)
            client.wants.discard(ts)
            self._maybe_release(ts, recs)
        self._transitions(recs)

    # -- worker messages ---------------------------------------------------------

    def _on_task_finished(self, ws: WorkerRecord, msg: m.TaskFinished) -> None:
        if ws.ghosts and msg.id in ws.ghosts:
            ws.ghosts.discard(msg.id)  # finished after all (its result is wanted here)
            self._resize(ws)
        ts = self.by_id.get(msg.id)
        if ts is not None and ts.state is PROCESSING and ts.processing_on is ws:
            if self.queue_seconds:
                self._learn(ws, msg.duration, msg.nbytes)
            recs = self._processing_to_memory(ts, ws, msg.nbytes, msg.type_name)
            if recs:
                self._transitions(recs)
        elif ts is not None and ts.state is MEMORY:
            if ts.add_holder(ws):
                ws.has_what.add(ts)
                ws.nbytes += ts.nbytes
        else:
            self._release_on(ws.wid, msg.id)

    def _learn(self, ws: WorkerRecord, duration: float, nbytes: int) -> None:
        """Track how long this worker's tasks take and how large their results
        are, and size its queue from that (see ``queue_seconds``)."""
        if ws.mean_duration < 0:
            ws.mean_duration, ws.mean_nbytes = duration, float(nbytes)
        else:
            ws.mean_duration += 0.1 * (duration - ws.mean_duration)
            ws.mean_nbytes += 0.1 * (nbytes - ws.mean_nbytes)
        by_time = self.queue_seconds * ws.nthreads / max(ws.mean_duration, 1e-6)
        by_bytes = self.queue_bytes / max(ws.mean_nbytes, 1.0)
        ahead = max(self.queue_ahead, int(min(self.queue_max, by_time, by_bytes)))
        if ahead != ws.ahead:  # (once the means settle, it rarely does)
            ws.ahead = ahead
            self._resize(ws)

    def _resize(self, ws: WorkerRecord) -> None:
        """Its room: free threads (those not held by cancelled tasks still
        running) plus its queue; none while every thread is held."""
        free = ws.nthreads - len(ws.ghosts) if ws.ghosts else ws.nthreads
        ws.room = free + ws.ahead if free > 0 else 0
        if len(ws.processing) >= ws.room:
            self.idle.discard(ws)
        else:
            self._worker_room(ws)

    def _on_tasks_cancelled(self, ws: WorkerRecord, msg: m.TasksCancelled) -> None:
        if ws.ghosts:
            ws.ghosts.difference_update(msg.stopped)
            self._resize(ws)

    def _on_tasks_stolen(self, ws: WorkerRecord, msg: m.TasksStolen) -> None:
        if self.stealing is not None:  # (without it, nothing was asked)
            self.stealing.answered(ws, msg)

    def _on_task_erred(self, ws: WorkerRecord, msg: m.TaskErred) -> None:
        ts = self.by_id.get(msg.id)
        if ts is None or ts.state is not PROCESSING or ts.processing_on is not ws:
            return
        ws.processing.discard(ts)
        ts.processing_on = None
        ts.state = RELEASED  # still among its dependencies' waiters
        self._free_resources(ts, ws)
        self._worker_room(ws)
        recs: dict = {}
        if ts.retries > 0:
            ts.retries -= 1
            self._retract_ahead(ts, recs)
            recs[ts] = WAITING
        else:
            self._mark_erred(ts, ts, msg.exception, msg.traceback, recs)
        self._transitions(recs)

    def _on_data_acquired(self, ws: WorkerRecord, msg: m.DataAcquired) -> None:
        if self._retiring:
            self.retirements.data_acquired()
        for tid, nbytes in zip(msg.ids, msg.nbytes):
            ts = self.by_id.get(tid)
            if ts is not None and ts.state is MEMORY:
                if ts.add_holder(ws):
                    ws.has_what.add(ts)
                    ws.nbytes += ts.nbytes
            else:
                self._release_on(ws.wid, tid)

    def _on_data_missing(self, ws: WorkerRecord, msg: m.DataMissing) -> None:
        ts = self.by_id.get(msg.id)
        if ts is None:
            return
        holder = self.workers.get(msg.holder)
        recs: dict = {}
        if holder is not None and ts.remove_holder(holder):
            holder.has_what.discard(ts)
            holder.nbytes -= ts.nbytes
            if not ts.who_has and ts.state is MEMORY:
                self._data_lost(ts, recs)
        # A holder that left (or was retired) is already gone from who_has;
        # the worker may still know no other holder.
        if msg.stuck and ts.state is MEMORY:
            # Other holders exist that the worker was never told of: re-send
            # its tasks that need this input, with the current holders.
            for dts in ts.waiting_dependents():
                if dts.state is PROCESSING and dts.processing_on is ws:
                    self._reset_processing(dts, recs)
        self._transitions(recs)

    def _on_heartbeat(self, ws: WorkerRecord, msg: m.WorkerHeartbeat) -> None:
        ws.memory = msg.memory
        ws.heartbeat = msg

    def _on_worker_paused(self, ws: WorkerRecord, msg: m.WorkerPaused) -> None:
        """Short of memory: place its tasks that have not started elsewhere."""
        ws.memory = msg.memory
        if ws.paused:
            return
        ws.paused = True
        self.n_paused += 1
        self.idle.discard(ws)
        recs: dict = {}
        for ts in sorted(ws.processing, key=_by_priority):
            # (A task sent ahead may have been taken back with its input already.)
            if ts.started_on is not ws and ts.processing_on is ws:
                self._reset_processing(ts, recs)
        self._transitions(recs)

    def _on_worker_resumed(self, ws: WorkerRecord, msg: m.WorkerResumed) -> None:
        ws.memory = msg.memory
        if not ws.paused:
            return
        ws.paused = False
        self.n_paused -= 1
        self._worker_room(ws)
        self._retry_unrunnable()

    def _on_tasks_started(self, ws: WorkerRecord, msg: m.TasksStarted) -> None:
        by_id = self.by_id
        for tid in msg.ids:
            ts = by_id.get(tid)
            if ts is not None and ts.processing_on is ws:
                ts.started_on = ws

    def _on_tasks_rejected(self, ws: WorkerRecord, msg: m.TasksRejected) -> None:
        recs: dict = {}
        for tid in msg.ids:
            ts = self.by_id.get(tid)
            if ts is not None and ts.state is PROCESSING and ts.processing_on is ws:
                ws.processing.discard(ts)
                ts.processing_on = None
                self._free_resources(ts, ws)
                ts.state = RELEASED
                self._retract_ahead(ts, recs)
                recs[ts] = WAITING
        self._worker_room(ws)
        self._transitions(recs)

    # -- transitions -------------------------------------------------------------

    def _released_to_waiting(self, ts: SchedulerTask) -> dict:
        recs: dict = {}
        n = 0
        for dep in ts.dependencies:
            if dep.state is ERRED:
                self._mark_erred(ts, dep.blamed or dep, None, "", recs)
                return recs
        counted = ts.needs_inputs
        ts.needs_inputs = True
        for dep in ts.dependencies:
            if not counted:
                dep.waiters += 1
            if dep.state is not MEMORY:
                n += 1
                if dep.state is RELEASED:
                    recs[dep] = WAITING
        ts.waiting_on = n
        ts.state = WAITING
        if n == 0:
            recs[ts] = READY
        elif self.eager:
            self._ahead.append(ts)
        return recs

    def _waiting_to_ready(self, ts: SchedulerTask) -> dict:
        self.unrunnable.discard(ts)
        if ts.workers is None and ts.resources is None and not ts.dependencies:
            # Root task: wait in the queue; ``_drain_queue`` hands these out in
            # priority order as workers have room, so inputs are not over-produced.
            ts.state = QUEUED
            p = ts.priority  # flattened: comparing nested tuples made popping slow
            self.queued.push(p[0], p[1], p[2], ts)
            return {}
        if ts.resources and not self._placing_unrunnable:
            # Resource-limited tasks ready together compete for the same
            # resources: place them after this batch, in priority order.
            ts.state = NO_WORKER
            self.unrunnable.add(ts)
            self._resources_freed = True
            return {}
        candidates = self._candidates(ts)
        if not candidates:
            ts.state = NO_WORKER
            self.unrunnable.add(ts)
            return {}
        ws = self.policy.choose(ts, candidates)
        self._send(ts, ws)
        return {}

    def _retry_unrunnable(self) -> None:
        """Tasks waiting for a worker (or for resources) may run now."""
        self._resources_freed = False
        self._placing_unrunnable = True
        try:
            while self.unrunnable:
                stuck = sorted(self.unrunnable, key=_by_priority)
                self.unrunnable = set()
                for ts in stuck:  # most urgent first
                    self._transitions({ts: READY})
                if not self._resources_freed:
                    break
                self._resources_freed = False
        finally:
            self._placing_unrunnable = False

    def _candidates(self, ts: SchedulerTask):
        retiring = self._retiring
        if ts.workers is None and ts.resources is None:
            if retiring or self.n_paused:
                return [ws for ws in self.workers.values() if ws.wid not in retiring and not ws.paused]
            return self.workers.values()
        out = []
        for ws in self.workers.values():
            if ws.paused or ws.wid in retiring:
                continue
            if ts.workers is not None and not ts.allow_other_workers:
                if ws.name not in ts.workers and ws.address not in ts.workers:
                    continue
            if ts.resources:
                # Free amounts, not totals: a worker runs only what it has room for.
                if any(
                    ws.resources.get(r, 0) - ws.used_resources.get(r, 0) < need for r, need in ts.resources.items()
                ):
                    continue
            out.append(ws)
        if ts.workers is not None and ts.allow_other_workers:
            preferred = [ws for ws in out if ws.name in ts.workers or ws.address in ts.workers]
            return preferred or out
        return out

    def _send(self, ts: SchedulerTask, ws: WorkerRecord) -> None:
        if ws.ghosts and ts.id in ws.ghosts:
            ws.ghosts.discard(ts.id)  # cancelled and sent again: the worker keeps running it
            self._resize(ws)
        ts.state = PROCESSING
        ts.processing_on = ws
        ws.processing.add(ts)
        if ts.resources:
            for r, need in ts.resources.items():
                ws.used_resources[r] = ws.used_resources.get(r, 0) + need
        if len(ws.processing) >= ws.room:
            self.idle.discard(ws)
        deps = ts.dependencies
        if self.eager and ts.dependents:
            self._ahead.append(ts)
        func = ts.func
        if func:
            fid = ws.functions.get(func)
            if fid is None:
                fid = ws.functions[func] = len(ws.functions) + ws.functions_dropped + 1
                self._cmds.worker(ws.wid, m.DefineFunction(fid, self.functions[func], func))
        else:
            fid = 0
        run_spec = ts.run_spec
        if type(run_spec) is bytes:
            run_spec = Payload((run_spec,))
        if deps:
            msg = m.Execute(
                ts.id,
                ts.key,
                run_spec,
                ts.priority,  # a tuple: encoded as an array, no list per task
                [d.id for d in deps],
                [d.key for d in deps],
                _holder_ids(deps),
                fid,
            )
        else:
            msg = m.Execute(ts.id, ts.key, run_spec, ts.priority, (), (), (), fid)  # (tuples: none made per task)
        self._cmds.worker(ws.wid, msg)

    def _drain_queue(self) -> None:
        queued, idle = self.queued, self.idle
        pop = queued.pop
        while queued and idle:
            ts = pop()[-1]
            if ts.state is not QUEUED:
                continue  # stale entry: released or erred while queued
            ws = self.policy.choose(ts, idle)
            self._send(ts, ws)
            # The worker takes a run of consecutive root tasks, its fair share
            # of what is queued: neighbours in the graph's order usually feed
            # the same reduction, which then needs no transfer.
            share = -(-len(queued) // (len(idle) or 1))
            while share > 1 and queued and ws in idle:
                ts = pop()[-1]
                if ts.state is QUEUED:
                    self._send(ts, ws)
                    share -= 1

    def _send_ahead(self) -> None:
        """Send waiting tasks ahead where all their missing inputs are running."""
        stack = self._ahead
        while stack:
            ts = stack.pop()
            for t in (ts, *ts.dependents) if ts.state is not WAITING else (ts,):
                # Few missing inputs only: checking costs a pass over the
                # inputs, and a wide reduction (sum over 100k tasks) would pay
                # it for every input sent or finished.
                if (
                    t.state is WAITING
                    and t.waiting_on <= AHEAD_MAX_MISSING
                    and t.workers is None
                    and t.resources is None
                ):
                    ws = self._ahead_target(t)
                    if ws is not None:
                        self._send(t, ws)  # queues its own dependents in turn

    def _ahead_target(self, ts: SchedulerTask) -> WorkerRecord | None:
        """The one worker running every input of ``ts`` not yet in memory, if it has room."""
        target = None
        for dep in ts.dependencies:
            state = dep.state
            if state is MEMORY:
                continue
            if state is not PROCESSING or (target is not None and dep.processing_on is not target):
                return None
            target = dep.processing_on
        if target is None or target.paused or len(target.processing) >= target.room or target.wid in self._retiring:
            return None
        return target

    def _retract_ahead(self, ts: SchedulerTask, recs: dict) -> None:
        """``ts`` left its worker unfinished: take back the dependents sent
        ahead to wait for it there (they wait for it again, wherever it goes)."""
        for dts in ts.dependents:
            if dts.state is PROCESSING and dts.processing_on is not None:
                self._reset_processing(dts, recs)

    def _worker_room(self, ws: WorkerRecord) -> None:
        n = len(ws.processing)
        if ws.wid in self.workers and not ws.paused and n < ws.room:
            if ws.wid not in self._retiring:  # a retiring worker takes no new tasks
                self.idle.add(ws)
                if n < ws.nthreads and self.stealing is not None:
                    self.stealing.hungry.add(ws)

    def _free_resources(self, ts: SchedulerTask, ws: WorkerRecord) -> None:
        if ts.resources:
            for r, need in ts.resources.items():
                ws.used_resources[r] = ws.used_resources.get(r, 0) - need
            self._resources_freed = True

    def _processing_to_memory(self, ts: SchedulerTask, ws: WorkerRecord, nbytes: int, type_name: str) -> dict:
        ws.processing.discard(ts)
        ts.processing_on = None
        if ts.resources:
            self._free_resources(ts, ws)
        self._worker_room(ws)
        ts.state = MEMORY
        ts.nbytes = nbytes
        # One string per type, not one per task (each decoded message brings its own).
        ts.type_name = _intern(type_name)
        ts.add_holder(ws)
        ws.has_what.add(ts)
        ws.nbytes += nbytes
        recs: dict = {}
        counted = ts.needs_inputs
        ts.needs_inputs = False
        for dep in ts.dependencies:
            if counted:
                dep.waiters -= 1
            if not dep.waiters and not dep.wanted_by and dep.state is MEMORY:
                recs[dep] = RELEASED
        for dts in ts.dependents:
            if dts.state is WAITING:
                dts.waiting_on -= 1
                if dts.waiting_on == 0:
                    recs[dts] = READY
                elif self.eager:
                    self._ahead.append(dts)
        if ts.wanted_by:
            for cid in ts.wanted_by:
                self._tell_in_memory(cid, ts)
        elif not ts.waiters:
            recs[ts] = RELEASED
        return recs

    def _to_released(self, ts: SchedulerTask) -> dict:
        """Drop a task nobody needs: its data, its place in a queue or on a worker."""
        if ts.wanted_by or ts.waiters:
            return {}  # needed again since the recommendation was made
        recs: dict = {}
        state = ts.state
        if state is MEMORY:
            for ws in ts.who_has:
                ws.has_what.discard(ts)
                ws.nbytes -= ts.nbytes
                self._release_on(ws.wid, ts.id)
            ts.who_has = ()
        else:
            if state is PROCESSING:
                ws = ts.processing_on
                ws.processing.discard(ts)
                ts.processing_on = None
                self._free_resources(ts, ws)
                self._worker_room(ws)
                self._cancel_on(ws.wid, ts.id)
            elif state is NO_WORKER:
                self.unrunnable.discard(ts)
            self._stop_waiting(ts)
            for dep in ts.dependencies:
                self._maybe_release(dep, recs)
        ts.state = RELEASED
        if not ts.dependents and not ts.wanted_by:
            recs[ts] = FORGOTTEN
        return recs

    def _forget(self, ts: SchedulerTask) -> dict:
        if ts.wanted_by or ts.dependents or ts.waiters or self.tasks.get(ts.key) is not ts:
            return {}
        recs: dict = {}
        del self.tasks[ts.key]
        del self.by_id[ts.id]
        if ts.func:
            self._unref_function(ts.func)
        self._stop_waiting(ts)
        for dep in ts.dependencies:
            dep.remove_dependent(ts)
            if dep.state in (RELEASED, ERRED):
                if not dep.dependents and not dep.wanted_by:
                    recs[dep] = FORGOTTEN
            else:
                self._maybe_release(dep, recs)
        ts.state = RELEASED
        return recs

    def _unref_function(self, tok: str) -> None:
        n = self.function_refs[tok] - 1
        if n:
            self.function_refs[tok] = n
            return
        del self.function_refs[tok]
        del self.functions[tok]
        for ws in self.workers.values():
            fid = ws.functions.pop(tok, None)
            if fid is not None:
                ws.functions_dropped += 1
                self._cmds.worker(ws.wid, m.ReleaseFunctions([fid]))

    @staticmethod
    def _stop_waiting(ts: SchedulerTask) -> None:
        """``ts`` no longer needs its inputs: they lose it as a waiter."""
        if ts.needs_inputs:
            ts.needs_inputs = False
            for dep in ts.dependencies:
                dep.waiters -= 1

    def _maybe_release(self, ts: SchedulerTask, recs: dict) -> None:
        """Recommend releasing ``ts`` if no client and no waiting dependent needs it."""
        if ts.wanted_by or ts.waiters:
            return
        if ts.state is ERRED:
            if not ts.dependents:
                recs[ts] = FORGOTTEN
        elif ts.state is RELEASED:
            if not ts.dependents:
                recs[ts] = FORGOTTEN
        else:
            recs[ts] = RELEASED

    def _data_lost(self, ts: SchedulerTask, recs: dict) -> None:
        """``ts`` was in memory but no worker holds it any more."""
        ts.state = RELEASED
        for dts in ts.waiting_dependents():
            if dts.state is PROCESSING:
                self._reset_processing(dts, recs)
            elif dts.state is WAITING:
                dts.waiting_on += 1
            elif dts.state is NO_WORKER:
                self.unrunnable.discard(dts)
                dts.state = RELEASED
                recs[dts] = WAITING
        if ts.waiters or ts.wanted_by:
            recs[ts] = WAITING
        elif not ts.dependents:
            recs[ts] = FORGOTTEN

    def _release_on(self, wid: int, tid: int) -> None:
        # In order with Execute messages (an id may be released and re-sent in
        # one batch), coalesced with an immediately preceding ReleaseData.
        msgs = self._cmds.to_workers.get(wid)
        if msgs and type(msgs[-1]) is m.ReleaseData:
            msgs[-1].ids.append(tid)
        else:
            self._cmds.worker(wid, m.ReleaseData([tid]))

    def _cancel_on(self, wid: int, tid: int) -> None:
        ws = self.workers.get(wid)
        ts = self.by_id.get(tid)
        if ws is not None and ts is not None and all(d.state is MEMORY for d in ts.dependencies):
            # It may be running there (its inputs exist): its thread counts
            # as busy until the worker answers (TasksCancelled).
            ws.ghosts.add(tid)
            self._resize(ws)
        msgs = self._cmds.to_workers.get(wid)
        if msgs and type(msgs[-1]) is m.CancelTasks:
            msgs[-1].ids.append(tid)
        else:
            self._cmds.worker(wid, m.CancelTasks([tid]))

    def _reset_processing(self, ts: SchedulerTask, recs: dict) -> None:
        """Take ``ts`` back from its worker and plan it again."""
        ws = ts.processing_on
        ws.processing.discard(ts)
        ts.processing_on = None
        self._free_resources(ts, ws)
        self._worker_room(ws)
        self._cancel_on(ws.wid, ts.id)
        ts.state = RELEASED  # stays among its dependencies' waiters
        self._retract_ahead(ts, recs)
        recs[ts] = WAITING

    def _mark_erred(self, ts: SchedulerTask, blamed: SchedulerTask, exception, traceback: str, recs: dict) -> None:
        """``ts`` failed (or ``blamed``, a dependency, did): err it and its dependents."""
        if exception is not None:
            blamed.exception = exception
            blamed.traceback = traceback
        stack = [ts]
        while stack:
            t = stack.pop()
            if t.state is ERRED or (t.state is MEMORY and t is not ts):
                continue
            if t.state is PROCESSING:
                ws = t.processing_on
                ws.processing.discard(t)
                t.processing_on = None
                self._free_resources(t, ws)
                self._worker_room(ws)
                self._cancel_on(ws.wid, t.id)
            elif t.state is NO_WORKER:
                self.unrunnable.discard(t)
            self._stop_waiting(t)
            for dep in t.dependencies:
                self._maybe_release(dep, recs)
            t.state = ERRED
            t.blamed = blamed
            recs.pop(t, None)
            if t.wanted_by:
                msg = self._erred_msg(t)
                for cid in t.wanted_by:
                    self._cmds.client(cid, msg)
            stack.extend(t.dependents)

    # -- messages ---------------------------------------------------------------

    def _tell_in_memory(self, cid: str, ts: SchedulerTask) -> None:
        self._cmds.in_memory(cid, ts.key, ts.id, [ws.address for ws in ts.who_has], ts.nbytes, ts.type_name)

    def _erred_msg(self, ts: SchedulerTask) -> m.KeyErred:
        b = ts.blamed or ts
        return m.KeyErred(ts.key, b.exception, b.traceback, b.key)

    # -- introspection -------------------------------------------------------------

    def validate(self) -> None:
        """Check every invariant; raise :class:`InvariantError` naming the first broken one."""
        validate_state(self)

    def snapshot(self) -> dict:
        """Counts by state, per worker: for the dashboard and for tests."""
        by_state: dict = {}
        for ts in self.tasks.values():
            by_state[ts.state.value] = by_state.get(ts.state.value, 0) + 1
        return {
            "tasks": by_state,
            "workers": {ws.name: ws.snapshot() for ws in self.workers.values()},
            "clients": sum(1 for cid in self.clients if not cid.endswith(PART_HOLDER)),
            "clients_disconnected": len(self.disconnected),
            "retiring": sorted(self.workers[wid].name for wid in self._retiring),
            "queued": sum(1 for e in self.queued if e[-1].state is QUEUED),
        }


def _holder_ids(deps: list) -> list:
    """Per input, the ids of the workers holding it (a loop, not a nested
    comprehension: a task with 100k inputs made 100k inner function calls)."""
    out = []
    for d in deps:
        holders = d.who_has
        if len(holders) == 1:
            for w in holders:
                out.append([w.wid])
        else:
            out.append([w.wid for w in holders])
    return out


def _by_id(ts: SchedulerTask) -> int:
    return ts.id


def _by_priority(ts: SchedulerTask) -> tuple:
    return ts.priority
