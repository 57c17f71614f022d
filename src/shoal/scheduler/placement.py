"""Where a ready task runs: swappable policies over read-only views.

The state machine decides *when* a task is ready; a policy decides *where*.
A policy sees the task and the candidate workers and returns one of them; it
must not change either.
"""

from __future__ import annotations

import random
from typing import Iterable, Protocol

from .records import SchedulerTask, WorkerRecord


class PlacementPolicy(Protocol):
    def choose(self, ts: SchedulerTask, candidates: Iterable[WorkerRecord]) -> WorkerRecord | None:
        """Pick a worker for ``ts`` among ``candidates`` (never empty)."""


class LocalityPolicy:
    """Prefer the worker holding the most input bytes; break ties by load.

    Only holders of the task's inputs are scored, so the cost is proportional
    to the task's dependencies, not to the cluster size; tasks without inputs
    go to the least-loaded candidate.
    """

    def choose(self, ts: SchedulerTask, candidates) -> WorkerRecord | None:
        allowed = candidates if isinstance(candidates, (set, frozenset, dict)) else set(candidates)
        if ts.dependencies:
            score: dict[WorkerRecord, int] = {}
            for dep in ts.dependencies:
                nb = dep.nbytes or 1
                for ws in dep.who_has:
                    if ws in allowed:
                        score[ws] = score.get(ws, 0) + nb
            if score:
                return min(score, key=lambda ws: (-score[ws], ws.load, ws.wid))
        best = None
        best_load = None
        for ws in allowed:
            load = ws.load
            if best is None or load < best_load or (load == best_load and ws.wid < best.wid):
                best, best_load = ws, load
        return best


class RandomPolicy:
    """Uniformly random placement; seeded, so runs are reproducible."""

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, ts: SchedulerTask, candidates) -> WorkerRecord | None:
        pool = sorted(candidates, key=lambda ws: ws.wid)
        return self._rng.choice(pool) if pool else None
