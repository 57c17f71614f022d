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


# Short names for the states, shared by the core and its invariants.
RELEASED = TaskState.RELEASED
WAITING = TaskState.WAITING
QUEUED = TaskState.QUEUED
NO_WORKER = TaskState.NO_WORKER
PROCESSING = TaskState.PROCESSING
MEMORY = TaskState.MEMORY
ERRED = TaskState.ERRED


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
        self.run_spec = run_spec
        self.state = TaskState.RELEASED
        self.priority = priority
        self.dependencies: list[SchedulerTask] = []
        # Ordered sets (dicts with None values): iteration order must not
        # depend on object identity, so the same events give the same result.
        self.dependents: dict[SchedulerTask, None] = {}
        # Dependents that still need this task's data (not yet in memory).
        self.waiters: dict[SchedulerTask, None] = {}
        self.waiting_on = 0  # dependencies not in memory, while WAITING
        self.who_has: set[WorkerRecord] = set()
        self.processing_on: WorkerRecord | None = None
        self.nbytes = 0
        self.type_name = ""
        self.wanted_by: set[str] = set()  # client ids holding futures
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
