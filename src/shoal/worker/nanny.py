"""Supervising worker processes: restart after a crash, stop with the scheduler.

``shoal worker`` runs each worker process under a :class:`Supervisor` (the
"nanny"). A worker that dies unexpectedly -- a task called ``os._exit``,
segfaulted or was killed for memory -- is started again under the same name,
so the scheduler can retry its tasks and count the crashes. A worker that
stopped because the scheduler is gone, or because it was asked to, is not.

The supervisor also enforces the memory limit: a worker whose resident
memory passes the ``terminate`` fraction of its limit is killed (and so
restarted), as the worker itself may be too busy, or too stuck in a task, to
notice.  Whatever a worker spilled to disk is removed once it exits, however
it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time

import psutil

from ..utils import format_bytes
from .store import remove_spill_directory, spill_directory

logger = logging.getLogger("shoal.nanny")

# How often children are checked for exit and for memory.
POLL_INTERVAL = 0.1

# Exit codes of a worker process, read by its supervisor.  Unusual numbers,
# so that a task calling ``os._exit(1)`` still counts as a crash.
EXIT_CLOSED = 0  # asked to stop (signal, or the scheduler said so)
EXIT_START_FAILED = 97  # could not start (e.g. scheduler unreachable)
EXIT_SCHEDULER_GONE = 98  # lost its scheduler: nothing to restart for
_FINAL = (EXIT_CLOSED, EXIT_START_FAILED, EXIT_SCHEDULER_GONE)


class Supervisor:
    """Keep one process per argument list alive until told to stop.

    ``max_restarts`` crashes within ``window`` seconds make it give up on
    that slot (a worker that cannot stay up is not restarted forever).
    """

    def __init__(
        self,
        arg_lists: list[list[str]],
        *,
        max_restarts: int = 20,
        window: float = 60.0,
        spawn=None,
        memory_limit: int = 0,
        terminate: float = 0.95,
        local_directory: str | None = None,
    ):
        from ..cluster.local import spawn as default_spawn

        self._spawn = spawn or default_spawn
        self.arg_lists = arg_lists
        self.max_restarts = max_restarts
        self.window = window
        self.memory_limit = memory_limit
        self.kill_at = int(memory_limit * terminate) if memory_limit and terminate else 0
        self.local_directory = local_directory or tempfile.gettempdir()
        self.memory_kills = 0
        self.procs: list[subprocess.Popen | None] = []
        self.restarts: list[list[float]] = [[] for _ in arg_lists]
        self._stopping: float | None = None

    def stop(self, *_ignored) -> None:
        """Stop every child (safe to call from a signal handler: it does not wait)."""
        if self._stopping is None:
            self._stopping = time.monotonic()
        for p in self.procs:
            if p is not None and p.returncode is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        # Allocations of 4 MiB and more (large results) get their own mmap,
        # handed back to the system when freed, so a worker's RSS says what
        # it holds (glibc otherwise raises that threshold as large blocks are
        # freed, keeping them in a heap that does not shrink).  Not dask's
        # MALLOC_TRIM_THRESHOLD_: that puts everything over 128 KiB in its
        # own mmap, which cost 10-15% on the dataframe benchmarks.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 2**20))
        self.procs = [self._spawn(args) for args in self.arg_lists]
        codes: dict[int, int] = {}
        while len(codes) < len(self.procs):
            for i, p in enumerate(self.procs):
                if i in codes or p is None:
                    continue
                rc = p.poll()
                if rc is None:
                    self._check_memory(p)
                    continue
                remove_spill_directory(spill_directory(self.local_directory, p.pid))
                if self._stopping is not None or rc in _FINAL or not self._may_restart(i):
                    codes[i] = rc
                    continue
                logger.warning("worker process %d exited with %s; restarting it", p.pid, _describe(rc))
                self.procs[i] = self._spawn(self.arg_lists[i])
            if self._stopping is not None and time.monotonic() - self._stopping > 5:
                for p in self.procs:
                    if p is not None and p.poll() is None:
                        p.kill()
            if len(codes) < len(self.procs):
                time.sleep(POLL_INTERVAL)
        if self._stopping is not None:
            return 0
        failed = [c for c in codes.values() if c not in (EXIT_CLOSED, EXIT_SCHEDULER_GONE)]
        return 1 if failed else 0

    def _check_memory(self, p: subprocess.Popen) -> None:
        if not self.kill_at or self._stopping is not None:
            return
        try:
            rss = psutil.Process(p.pid).memory_info().rss
        except psutil.Error:
            return
        if rss > self.kill_at:
            logger.warning(
                "worker process %d uses %s, past %d%% of its %s memory limit: killing it",
                p.pid, format_bytes(rss), round(100 * self.kill_at / self.memory_limit), format_bytes(self.memory_limit),
            )
            self.memory_kills += 1
            p.kill()

    def _may_restart(self, i: int) -> bool:
        now = time.monotonic()
        recent = [t for t in self.restarts[i] if now - t < self.window]
        if len(recent) >= self.max_restarts:
            logger.error("worker slot %d crashed %d times in %.0fs; giving up on it", i, len(recent), self.window)
            return False
        recent.append(now)
        self.restarts[i] = recent
        return True


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"code {rc}"
