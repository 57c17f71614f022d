"""Supervising worker processes: restart after a crash, stop with the scheduler.

``shoal worker`` runs each worker process under a :class:`Supervisor` (the
"nanny"). A worker that dies unexpectedly -- a task called ``os._exit``,
segfaulted or was killed for memory -- is started again under the same name,
so the scheduler can retry its tasks and count the crashes. A worker that
stopped because the scheduler is gone, or because it was asked to, is not.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time

logger = logging.getLogger("shoal.nanny")

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

    def __init__(self, arg_lists: list[list[str]], *, max_restarts: int = 20, window: float = 60.0, spawn=None):
        from ..cluster.local import spawn as default_spawn

        self._spawn = spawn or default_spawn
        self.arg_lists = arg_lists
        self.max_restarts = max_restarts
        self.window = window
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
        self.procs = [self._spawn(args) for args in self.arg_lists]
        codes: dict[int, int] = {}
        while len(codes) < len(self.procs):
            for i, p in enumerate(self.procs):
                if i in codes or p is None:
                    continue
                try:
                    rc = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                if self._stopping is not None or rc in _FINAL or not self._may_restart(i):
                    codes[i] = rc
                    continue
                logger.warning("worker process %d exited with %s; restarting it", p.pid, _describe(rc))
                self.procs[i] = self._spawn(self.arg_lists[i])
            if self._stopping is not None and time.monotonic() - self._stopping > 5:
                for p in self.procs:
                    if p is not None and p.poll() is None:
                        p.kill()
        if self._stopping is not None:
            return 0
        failed = [c for c in codes.values() if c not in (EXIT_CLOSED, EXIT_SCHEDULER_GONE)]
        return 1 if failed else 0

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
