"""Invariants of the scheduler state, checked by ``SchedulerState.validate()``.

Kept apart from the transitions: a reader of either sees one concern.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .records import MEMORY, NO_WORKER, PROCESSING, QUEUED, RELEASED, WAITING

if TYPE_CHECKING:
    from .state import SchedulerState


class InvariantError(AssertionError):
    """``validate()`` found the state inconsistent."""


def validate_state(state: "SchedulerState") -> None:
    """Check every invariant; raise :class:`InvariantError` naming the first broken one."""

    def check(cond: bool, what: str, ts=None) -> None:
        if not cond:
            raise InvariantError(f"{what}: {ts!r}" if ts is not None else what)

    for key, ts in state.tasks.items():
        check(ts.key == key, "task stored under another key", ts)
        check(state.by_id.get(ts.id) is ts, "task missing from by_id", ts)
        for dep in ts.dependencies:
            check(dep.key in state.tasks, "dependency forgotten before its dependent", ts)
            check(ts in dep.dependents, "dependency does not list its dependent", ts)
        for dts in ts.dependents:
            check(ts in dts.dependencies, "dependent does not list its dependency", ts)
        waiters = ts.waiting_dependents()
        for w in waiters:
            check(w.state in (WAITING, QUEUED, NO_WORKER, PROCESSING), "waiter not waiting", w)
        check(ts.waiters == len(waiters), f"waiters={ts.waiters}, actual {len(waiters)}", ts)
        waiting_like = ts.state in (WAITING, QUEUED, NO_WORKER, PROCESSING)
        if ts.dependencies:
            check(ts.needs_inputs == waiting_like, "waiters out of sync with state", ts)
        check(len(set(map(id, ts.who_has))) == len(ts.who_has), "a holder listed twice", ts)
        if ts.state is MEMORY:
            check(bool(ts.who_has), "in memory but no holder", ts)
            for ws in ts.who_has:
                check(ws.wid in state.workers and ts in ws.has_what, "holder does not know", ts)
        else:
            check(not ts.who_has, "holders recorded outside memory", ts)
        if ts.state is PROCESSING:
            ws = ts.processing_on
            check(ws is not None and ws.wid in state.workers and ts in ws.processing, "processing on unknown worker", ts)
            for dep in ts.dependencies:
                # Sent ahead: an input may still be running on the same worker.
                ok = dep.state is MEMORY or (dep.state is PROCESSING and dep.processing_on is ws)
                check(ok, "processing before its inputs exist", ts)
        else:
            check(ts.processing_on is None, "processing_on set outside processing", ts)
        if ts.state is WAITING:
            n = sum(1 for d in ts.dependencies if d.state is not MEMORY)
            check(ts.waiting_on == n and n > 0, f"waiting_on={ts.waiting_on}, actual {n}", ts)
        if ts.state is NO_WORKER:
            check(ts in state.unrunnable, "no-worker task not tracked", ts)
        for cid in ts.wanted_by:
            check(cid in state.clients and ts in state.clients[cid].wants, "wanted by unknown client", ts)
        if ts.state is RELEASED:
            check(bool(ts.dependents or ts.wanted_by), "released task neither needed nor forgotten", ts)
        if ts.state in (MEMORY,):
            check(bool(ts.waiters or ts.wanted_by), "data kept that nobody needs", ts)
    queued = {e[-1] for e in state.queued if e[-1].state is QUEUED}
    for ts in state.tasks.values():
        if ts.state is QUEUED:
            check(ts in queued, "queued task not in the queue", ts)
    check(len(state.by_id) == len(state.tasks), "by_id and tasks differ in size")
    counts: dict = {}
    for ts in state.tasks.values():
        if ts.func:
            counts[ts.func] = counts.get(ts.func, 0) + 1
    check(counts == state.function_refs, "function reference counts out of sync")
    check(set(state.functions) == set(counts), "functions kept that no task names")
    for ws in state.workers.values():
        for ts in ws.processing:
            check(ts.state is PROCESSING and ts.processing_on is ws, "worker processes a task not processing there", ts)
        for ts in ws.has_what:
            check(ts.state is MEMORY and ws in ts.who_has, "worker holds a task not in memory there", ts)
        room = len(ws.processing) < ws.room and not ws.paused and ws.wid not in state.retirements.workers
        check((ws in state.idle) == room, f"idle set out of sync for worker {ws.wid}")
    check(state.n_paused == sum(ws.paused for ws in state.workers.values()), "paused count out of sync")
    for wid in state.retirements.workers:
        check(wid in state.workers, f"retiring worker {wid} is not a worker")
    for cid in state.disconnected:
        check(cid in state.clients, f"disconnected client {cid} has no record")
    for cid, cr in state.clients.items():
        for ts in cr.wants:
            check(cid in ts.wanted_by, "client wants a task that does not know it", ts)
    if state.queued and state.idle:
        check(all(t.state is not QUEUED for *_, t in state.queued), "queued tasks while workers idle")
