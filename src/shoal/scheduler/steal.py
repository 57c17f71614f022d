"""Work stealing: a worker with free threads takes queued tasks from a busy one.

Placement guesses.  Root tasks go out in runs sized by how fast a worker's
recent tasks were, and tasks go where their inputs are; when a guess is
wrong (a long task lands behind a queue sized for tiny ones, or one worker
holds the inputs of everything), a worker sits idle while another has a
backlog.  The scheduler then asks the busy worker to give back some of the
tasks it has not started (``StealTasks``).  The worker answers for every id
(``TasksStolen``): those it dropped go to the idle worker, the rest (started
or finished meanwhile) stay where they are.  Because the worker confirms
before anything moves, a stolen task never runs twice.

Only tasks free to move are taken: inputs all in memory, no worker
restrictions or resources, no dependent already sent ahead to wait for it
there, and inputs cheap to move: what the thief would have to fetch stays
under ``STEAL_MIN_BYTES``, or under what the victim's recent tasks took to run
at ``STEAL_BANDWIDTH`` (a task that reads 8 MiB and runs for a millisecond
is better left where its input is; moving it would also double that memory).  One request per victim is in flight at a time, and the tasks taken
are the victim's least urgent, so its own next tasks and the runs of
neighbours that feed its reductions stay put.

Part of the scheduler core: no I/O, no clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import messages as m
from .records import MEMORY, PROCESSING, RELEASED, WAITING, SchedulerTask, WorkerRecord

if TYPE_CHECKING:
    from .state import SchedulerState


# Inputs the thief would fetch for a stolen task: always allowed up to this
# many bytes, and beyond it as many as this bandwidth moves in the time the
# victim's tasks take (its running mean).
STEAL_MIN_BYTES = 2**20
STEAL_BANDWIDTH = 100e6  # bytes per second


class Stealing:
    """Idle workers to feed, and the steal requests in flight."""

    def __init__(self, state: "SchedulerState"):
        self.state = state
        # Workers that may have a free thread since the last look (set by
        # the core whenever a task leaves a worker that then runs fewer
        # tasks than it has threads).
        self.hungry: set[WorkerRecord] = set()
        self.requested: dict[int, set[int]] = {}  # victim wid -> task ids asked back
        self.thief: dict[int, WorkerRecord] = {}  # task id -> where it goes if given back
        self.expecting: dict[int, int] = {}  # thief wid -> tasks on their way to it

    # -- called by the core ------------------------------------------------------

    def balance(self) -> None:
        """Ask busy workers for tasks on behalf of workers with free threads."""
        state = self.state
        hungry = [ws for ws in self.hungry if ws in state.idle and self._wants(ws) > 0]
        self.hungry.clear()
        if not hungry:
            return
        victims = [
            ws
            for ws in state.workers.values()
            if len(ws.processing) > ws.nthreads and ws.wid not in self.requested and not ws.paused
        ]
        if not victims:
            return
        hungry.sort(key=lambda ws: (ws.load, ws.wid))
        for thief in hungry:
            while victims and self._wants(thief) > 0:
                victim = max(victims, key=lambda ws: (ws.load, -ws.wid))
                victims.remove(victim)
                self._ask(victim, thief)

    def answered(self, ws: WorkerRecord, msg: m.TasksStolen) -> None:
        state = self.state
        asked = self.requested.pop(ws.wid, set())
        for tid in msg.kept:
            self._arrived(tid)
        recs: dict = {}
        for tid in msg.ids:
            thief = self._arrived(tid)
            ts = state.by_id.get(tid)
            if tid not in asked or ts is None or ts.state is not PROCESSING or ts.processing_on is not ws:
                continue  # moved by the scheduler since; the worker dropped its copy
            ws.processing.discard(ts)
            ts.processing_on = None
            ts.started_on = None
            # Dependents sent ahead to wait for it there since it was asked for.
            state._retract_ahead(ts, recs)
            if (
                thief is not None
                and state.workers.get(thief.wid) is thief
                and not thief.paused
                and thief.wid not in state.retirements.workers
                and all(d.state is MEMORY for d in ts.dependencies)
            ):
                state._send(ts, thief)
            else:
                ts.state = RELEASED  # placed afresh
                recs[ts] = WAITING
        state._worker_room(ws)
        state._transitions(recs)

    def worker_left(self, ws: WorkerRecord) -> None:
        for tid in self.requested.pop(ws.wid, ()):
            self._arrived(tid)
        self.expecting.pop(ws.wid, None)
        self.hungry.discard(ws)

    def ticked(self) -> None:
        """Look again at every worker with a free thread (a steal found
        nothing to take before, or a victim's backlog grew since)."""
        for ws in self.state.idle:
            if self._wants(ws) > 0:
                self.hungry.add(ws)

    # -- internals ---------------------------------------------------------------

    def _wants(self, ws: WorkerRecord) -> int:
        """Threads of ``ws`` that nothing running, queued or on its way fills."""
        return ws.nthreads - len(ws.ghosts) - len(ws.processing) - self.expecting.get(ws.wid, 0)

    def _ask(self, victim: WorkerRecord, thief: WorkerRecord) -> None:
        limit = max(STEAL_MIN_BYTES, victim.mean_duration * STEAL_BANDWIDTH)
        movable = [ts for ts in victim.processing if _movable(ts, victim, thief, limit)]
        if not movable:
            return
        # Even out the two backlogs, without leaving the victim's own threads idle.
        n = max(self._wants(thief), (len(victim.processing) - len(thief.processing)) // 2)
        n = min(n, len(victim.processing) - victim.nthreads, len(movable))
        if n <= 0:
            return
        movable.sort(key=_by_priority, reverse=True)  # the victim's least urgent first
        ids = [ts.id for ts in movable[:n]]
        self.requested[victim.wid] = set(ids)
        for tid in ids:
            self.thief[tid] = thief
        self.expecting[thief.wid] = self.expecting.get(thief.wid, 0) + len(ids)
        self.state._cmds.worker(victim.wid, m.StealTasks(ids))

    def _arrived(self, tid: int) -> WorkerRecord | None:
        """The steal of ``tid`` is settled: the thief no longer waits for it."""
        thief = self.thief.pop(tid, None)
        if thief is not None:
            left = self.expecting.get(thief.wid, 0) - 1
            if left > 0:
                self.expecting[thief.wid] = left
            else:
                self.expecting.pop(thief.wid, None)
        return thief


def _movable(ts: SchedulerTask, ws: WorkerRecord, thief: WorkerRecord, limit: float) -> bool:
    if ts.started_on is ws or ts.workers is not None or ts.resources:
        return False
    to_fetch = 0
    for dep in ts.dependencies:
        if dep.state is not MEMORY:
            return False  # sent ahead: it waits for an input running there
        if thief not in dep.who_has:
            to_fetch += dep.nbytes
    if to_fetch > limit:
        return False
    for dts in ts.dependents:
        if dts.state is PROCESSING and dts.processing_on is ws:
            return False  # a dependent waits for it there
    return True


def _by_priority(ts: SchedulerTask) -> tuple:
    return ts.priority
