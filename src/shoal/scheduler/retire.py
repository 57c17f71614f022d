"""Graceful retirement: copy the data only some workers hold, then stop them.

A retiring worker is sent no new tasks and hands back those it has not
started (``DrainWorker`` -> ``TasksRejected``); tasks already running there
finish.  Every key held only by retiring workers is copied to another worker
(``AcquireData``); the copy is confirmed by ``DataAcquired``, which adds the
holder as after any transfer.  A worker that runs nothing and holds nothing
that exists nowhere else is drained: it is told to close (``CloseWorker``; it
exits with the "closed" code, so its nanny does not restart it) or, when the
request said ``close=False``, left connected and idle.  Nothing is recomputed.

A request that would leave no other worker is refused: the data would have
nowhere to go.  If the other workers die while a retirement is under way, it
waits, keeping the data, until a worker joins that can take it.

Part of the scheduler core: no I/O, no clock (retries count ``Ticked`` events).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import messages as m
from .records import MEMORY, SchedulerTask, WorkerRecord

if TYPE_CHECKING:
    from .state import SchedulerState

# A copy not confirmed after this many ticks is asked for again (the ask is
# idempotent: a worker already fetching the key only learns the holders).
RETRY_TICKS = 4


class RetireRequest:
    __slots__ = ("cid", "request_id", "wids", "close")

    def __init__(self, cid: str, request_id: int, wids: set[int], close: bool):
        self.cid = cid
        self.request_id = request_id
        self.wids = wids
        self.close = close


class Retirements:
    """The workers being retired and the copies made on their behalf."""

    def __init__(self, state: "SchedulerState"):
        self.state = state
        # wid -> close it once drained.  Read by the core's placement: a
        # worker in here is never sent a task.
        self.workers: dict[int, bool] = {}
        self.drained: set[int] = set()
        self.closing: set[int] = set()  # told to close; waiting for them to leave
        self.requests: list[RetireRequest] = []
        # Keys held only by retiring workers -> (target wid, tick when asked).
        self.copies: dict[SchedulerTask, tuple[int, int]] = {}
        self.ticks = 0
        self._dirty = False
        # wid -> (tasks processing, keys held) at the last look: a change means
        # a task finished or was handed back, or data arrived or was released.
        self._seen: dict[int, tuple[int, int]] = {}

    # -- events (called by the core) -------------------------------------------------

    def request(self, cid: str, msg: m.RetireWorkers) -> None:
        state = self.state
        by_name: dict[str, WorkerRecord] = {}
        for ws in state.workers.values():
            by_name[ws.name] = ws
            by_name[ws.address] = ws
        unknown = [w for w in msg.workers if w not in by_name]
        if unknown:
            known = sorted(ws.name for ws in state.workers.values())
            self._reply(cid, msg.request_id, f"unknown workers {unknown!r} (known: {known!r})")
            return
        chosen = {by_name[w].wid: by_name[w] for w in msg.workers}
        if chosen and all(wid in chosen or wid in self.workers for wid in state.workers):
            names = sorted(ws.name for ws in chosen.values())
            self._reply(
                cid,
                msg.request_id,
                f"retiring {names!r} would leave no worker to take their data: start another worker first",
            )
            return
        for wid, ws in chosen.items():
            if wid not in self.workers:
                self.workers[wid] = msg.close
                state.idle.discard(ws)
                state._cmds.worker(wid, m.DrainWorker())
            elif msg.close:
                self.workers[wid] = True
        self.requests.append(RetireRequest(cid, msg.request_id, set(chosen), msg.close))
        self._dirty = True

    def worker_joined(self) -> None:
        self._dirty = True  # somewhere new to copy to

    def worker_left(self, ws: WorkerRecord) -> None:
        self.workers.pop(ws.wid, None)
        self.drained.discard(ws.wid)
        self.closing.discard(ws.wid)
        self._seen.pop(ws.wid, None)
        self._dirty = True

    def data_acquired(self) -> None:
        self._dirty = True  # perhaps a copy we asked for

    def ticked(self) -> None:
        self.ticks += 1
        self._dirty = True

    # -- progress ----------------------------------------------------------------------

    def advance(self) -> None:
        """Ask for missing copies, close drained workers, answer finished requests.

        A full pass over the retiring workers' data runs only when something
        that matters may have changed: a copy was confirmed, a retiring
        worker's tasks or data changed, a worker came or went, or a tick
        passed (which also catches what these signs miss)."""
        state = self.state
        for wid in self.workers:
            ws = state.workers[wid]
            seen = (len(ws.processing), len(ws.has_what))
            if self._seen.get(wid) != seen:
                self._seen[wid] = seen
                self._dirty = True
        if self._dirty:
            self._dirty = False
            self._copy_sole_holdings()
            self._close_drained()
        self._answer_requests()

    def _copy_sole_holdings(self) -> None:
        state = self.state
        retiring = self.workers
        for ts in list(self.copies):
            if ts.state is not MEMORY or not self._held_only_by_retiring(ts):
                del self.copies[ts]
        targets = [ws for ws in state.workers.values() if ws.wid not in retiring]
        if not targets:
            return  # keep the data until a worker joins that can take it
        load = {ws: ws.nbytes for ws in targets}
        asks: dict[WorkerRecord, list[SchedulerTask]] = {}
        for wid in sorted(retiring):
            for ts in sorted(state.workers[wid].has_what, key=_by_id):
                if not self._held_only_by_retiring(ts):
                    continue
                asked = self.copies.get(ts)
                target = state.workers.get(asked[0]) if asked is not None else None
                if target is not None and self.ticks - asked[1] < RETRY_TICKS:
                    continue  # asked recently; the answer is on its way
                if target is None:
                    target = min(targets, key=lambda w: (load[w], w.wid))
                    load[target] += ts.nbytes
                self.copies[ts] = (target.wid, self.ticks)
                asks.setdefault(target, []).append(ts)
        for target, tasks in asks.items():
            msg = m.AcquireData(
                [ts.id for ts in tasks],
                [ts.key for ts in tasks],
                [sorted(w.wid for w in ts.who_has) for ts in tasks],
            )
            state._cmds.worker(target.wid, msg)

    def _held_only_by_retiring(self, ts: SchedulerTask) -> bool:
        retiring = self.workers
        return all(ws.wid in retiring for ws in ts.who_has)

    def _close_drained(self) -> None:
        state = self.state
        for wid, close in self.workers.items():
            if wid in self.closing:
                continue
            ws = state.workers[wid]
            if ws.processing or any(self._held_only_by_retiring(ts) for ts in ws.has_what):
                self.drained.discard(wid)  # e.g. another holder died since
                continue
            self.drained.add(wid)
            if close:
                self.closing.add(wid)
                state._cmds.worker(wid, m.CloseWorker("retired"))

    def _answer_requests(self) -> None:
        if not self.requests:
            return
        workers = self.state.workers
        still: list[RetireRequest] = []
        for r in self.requests:
            if all(wid not in workers or (not r.close and wid in self.drained) for wid in r.wids):
                self._reply(r.cid, r.request_id, "")
            else:
                still.append(r)
        self.requests = still

    def _reply(self, cid: str, request_id: int, error: str) -> None:
        if cid in self.state.clients:
            self.state._cmds.client(cid, m.RequestDone(request_id, error))


def _by_id(ts: SchedulerTask) -> int:
    return ts.id
