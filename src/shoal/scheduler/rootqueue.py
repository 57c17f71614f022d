"""The queue of ready root tasks: a heap, with a fast lane for entries that
arrive in order.

Root tasks usually become ready in priority order, or in its exact reverse
(a ``map``, the leaves of a graph, one part after another; transitions run
last-in first-out), and popping a 100k-entry heap cost ~17 tuple comparisons
a task.  So entries pushed since the last pop are sorted (linear for a run in
either order) and, when they all come after what is queued in order, appended
to a FIFO; anything else (a more urgent graph, a task put back) goes to the
heap.  ``pop`` takes the smaller of the two heads: the order is a heap's.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque


class RootQueue:
    """Entries are ``(p0, p1, p2, seq, task)``: priority, then arrival (which
    also keeps comparisons from ever reaching the task)."""

    __slots__ = ("_fifo", "_heap", "_new", "_seq")

    def __init__(self):
        self._fifo: deque = deque()  # non-decreasing
        self._heap: list = []
        self._new: list = []  # pushed since the last pop, unsorted
        self._seq = itertools.count()

    def push(self, p0, p1, p2, task) -> None:
        self._new.append((p0, p1, p2, next(self._seq), task))

    def pop(self) -> tuple:
        if self._new:
            self._settle()
        fifo, heap = self._fifo, self._heap
        if heap and (not fifo or heap[0] < fifo[0]):
            return heapq.heappop(heap)
        return fifo.popleft()

    def _settle(self) -> None:
        new, self._new = self._new, []
        new.sort()
        fifo, heap = self._fifo, self._heap
        if not fifo or new[0] >= fifo[-1]:
            fifo.extend(new)
            return
        for entry in new:
            if entry >= fifo[-1]:
                fifo.append(entry)
            else:
                heapq.heappush(heap, entry)

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap) + len(self._new)

    def __bool__(self) -> bool:
        return bool(self._fifo) or bool(self._heap) or bool(self._new)

    def __iter__(self):
        yield from self._fifo
        yield from self._heap
        yield from self._new
