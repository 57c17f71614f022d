"""The systems under test, behind one small interface.

Each system starts its own cluster once per invocation: a scheduler process
and ``n_workers`` worker processes of ``threads`` threads each, all on this
machine, none of them sharing a process with the benchmark driver (the
client).  That is how Shoal's ``LocalCluster`` is laid out, and dask is started
the same way (``dask scheduler`` + ``dask worker --no-nanny`` processes) so
that its scheduler does not share a GIL with the client and its CPU time and
memory can be read from its own process.

A system offers

* ``client`` -- an object with ``submit``/``map``/``gather`` (Shoal's and
  dask's clients as they are; a shim for Ray), used by the futures workloads;
* ``dask_get()`` -- a Dask scheduler function for the collection workloads,
  or the reason there is none;
* ``counters()`` -- the scheduler process's CPU seconds, RSS, peak RSS, and
  bytes on the scheduler<->worker connections (None where unknown);
* ``warm(modules)``, ``quiesce()``, ``close()``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

from ..cluster.local import _die_with_parent, stop_processes
from .functions import apply_lists, warm as warm_task


@dataclass
class Counters:
    cpu_seconds: float | None = None
    bytes_sent: int | None = None  # scheduler -> workers
    bytes_received: int | None = None  # workers -> scheduler
    rss: int | None = None
    peak_rss: int | None = None
    n_tasks: int | None = None

    @property
    def wire_bytes(self) -> int | None:
        if self.bytes_sent is None or self.bytes_received is None:
            return None
        return self.bytes_sent + self.bytes_received


class SystemUnavailable(Exception):
    """The system cannot be started here (not installed, failed to start)."""


class Skip(Exception):
    """This workload does not apply to this system (the reason is the message)."""


def available_systems() -> list[str]:
    """Systems installed here; found without importing them (importing dask
    and distributed into the driver would grow the heap Shoal's client runs in)."""
    return ["shoal"] + [name for name, mod in (("dask", "distributed"), ("ray", "ray")) if _installed(mod)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> dict:
    out = {}
    for dist in ("shoal", "dask", "distributed", "ray", "numpy", "pandas"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# -- Shoal ----------------------------------------------------------------------------------


class ShoalSystem:
    name = "shoal"

    def __init__(self, n_workers: int, threads: int, *, zero: bool = False):
        from shoal import Client, LocalCluster

        self.n_workers, self.threads, self.zero = n_workers, threads, zero
        self.cluster = LocalCluster(n_workers, threads, zero=zero)
        try:
            self.client = Client(self.cluster, set_as_default=False)
        except BaseException:
            self.cluster.close()
            raise
        self.scheduler_pid = self.client.scheduler_info().get("pid")

    def warm(self, modules=()) -> None:
        """One small task per worker (pinned), importing ``modules`` there."""
        addrs = list(self.client.scheduler_info()["worker_addresses"].values())
        futs = [self.client.submit(warm_task, tuple(modules), workers=[a], pure=False) for a in addrs]
        self.client.gather(futs)
        del futs

    def dask_get(self):
        try:
            from shoal.integrations import dask as shoal_dask
        except ImportError as e:
            return None, f"shoal.integrations.dask cannot be imported ({e})"
        if not callable(getattr(shoal_dask, "get", None)):
            return None, "shoal.integrations.dask.get() is not written yet"
        return self.client.get, None

    def counters(self) -> Counters:
        info = self.client.scheduler_info()
        rss, peak = info.get("rss"), info.get("peak_rss")
        if rss is not None and peak is not None:
            peak = max(rss, peak)  # ru_maxrss lags /proc's RSS by a page or two
        return Counters(
            info.get("cpu_seconds"),
            info.get("worker_bytes_sent"),
            info.get("worker_bytes_received"),
            rss,
            peak,
            info.get("n_tasks"),
        )

    def n_tasks(self) -> int:
        return self.client.scheduler_info().get("n_tasks", 0)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.close()


# -- dask.distributed --------------------------------------------------------------------------


def _spawn(args: list[str], log) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Quiet, and no dashboard (bokeh may be missing); otherwise dask's defaults.
    env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


# These run inside dask's scheduler and workers (via run_on_scheduler / run),
# which import this module by name.


def _dask_scheduler_counters(dask_scheduler=None) -> dict:
    sent = sum(getattr(bs, "byte_count", 0) for bs in dask_scheduler.stream_comms.values())
    return {
        "bytes_sent": sent,
        "n_tasks": len(dask_scheduler.tasks),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _dask_worker_sent(dask_worker=None) -> int:
    bs = getattr(dask_worker, "batched_stream", None)
    return getattr(bs, "byte_count", 0) if bs is not None else 0


def _dask_n_tasks(dask_scheduler=None) -> int:
    return len(dask_scheduler.tasks)


class DaskSystem:
    name = "dask"

    def __init__(self, n_workers: int, threads: int, *, timeout: float = 60.0):
        try:
            import distributed
        except ImportError as e:
            raise SystemUnavailable(f"dask.distributed is not installed ({e}); pip install 'shoal[bench]'") from None
        self.n_workers, self.threads = n_workers, threads
        self._dir = tempfile.mkdtemp(prefix="shoal-bench-dask-")
        self._log_path = os.path.join(self._dir, "dask.log")
        self._log = open(self._log_path, "wb")
        self._procs: list[subprocess.Popen] = []
        path = os.path.join(self._dir, "scheduler.json")
        try:
            sched = _spawn(
                ["-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                 "--no-dashboard", "--scheduler-file", path],
                self._log,
            )
            self._procs.append(sched)
            self.scheduler_pid = sched.pid
            address = self._wait_for_file(path, sched, timeout)
            limit = psutil.virtual_memory().total // max(1, n_workers)
            for i in range(n_workers):
                self._procs.append(
                    _spawn(
                        ["-m", "distributed.cli.dask_worker", address, "--nthreads", str(threads), "--no-nanny",
                         "--no-dashboard", "--memory-limit", str(limit), "--name", f"bench-{i}"],
                        self._log,
                    )
                )
            self.client = distributed.Client(address, set_as_default=False, timeout=timeout)
            self.client.wait_for_workers(n_workers, timeout=timeout)
        except BaseException as e:
            self.close()
            if isinstance(e, Exception):
                raise SystemUnavailable(f"dask cluster failed to start: {e}\n{self._log_tail()}") from e
            raise

    def _wait_for_file(self, path: str, proc: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if os.path.exists(path):
                try:
                    with open(path) as f:
                        return json.load(f)["address"]
                except (ValueError, KeyError):
                    pass
            if proc.poll() is not None:
                raise RuntimeError(f"dask scheduler exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dask scheduler did not start within {timeout}s")
            time.sleep(0.05)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def warm(self, modules=()) -> None:
        addrs = list(self.client.scheduler_info()["workers"])
        futs = [self.client.submit(warm_task, tuple(modules), workers=[a], pure=False) for a in addrs]
        self.client.gather(futs)
        del futs

    def dask_get(self):
        return self.client.get, None

    def counters(self) -> Counters:
        proc = psutil.Process(self.scheduler_pid)
        cpu = proc.cpu_times()
        rss = proc.memory_info().rss
        s = self.client.run_on_scheduler(_dask_scheduler_counters)
        received = sum(self.client.run(_dask_worker_sent).values())
        return Counters(cpu.user + cpu.system, s["bytes_sent"], received, rss, max(rss, s["peak_rss"]), s["n_tasks"])

    def n_tasks(self) -> int:
        return self.client.run_on_scheduler(_dask_n_tasks)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client.close(timeout=10)
            except Exception:
                pass
        stop_processes(self._procs)
        try:
            self._log.close()
        except Exception:
            pass


# -- Ray (used only where it is installed) ------------------------------------------------------


class _RayClient:
    """``submit``/``map``/``gather`` over ``ray.remote`` for the futures workloads.

    Ray resolves only top-level ObjectRef arguments, so an argument that is a
    list is flattened into the call and rebuilt on the worker (apply_lists)."""

    def __init__(self, ray):
        self._ray = ray
        self._remote: dict = {}
        self._apply = ray.remote(apply_lists)

    def _fn(self, func):
        r = self._remote.get(func)
        if r is None:
            r = self._remote[func] = self._ray.remote(func)
        return r

    def submit(self, func, *args, pure=False, workers=None, **kwargs):
        if any(type(a) in (list, tuple) for a in args):
            shape, flat = [], []
            for a in args:
                if type(a) in (list, tuple):
                    shape.append(len(a))
                    flat.extend(a)
                else:
                    shape.append(-1)
                    flat.append(a)
            return self._apply.remote(func, shape, *flat)
        return self._fn(func).remote(*args, **kwargs)

    def map(self, func, *iterables, pure=False, **kwargs):
        f = self._fn(func)
        return [f.remote(*args) for args in zip(*iterables)]

    def gather(self, refs):
        return self._ray.get(refs)


class RaySystem:
    name = "ray"

    def __init__(self, n_workers: int, threads: int):
        try:
            import ray
        except ImportError as e:
            raise SystemUnavailable(f"ray is not installed ({e})") from None
        self.n_workers, self.threads = n_workers, threads
        self._ray = ray
        # Ray has no worker/thread split: one worker process per CPU slot.
        ray.init(num_cpus=n_workers * threads, include_dashboard=False, ignore_reinit_error=True,
                 logging_level="warning")
        self.client = _RayClient(ray)
        self.scheduler_pid = None

    def warm(self, modules=()) -> None:
        n = self.n_workers * self.threads
        self.client.gather([self.client.submit(warm_task, tuple(modules)) for _ in range(n)])

    def dask_get(self):
        try:
            from ray.util.dask import ray_dask_get
        except ImportError as e:
            return None, f"ray.util.dask unavailable ({e})"
        return ray_dask_get, None

    def counters(self) -> Counters:
        return Counters()

    def n_tasks(self) -> int:
        return 0

    def close(self) -> None:
        self._ray.shutdown()


SYSTEMS = {"shoal": ShoalSystem, "dask": DaskSystem, "ray": RaySystem}
