"""Running tasks in a thread pool and handing results back to the event loop.

Completions are collected in a list and delivered to the loop with one
``call_soon_threadsafe`` per burst, so a thousand tiny tasks cost the loop a
handful of wake-ups, not a thousand.

A task whose function has proven tiny runs on the event loop's own thread
instead: handing a 10 µs task to a thread and its result back costs about
80 µs of CPU (two cross-thread wake-ups and the GIL changing hands), which
made the worker, not the scheduler, the limit on fine-grained graphs.  A
function qualifies after ``INLINE_AFTER`` runs in the threads all took under
``INLINE_MAX``; one slower run anywhere sends it back to the threads for
good, so the loop is never held for long.
"""

from __future__ import annotations

import asyncio
import threading
import time
import queue
from typing import Any, Callable

from ..errors import SerializationError
from ..protocol.serialize import Payload, deserialize, serialize_exception, sizeof
from ..spec import Task

INLINE_AFTER = 5  # runs in the threads before a function may run inline
INLINE_MAX = 0.0005  # seconds: every run so far must have been faster


class Outcome:
    """What running one task produced (built in the worker thread)."""

    __slots__ = ("id", "ok", "value", "nbytes", "type_name", "duration", "exception", "traceback")

    def __init__(self, id: int):
        self.id = id
        self.ok = False
        self.value = None
        self.nbytes = 0
        self.type_name = ""
        self.duration = 0.0
        self.exception = None
        self.traceback = ""


class LazyFunction:
    """A shared function's payload, unpickled on first use in a task thread."""

    __slots__ = ("id", "payload", "_func", "_lock")

    def __init__(self, fid: int, payload: Payload | None):
        self.id = fid
        self.payload = payload
        self._func = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._func is None:
            with self._lock:
                if self._func is None:
                    if self.payload is None:
                        raise SerializationError(f"function #{self.id} was never sent to this worker")
                    self._func = deserialize(self.payload, what="a task's function")
        return self._func


def run_task(tid: int, key: Any, run_spec: Payload, data: dict, func: LazyFunction | None = None) -> Outcome:
    out = Outcome(tid)
    start = time.perf_counter()
    try:
        try:
            if func is None:
                node = deserialize(run_spec, what=f"task {key!r}")
            else:
                args, kwargs = deserialize(run_spec, what=f"the arguments of task {key!r}")
                node = Task(None, func.get(), *args, **kwargs)
        except SerializationError as e:
            raise SerializationError(
                f"{e} (is the function importable on the worker?)"
            ) from e.__cause__
        value = node(data)
        out.value = value
        out.nbytes = sizeof(value)
        out.type_name = type(value).__name__
        out.ok = True
    except BaseException as e:  # a task may raise anything, SystemExit included
        out.exception, out.traceback = serialize_exception(e)
    out.duration = time.perf_counter() - start
    return out


class Executor:
    """``nthreads`` persistent threads fed by a queue; results come back in batches.

    A ``SimpleQueue`` hand-off costs far less per task than
    ``ThreadPoolExecutor.submit`` (no Future, no per-task condition), which
    matters when tasks take microseconds.
    """

    def __init__(
        self, nthreads: int, on_done: Callable[[list[Outcome]], None], loop: asyncio.AbstractEventLoop, *, inline: bool = True
    ):
        self.inline = inline
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._on_done = on_done
        self._loop = loop
        self._lock = threading.Lock()
        self._done: list[Outcome] = []
        self._wake_pending = False
        # Shared function id -> [runs, slowest run in seconds] (see INLINE_*).
        self._speed: dict[int, list] = {}
        self.inline_runs = 0
        # Outcomes of tasks run inline, for the reactor to take right after
        # its ``submit`` calls (``take_inline``): the loop thread's alone.
        self.inline_done: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._work, name=f"shoal-task-{i}", daemon=True) for i in range(nthreads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, tid: int, key: Any, run_spec: Payload, data: dict, func: LazyFunction | None = None) -> None:
        """Run a task; called on the event loop's thread."""
        if func is not None and self.inline:
            speed = self._speed.get(func.id)
            if speed is not None and speed[0] >= INLINE_AFTER and speed[1] < INLINE_MAX:
                out = run_task(tid, key, run_spec, data, func)
                self.inline_runs += 1
                with self._lock:
                    self._record(func.id, out.duration)
                self.inline_done.append(out)  # the caller takes it when done handling
                return
        self._queue.put((tid, key, run_spec, data, func))

    def take_inline(self) -> list[Outcome]:
        done, self.inline_done = self.inline_done, []
        return done

    def forget(self, fid: int) -> None:
        """The function ``fid`` was released: drop what was learnt of it."""
        with self._lock:
            self._speed.pop(fid, None)

    def _record(self, fid: int, duration: float) -> None:
        speed = self._speed.get(fid)
        if speed is None:
            self._speed[fid] = [1, duration]
        else:
            speed[0] += 1
            if duration > speed[1]:
                speed[1] = duration

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            out = run_task(*item)
            func = item[4]
            del item
            with self._lock:
                if func is not None:
                    self._record(func.id, out.duration)
                self._done.append(out)
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                return  # loop closed: the worker is shutting down

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._wake_pending = False
        if done:
            self._on_done(done)

    def shutdown(self) -> None:
        # Queued tasks are dropped; running ones finish in their (daemon) threads.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)
