"""Running workloads on systems and collecting the measurements."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field

from .systems import SYSTEMS, Counters, ShoalSystem, Skip, SystemUnavailable
from .workloads import Workload, WrongResult


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Result:
    """One workload on one system."""

    workload: str
    system: str
    status: str = "ok"  # ok | skipped | error | wrong
    reason: str = ""
    n_tasks: int | None = None
    times: list = field(default_factory=list)
    cpu_seconds: float | None = None  # scheduler CPU over all repeats
    wire_bytes: int | None = None  # scheduler<->worker bytes over all repeats
    peak_rss: int | None = None
    notes: list = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and self.status == "ok" else None

    def per_task(self, total) -> float | None:
        runs = len(self.times)
        if total is None or not self.n_tasks or not runs or self.status != "ok":
            return None
        return total / (self.n_tasks * runs)

    @property
    def cpu_per_task(self) -> float | None:
        return self.per_task(self.cpu_seconds)

    @property
    def wire_per_task(self) -> float | None:
        return self.per_task(self.wire_bytes)

    @property
    def tasks_per_second(self) -> float | None:
        med = self.median
        return self.n_tasks / med if med and self.n_tasks else None

    def as_dict(self) -> dict:
        return {
            "workload": self.workload,
            "system": self.system,
            "status": self.status,
            "reason": self.reason,
            "tasks": self.n_tasks,
            "times_s": self.times,
            "median_s": self.median,
            "tasks_per_s": self.tasks_per_second,
            "scheduler_cpu_s": self.cpu_seconds,
            "scheduler_cpu_s_per_task": self.cpu_per_task,
            "wire_bytes": self.wire_bytes,
            "wire_bytes_per_task": self.wire_per_task,
            "scheduler_peak_rss": self.peak_rss,
            "notes": self.notes,
        }


class _Deadline(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float | None, what: str):
    """Raise TimeoutError in this (main) thread after ``seconds``; blocking
    waits on locks and events are interrupted by the signal."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds:g}s (--timeout)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def quiesce(system, timeout: float = 60.0) -> int:
    """Wait until the scheduler has forgotten every task (our futures are
    gone); returns how many it still holds at the timeout."""
    gc.collect()
    end = time.monotonic() + timeout
    delay = 0.005
    while True:
        n = system.n_tasks()
        if n == 0 or time.monotonic() > end:
            return n
        time.sleep(delay)
        delay = min(0.1, delay * 2)


def _delta(a, b):
    return None if a is None or b is None else b - a


def run_one(system, wl: Workload, prepared, repeat: int, timeout: float | None) -> Result:
    res = Result(wl.name, system.name, n_tasks=wl.n_tasks)
    c0: Counters = system.counters()
    try:
        for i in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            with deadline(timeout, f"{wl.name} on {system.name}"):
                value = wl.run(system, prepared)
                wl.check(value, prepared)
            res.times.append(time.perf_counter() - t0)
            del value
            left = quiesce(system)
            if left:
                res.notes.append(f"run {i + 1}: the scheduler still held {left} tasks 60 s after the futures were released")
    except Skip as e:
        res.status, res.reason = "skipped", str(e)
        res.times = []
        return res
    except WrongResult as e:
        res.status, res.reason = "wrong", f"WRONG RESULT: {e}"
        return res
    except Exception as e:
        res.status, res.reason = "error", f"{type(e).__name__}: {e}"
        res.notes.append(traceback.format_exc())
        try:
            quiesce(system, 10.0)
        except Exception:
            pass
        return res
    c1: Counters = system.counters()
    res.n_tasks = wl.n_tasks
    res.cpu_seconds = _delta(c0.cpu_seconds, c1.cpu_seconds)
    res.wire_bytes = _delta(c0.wire_bytes, c1.wire_bytes)
    res.peak_rss = c1.peak_rss
    return res


def start_system(name: str, n_workers: int, threads: int, *, zero: bool = False):
    t0 = time.perf_counter()
    if zero:
        system = ShoalSystem(n_workers, threads, zero=True)
        system.name = "shoal"
    else:
        system = SYSTEMS[name](n_workers, threads)
    log(f"[{name}{' (zero workers)' if zero else ''}] cluster of {n_workers} x {threads} started in "
        f"{time.perf_counter() - t0:.1f}s")
    return system


def run_workloads(workloads: list[Workload], systems: list[str], *, n_workers: int, threads: int, repeat: int,
                  timeout: float | None) -> tuple[list[Result], list[str]]:
    """Every workload on every system; each system's cluster is started once
    and reused for all its workloads (zero workloads get their own)."""
    results: list[Result] = []
    notes: list[str] = []
    prepared = {}
    for wl in workloads:
        t0 = time.perf_counter()
        try:
            prepared[wl.name] = wl.prepare()
        except Exception as e:
            prepared[wl.name] = e
            notes.append(f"{wl.name}: could not be prepared: {type(e).__name__}: {e}")
        if time.perf_counter() - t0 > 1:
            log(f"[prepare] {wl.name}: {time.perf_counter() - t0:.1f}s (before the clock)")

    groups = []  # (system name, zero?, workloads)
    for name in systems:
        normal = [w for w in workloads if w.kind != "zero" and w.applies_to(name)]
        zero = [w for w in workloads if w.kind == "zero" and w.applies_to(name)]
        if normal:
            groups.append((name, False, normal))
        if zero:
            groups.append((name, True, zero))
        for w in workloads:
            if not w.applies_to(name):
                results.append(Result(w.name, name, "skipped", f"{w.family.name}-N runs on {', '.join(w.family.systems)} only",
                                      n_tasks=w.n_tasks))

    for name, zero, wls in groups:
        try:
            system = start_system(name, n_workers, threads, zero=zero)
        except (SystemUnavailable, ImportError) as e:
            notes.append(f"{name}: not run: {e}")
            results.extend(Result(w.name, name, "skipped", f"{name} unavailable", n_tasks=w.n_tasks) for w in wls)
            continue
        try:
            modules = sorted({m for w in wls for m in w.modules})
            system.warm(modules)
            for wl in wls:
                prep = prepared[wl.name]
                if isinstance(prep, Exception):
                    results.append(Result(wl.name, name, "error", f"prepare failed: {prep}", n_tasks=wl.n_tasks))
                    continue
                res = run_one(system, wl, prep, repeat, timeout)
                results.append(res)
                if res.status == "ok":
                    ts = " ".join(f"{t:.3f}" for t in res.times)
                    log(f"[{name}] {wl.name}: {ts} s (median {res.median:.3f} s)")
                else:
                    log(f"[{name}] {wl.name}: {res.status}: {res.reason}")
                    for note in res.notes:
                        log(note.rstrip())
        finally:
            system.close()
    return results, notes


