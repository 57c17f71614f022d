"""The scheduler's records of tasks, workers and clients."""

from __future__ import annotations

import enum
from typing import Any

from ..utils import format_bytes


class TaskState(enum.Enum):
    RELEASED = "released"  # known, not needed now or not yet started; no data
    WAITING = "waiting"  # needed; some dependency is not in memory yet
    QUEUED = "queued"  # ready root task held back until a worker has room
    NO_WORKER = "no-worker"  # ready, but no worker satisfies its restrictions
    PROCESSING = "processing"  # sent to a worker
    MEMORY = "memory"  # result held by one or more workers
    ERRED = "erred"  # it, or a dependency, failed for good

    # Members are singletons compared by identity, so identity hashing is
    # exact -- and C-level: Enum's own ``__hash__`` is Python code, run for
    # every lookup in the transition table.
    __hash__ = object.__hash__


# Recommendation targets of the core's transitions beyond the states themselves.
READY = "ready"
FORGOTTEN = "forgotten"

# Short names for the states, shared by the core and its invariants.
RELEASED = TaskState.RELEASED
WAITING = TaskState.WAITING
QUEUED = TaskState.QUEUED
NO_WORKER = TaskState.NO_WORKER
PROCESSING = TaskState.PROCESSING
MEMORY = TaskState.MEMORY
ERRED = TaskState.ERRED


# The ``wanted_by`` of a task no client wants (shared: never mutated).
NOBODY: frozenset = frozenset()
# Client id -> the ``wanted_by`` of a task only that client wants (shared).
_ONLY: dict[str, frozenset] = {}


def forget_client(cid: str) -> None:
    """``cid`` left: its singleton is not made for new tasks any more."""
    _ONLY.pop(cid, None)


# Dependents are kept in a list up to this many, then in a dict: removing
# one from a list is a scan, and a widely shared input may have 100k.
SMALL_DEPENDENTS = 32


class SchedulerTask:
    """The scheduler's view of one task (the worker's is ``WorkerTask``)."""

    __slots__ = (
        "id",
        "key",
        "run_spec",
        "state",
        "priority",
        "dependencies",
        "dependents",
        "waiters",
        "needs_inputs",
        "waiting_on",
        "who_has",
        "processing_on",
        "nbytes",
        "type_name",
        "wanted_by",
        "retries",
        "crashes",
        "exception",
        "traceback",
        "blamed",
        "workers",
        "allow_other_workers",
        "resources",
        "scattered",
        "func",
        "started_on",
    )

    def __init__(self, id: int, key: Any, run_spec, priority: tuple):
        self.id = id
        self.key = key
        self.run_spec = run_spec  # a Payload, or its one frame as bytes
        self.state = TaskState.RELEASED
        self.priority = priority
        # Per-task containers start as the shared empty tuple and are made
        # when first filled: a scheduler holds millions of tasks, and an empty
        # list, dict or set costs 56 to 216 bytes each.
        self.dependencies: list[SchedulerTask] | tuple = ()
        # In insertion order, never by identity, so the same events give the
        # same result: a list while small (a dict of one entry costs 224
        # bytes, a list 64), an ordered set (a dict) once removals from a list
        # would cost too much (see ``add_dependent``).
        self.dependents: list[SchedulerTask] | dict[SchedulerTask, None] | tuple = ()
        # How many dependents still need this task's data (those with
        # ``needs_inputs`` set): a count, not a collection, because most
        # tasks have one dependent and a dict per task cost 224 bytes.
        self.waiters = 0
        # Counted among its dependencies' waiters: from when it starts
        # waiting for them until it is in memory, released, erred or forgotten.
        self.needs_inputs = False
        self.waiting_on = 0  # dependencies not in memory, while WAITING
        # The workers holding its data.  A list: usually one holder, and a
        # set costs 216 bytes even when empty.
        self.who_has: list[WorkerRecord] | tuple = ()
        self.processing_on: WorkerRecord | None = None
        self.nbytes = 0
        self.type_name = ""
        # Client ids holding futures: NOBODY, one client's shared singleton,
        # or a set once several do (see ``want``).
        self.wanted_by: set[str] | frozenset = NOBODY
        self.retries = 0
        self.crashes = 0
        self.exception = None  # Payload
        self.traceback = ""
        self.blamed: SchedulerTask | None = None
        self.workers: frozenset | None = None  # allowed worker names/addresses
        self.allow_other_workers = False
        self.resources: dict | None = None
        self.scattered = False
        self.func = ""  # token of a shared function, if any
        self.started_on: WorkerRecord | None = None  # the worker that said it began running it

    def want(self, cid: str) -> None:
        wanted_by = self.wanted_by
        if not wanted_by:
            # Wanted by one client, as most are: that client's shared
            # singleton, not a set (216 bytes) per task.
            only = _ONLY.get(cid)
            self.wanted_by = only if only is not None else _ONLY.setdefault(cid, frozenset((cid,)))
        elif cid not in wanted_by:
            if type(wanted_by) is frozenset:
                self.wanted_by = {*wanted_by, cid}
            else:
                wanted_by.add(cid)

    def unwant(self, cid: str) -> None:
        wanted_by = self.wanted_by
        if cid in wanted_by:
            if len(wanted_by) == 1:
                self.wanted_by = NOBODY  # most tasks are never wanted: no empty set each
            else:
                wanted_by.discard(cid)  # (a set: singletons have one member)

    def add_holder(self, ws: "WorkerRecord") -> bool:
        who_has = self.who_has
        if not who_has:
            self.who_has = [ws]
        elif ws in who_has:
            return False
        else:
            who_has.append(ws)
        return True

    def remove_holder(self, ws: "WorkerRecord") -> bool:
        who_has = self.who_has
        if ws not in who_has:
            return False
        if len(who_has) == 1:
            self.who_has = ()
        else:
            who_has.remove(ws)
        return True

    def add_dependent(self, dts: "SchedulerTask") -> None:
        """Record ``dts`` (not already recorded) as a dependent."""
        deps = self.dependents
        if type(deps) is dict:
            deps[dts] = None
        elif not deps:
            self.dependents = [dts]
        elif len(deps) < SMALL_DEPENDENTS:
            deps.append(dts)
        else:
            deps = self.dependents = dict.fromkeys(deps)
            deps[dts] = None

    def remove_dependent(self, dts: "SchedulerTask") -> None:
        deps = self.dependents
        if type(deps) is dict:
            deps.pop(dts, None)
        elif dts in deps:
            if len(deps) == 1:
                self.dependents = ()
            else:
                deps.remove(dts)

    def waiting_dependents(self) -> list:
        """The dependents counted in ``waiters``."""
        return [dts for dts in self.dependents if dts.needs_inputs]

    def __repr__(self) -> str:
        return f"<SchedulerTask {self.key!r} {self.state.value}>"

    # Identity semantics: tasks live in sets keyed by object.
    __hash__ = object.__hash__


