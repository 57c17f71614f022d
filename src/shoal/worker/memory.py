"""A worker's memory budget and where each of its values lives (pure, no I/O).

Thresholds are fractions of the worker's memory limit, as in dask:

* ``target``: results held in memory (their ``sizeof``) above this are moved
  to disk, least recently used first, as soon as they appear;
* ``spill``: the process's resident memory (RSS, sampled) above this moves
  more results to disk, enough to bring it back to ``target``;
* ``pause``: RSS above this pauses the worker (no task starts, nothing is
  fetched) until it falls below again;
* ``terminate``: RSS above this makes the supervisor kill and restart the
  process (see ``nanny.py``): beyond it the machine itself is at risk.

A fraction of 0 turns that step off; a limit of 0 turns them all off.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryLimits:
    limit: int = 0  # bytes; 0: no limit
    target: float = 0.6
    spill: float = 0.7
    pause: float = 0.8
    terminate: float = 0.95

    def __post_init__(self) -> None:
        for name in ("target", "spill", "pause", "terminate"):
            f = getattr(self, name)
            if not 0 <= f <= 1:
                raise ValueError(f"memory {name} fraction must be within [0, 1], not {f}")

    def bytes(self, fraction: float) -> int | None:
        """``fraction`` of the limit in bytes, or None when that step is off."""
        if not self.limit or not fraction:
            return None
        return int(self.limit * fraction)


class Residency:
    """Which values are in memory and which on disk, with their sizes.

    Values in memory are kept in least-recently-used order; those that could
    not be written to disk (``pin``) stay in memory and are never tried again.
    Sizes are the in-memory estimates (``sizeof``) whichever side holds them.
    """

    def __init__(self) -> None:
        self.fast: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU first
        self.pinned: dict[int, int] = {}
        self.slow: dict[int, int] = {}
        self.fast_bytes = 0  # memory held by ``fast`` and ``pinned``
        self.slow_bytes = 0
        self.spilled_total = 0  # bytes ever moved to disk
        self.spilled_count = 0  # moves to disk, ever

    def __contains__(self, id: int) -> bool:
        return id in self.fast or id in self.slow or id in self.pinned

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow) + len(self.pinned)

    def add(self, id: int, nbytes: int) -> None:
        """A new value in memory: the most recently used."""
        self.fast[id] = nbytes
        self.fast_bytes += nbytes

    def remove(self, id: int) -> None:
        if id in self.fast:
            self.fast_bytes -= self.fast.pop(id)
        elif id in self.pinned:
            self.fast_bytes -= self.pinned.pop(id)
        elif id in self.slow:
            self.slow_bytes -= self.slow.pop(id)

    def touch(self, id: int) -> bool:
        """``id`` is used now; True if that brings it back from disk."""
        if id in self.fast:
            self.fast.move_to_end(id)
            return False
        nbytes = self.slow.pop(id, None)
        if nbytes is None:
            return False  # pinned, or not here
        self.slow_bytes -= nbytes
        self.add(id, nbytes)
        return True

    def evict(self, nbytes: int) -> list[int]:
        """Move least recently used values to disk until ``nbytes`` are freed
        (or none is left in memory); return their ids."""
        out = []
        freed = 0
        fast = self.fast
        while fast and freed < nbytes:
            id, size = fast.popitem(last=False)
            self.fast_bytes -= size
            self.slow[id] = size
            self.slow_bytes += size
            self.spilled_total += size
            self.spilled_count += 1
            freed += size
            out.append(id)
        return out

    def pin(self, id: int) -> None:
        """``id`` could not be written to disk: it stays in memory for good."""
        nbytes = self.slow.pop(id, None)
        if nbytes is not None:
            self.slow_bytes -= nbytes
            self.spilled_total -= nbytes
            self.spilled_count -= 1
            self.fast_bytes += nbytes
            self.pinned[id] = nbytes

    def check(self) -> None:
        assert self.fast_bytes == sum(self.fast.values()) + sum(self.pinned.values()), "fast bytes out of sync"
        assert self.slow_bytes == sum(self.slow.values()), "slow bytes out of sync"
        assert not (set(self.fast) & set(self.slow)), "a value both in memory and on disk"


_libc = None


def trim_heap() -> bool:
    """Give memory freed on the C heap back to the system (glibc's
    ``malloc_trim``); False where that is not available."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    return bool(_libc.malloc_trim(0))