# -- memory: scheduler peak RSS per task -----------------------------------------------------


def _shoal_merge_graph(n: int):
    from shoal.spec import Task, TaskRef

    from .functions import inc, sum_all

    g = {f"inc-{i}": Task(f"inc-{i}", inc, i) for i in range(n)}
    g["total"] = Task("total", sum_all, [TaskRef(f"inc-{i}") for i in range(n)])
    return g


def _dask_merge_graph(n: int):
    from .functions import inc, sum_all

    try:
        from dask._task_spec import List, Task, TaskRef
    except ImportError:  # older dask: the tuple spec
        g = {f"inc-{i}": (inc, i) for i in range(n)}
        g["total"] = (sum_all, [f"inc-{i}" for i in range(n)])
        return g
    g = {f"inc-{i}": Task(f"inc-{i}", inc, i) for i in range(n)}
    g["total"] = Task("total", sum_all, List(*[TaskRef(f"inc-{i}") for i in range(n)]))
    return g


@dataclass
class MemoryResult:
    system: str
    size: int
    status: str = "ok"
    reason: str = ""
    seconds: float | None = None
    idle_rss: int | None = None
    peak_rss: int | None = None
    cpu_seconds: float | None = None
    wire_bytes: int | None = None

    def per_task(self, v):
        return None if v is None or self.status != "ok" else v / (self.size + 1)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tasks"] = self.size + 1
        d["peak_rss_per_task"] = self.per_task(self.peak_rss)
        d["growth_per_task"] = self.per_task(None if self.peak_rss is None else self.peak_rss - self.idle_rss)
        d["cpu_s_per_task"] = self.per_task(self.cpu_seconds)
        d["wire_bytes_per_task"] = self.per_task(self.wire_bytes)
        return d


def run_memory(sizes: list[int], systems: list[str], caps: dict, *, n_workers: int, threads: int,
               timeout: float | None) -> tuple[list[MemoryResult], list[str]]:
    """merge-N, graph built with submit_graph/spec.Task (dask: its Task spec
    and Client.get), on a fresh cluster per size so each peak is its own."""
    out: list[MemoryResult] = []
    notes: list[str] = []
    expected = {n: n * (n + 1) // 2 for n in sizes}
    for name in systems:
        if name not in ("shoal", "dask"):
            notes.append(f"{name}: the memory mode measures shoal and dask only")
            continue
        for n in sizes:
            cap = caps.get(name)
            if cap is not None and n > cap:
                out.append(MemoryResult(name, n, "skipped", f"above the {name} size cap {cap} (--cap {name}=N to change)"))
                continue
            r = MemoryResult(name, n)
            try:
                system = start_system(name, n_workers, threads)
            except (SystemUnavailable, ImportError) as e:
                r.status, r.reason = "skipped", str(e)
                out.append(r)
                continue
            try:
                system.warm()
                quiesce(system)
                gc.collect()
                c0 = system.counters()
                r.idle_rss = c0.rss
                t_build = time.perf_counter()
                graph = _shoal_merge_graph(n) if name == "shoal" else _dask_merge_graph(n)
                log(f"[{name}] rss merge-{n}: graph of {len(graph)} built in {time.perf_counter() - t_build:.1f}s")
                t0 = time.perf_counter()
                with deadline(timeout, f"rss merge-{n} on {name}"):
                    if name == "shoal":
                        (fut,) = system.client.submit_graph(graph, ["total"])
                        value = fut.result()
                    else:
                        with warnings.catch_warnings():  # "Sending large graph": that is the point
                            warnings.filterwarnings("ignore", message="Sending large graph")
                            value = system.client.get(graph, "total")
                    if value != expected[n]:
                        raise WrongResult(f"merge-{n}: got {value!r}, expected {expected[n]}")
                r.seconds = time.perf_counter() - t0
                del graph
                c1 = system.counters()
                r.peak_rss = c1.peak_rss
                r.cpu_seconds = _delta(c0.cpu_seconds, c1.cpu_seconds)
                r.wire_bytes = _delta(c0.wire_bytes, c1.wire_bytes)
                log(f"[{name}] rss merge-{n}: {r.seconds:.2f}s, scheduler peak RSS {r.peak_rss / 2**20:.1f} MiB")
            except WrongResult as e:
                r.status, r.reason = "wrong", f"WRONG RESULT: {e}"
            except Exception as e:
                r.status, r.reason = "error", f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            finally:
                graph = None  # noqa: F841  (drop the graph before the next size)
                system.close()
            out.append(r)
    return out, notes
