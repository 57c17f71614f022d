"""A scheduler and workers on this machine.

With ``processes=True`` (the default) the scheduler and each worker are
separate processes started with ``python -m shoal``; they are tied to this
process (Linux ``PR_SET_PDEATHSIG``) so that they die with it even when it is
killed, and ``close()`` (also run at exit) stops them.  With
``processes=False`` they run on an event loop in a thread of this process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref

import psutil

from ..utils import parse_bytes

logger = logging.getLogger("shoal.cluster")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass  # not Linux: close() and atexit still stop the children


def spawn(args: list[str], **kw) -> subprocess.Popen:
    """Start ``python -m shoal ARGS`` tied to this process's lifetime."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen(
        [sys.executable, "-m", "shoal", *args],
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        env=env,
        **kw,
    )


def stop_processes(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def default_sizing(n_workers: int | None, threads_per_worker: int | None, processes: bool) -> tuple[int, int]:
    cores = os.cpu_count() or 1
    if n_workers is None and threads_per_worker is None:
        return (cores, 1) if processes else (1, cores)
    if n_workers is None:
        return max(1, cores // threads_per_worker), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, cores // max(1, n_workers))
    return n_workers, threads_per_worker


class LocalCluster:
    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        *,
        processes: bool = True,
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        memory_limit: str | int = "auto",
        memory_target: float = 0.6,
        memory_spill: float = 0.7,
        memory_pause: float = 0.8,
        memory_terminate: float = 0.95,
        local_directory: str | None = None,
        resources: dict | None = None,
        timeout: float = 30.0,
        worker_names: list[str] | None = None,
        scheduler_options: dict | None = None,
        log_level: str = "warning",
        zero: bool = False,
        inline_tasks: bool = True,
    ):
        self.n_workers, self.threads_per_worker = default_sizing(n_workers, threads_per_worker, processes)
        self.processes = processes
        self.host = host
        self.timeout = timeout
        if memory_limit == "auto":
            self.memory_limit = psutil.virtual_memory().total // max(1, self.n_workers)
        else:
            self.memory_limit = parse_bytes(memory_limit)
        # Fractions of the limit: spill results, spill on process memory,
        # pause, restart (see shoal.worker.memory).
        self.memory_fractions = {
            "memory_target": memory_target,
            "memory_spill": memory_spill,
            "memory_pause": memory_pause,
            "memory_terminate": memory_terminate,
        }
        self.local_directory = local_directory
        self.inline_tasks = inline_tasks
        self.resources = dict(resources or {})
        self.worker_names = worker_names or [f"local-{i}" for i in range(self.n_workers)]
        if len(self.worker_names) != self.n_workers:
            raise ValueError("worker_names must name each worker")
        self.scheduler_options = scheduler_options or {}
        self.log_level = log_level
        self.zero = zero  # zero workers: tasks reported done without running
        self.scheduler_address = ""
        self.status = "starting"
        self._procs: list[subprocess.Popen] = []
        self._scheduler_proc: subprocess.Popen | None = None
        self._inproc = None
        if processes:
            self._start_processes(scheduler_port)
        else:
            self._start_in_process(scheduler_port)
        self.status = "running"
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- processes -------------------------------------------------------------------

    def _start_processes(self, port: int) -> None:
        fd, path = tempfile.mkstemp(prefix="shoal-scheduler-", suffix=".json")
        os.close(fd)
        os.unlink(path)
        args = ["scheduler", "--host", self.host, "--port", str(port), "--scheduler-file", path,
                "--log-level", self.log_level]
        for k, v in self.scheduler_options.items():
            flag = k.replace("_", "-")
            if isinstance(v, bool):  # on/off switches: --work-stealing / --no-work-stealing
                args.append(f"--{flag}" if v else f"--no-{flag}")
            else:
                args += [f"--{flag}", str(v)]
        self._scheduler_proc = spawn(args)
        deadline = time.monotonic() + self.timeout
        try:
            while True:  # poll for the file the scheduler writes once it listens
                if os.path.exists(path):
                    try:
                        with open(path) as f:
                            self.scheduler_address = json.load(f)["address"]
                        break
                    except (ValueError, KeyError):
                        pass  # written but not complete yet
                if self._scheduler_proc.poll() is not None:
                    raise RuntimeError(f"the scheduler process exited with code {self._scheduler_proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the scheduler did not start within {self.timeout}s")
                time.sleep(0.02)
        except BaseException:
            stop_processes([self._scheduler_proc])
            raise
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        res = ",".join(f"{k}={v}" for k, v in self.resources.items())
        for name in self.worker_names:
            args = [
                "worker",
                self.scheduler_address,
                "--nthreads",
                str(self.threads_per_worker),
                "--name",
                name,
                "--memory-limit",
                str(self.memory_limit),
                "--host",
                self.host,
                "--log-level",
                self.log_level,
            ]
            for option, value in self.memory_fractions.items():
                args += [f"--{option.replace('_', '-')}", str(value)]
            if self.local_directory:
                args += ["--local-directory", self.local_directory]
            if res:
                args += ["--resources", res]
            if self.zero:
                args.append("--zero")
            if not self.inline_tasks:
                args.append("--no-inline-tasks")
            self._procs.append(spawn(args))

    # -- threads ----------------------------------------------------------------------

    def _start_in_process(self, port: int) -> None:
        from ..client.loop import LoopThread
        from ..scheduler.server import Scheduler
        from ..worker.server import Worker

        self._inproc = LoopThread(name="shoal-local-cluster")

        async def start():
            sched = Scheduler(self.host, port, **self.scheduler_options)
            await sched.start()
            workers = []
            for name in self.worker_names:
                w = Worker(
                    sched.address,
                    nthreads=self.threads_per_worker,
                    name=name,
                    memory_limit=self.memory_limit,
                    resources=self.resources,
                    host=self.host,
                    zero=self.zero,
                    local_directory=self.local_directory,
                    inline_tasks=self.inline_tasks,
                    # The workers share this process: its memory is no
                    # measure of any one of them, so only results' sizes
                    # (the target fraction) drive spilling.
                    memory_monitor_interval=0,
                    **{k: v for k, v in self.memory_fractions.items() if k != "memory_terminate"},
                )
                await w.start()
                workers.append(w)
            return sched, workers

        self._scheduler, self._workers = self._inproc.run(start(), self.timeout)
        self.scheduler_address = self._scheduler.address

    # -- stopping -------------------------------------------------------------------------

    def worker_pids(self, timeout: float = 10.0) -> dict[str, int]:
        """``{worker name: pid}`` of the processes that run tasks (each is
        the child of its supervisor); waits for restarted ones to appear."""
        out: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        for name, nanny in zip(self.worker_names, self._procs):
            while True:
                try:
                    kids = psutil.Process(nanny.pid).children()
                except psutil.NoSuchProcess:
                    kids = []
                live = [k for k in kids if k.status() != psutil.STATUS_ZOMBIE]
                if live or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if live:
                out[name] = live[0].pid
        return out

    @property
    def processes_alive(self) -> list[int]:
        """Pids of every live process this cluster started, supervised workers included."""
        procs = self._procs + ([self._scheduler_proc] if self._scheduler_proc else [])
        pids = []
        for p in procs:
            if p.poll() is None:
                pids.append(p.pid)
                try:
                    pids += [c.pid for c in psutil.Process(p.pid).children(recursive=True)
                             if c.status() != psutil.STATUS_ZOMBIE]
                except psutil.NoSuchProcess:
                    pass
        return pids

    def close(self, timeout: float = 5.0) -> None:
        if self.status == "closed":
            return
        self.status = "closed"
        if self.processes:
            stop_processes(self._procs, timeout)
            if self._scheduler_proc is not None:
                stop_processes([self._scheduler_proc], timeout)
        elif self._inproc is not None:

            async def stop():
                for w in self._workers:
                    await w.close("cluster closing")
                await self._scheduler.close()

            try:
                self._inproc.run(stop(), timeout)
            finally:
                self._inproc.stop()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "processes" if self.processes else "threads"
        return (
            f"<LocalCluster {self.scheduler_address} {self.status}: {self.n_workers} workers "
            f"x {self.threads_per_worker} threads ({kind})>"
        )


def _close_at_exit(ref) -> None:
    c = ref()
    if c is not None:
        try:
            c.close(timeout=2)
        except Exception:
            pass