class WorkerRecord:
    __slots__ = (
        "wid",
        "name",
        "address",
        "nthreads",
        "memory_limit",
        "resources",
        "used_resources",
        "processing",
        "has_what",
        "nbytes",
        "last_seen",
        "memory",
        "functions",
        "functions_dropped",
        "room",
        "ahead",
        "ghosts",
        "mean_duration",
        "mean_nbytes",
        "paused",
        "heartbeat",
    )

    def __init__(self, wid: int, name: str, address: str, nthreads: int, memory_limit: int, resources: dict, now: float):
        self.wid = wid
        self.name = name
        self.address = address
        self.nthreads = max(1, nthreads)
        self.memory_limit = memory_limit
        self.resources = dict(resources)
        self.used_resources = {r: 0.0 for r in resources}
        self.processing: set[SchedulerTask] = set()
        self.has_what: set[SchedulerTask] = set()
        self.nbytes = 0
        self.last_seen = now
        self.memory = 0
        # Function tokens this worker was sent, with the id each has on its
        # connection; ids are never reused (``functions_dropped`` counts the
        # released ones), so a late Execute cannot name the wrong function.
        self.functions: dict[str, int] = {}
        self.functions_dropped = 0
        # How many tasks it may hold (threads + queue), sized by the scheduler
        # from the running means of its tasks' durations and result sizes.
        self.room = self.nthreads
        self.ahead = 0  # tasks it may hold beyond its threads
        # Tasks cancelled here that may still run, each keeping a thread busy
        # until the worker says it stopped (TasksCancelled).
        self.ghosts: set[int] = set()
        self.mean_duration = -1.0  # < 0: nothing measured yet
        self.mean_nbytes = 0.0
        self.paused = False  # short of memory: runs nothing new, gets nothing new
        self.heartbeat = None  # its latest WorkerHeartbeat (memory and spill figures)

    @property
    def load(self) -> float:
        return (len(self.processing) + len(self.ghosts)) / self.nthreads

    def snapshot(self) -> dict:
        hb = self.heartbeat
        return {
            "processing": len(self.processing),
            # Cancelled tasks that may still hold a thread there.
            "cancelled_running": len(self.ghosts),
            "room": self.room,
            "stored": len(self.has_what),
            "nbytes": self.nbytes,
            "paused": self.paused,
            "memory": self.memory,
            "memory_limit": self.memory_limit,
            # As of its latest heartbeat:
            "managed": hb.managed if hb else 0,
            "spilled": hb.spilled if hb else 0,
            "spilled_count": hb.spilled_count if hb else 0,
            "spilled_total": hb.spilled_total if hb else 0,
            "peak_memory": hb.peak_memory if hb else 0,
        }

    def memory_note(self) -> str:
        """Why this worker may have died, when its memory points that way."""
        if self.memory_limit and (self.paused or self.memory > 0.8 * self.memory_limit):
            return (
                f"; it last reported {format_bytes(self.memory)} of memory "
                f"for a {format_bytes(self.memory_limit)} limit"
            )
        return ""

    def __repr__(self) -> str:
        return f"<WorkerRecord {self.wid} {self.name!r} {self.address} processing={len(self.processing)}>"

    __hash__ = object.__hash__


class ClientRecord:
    __slots__ = ("cid", "name", "wants")

    def __init__(self, cid: str, name: str = ""):
        self.cid = cid
        self.name = name
        self.wants: set[SchedulerTask] = set()

    def __repr__(self) -> str:
        return f"<ClientRecord {self.cid} wants={len(self.wants)}>"
