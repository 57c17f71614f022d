"""Futures: handles on remote results, shaped like ``concurrent.futures``.

A :class:`FutureState` exists once per key in a client and is updated by the
client's I/O thread; any number of :class:`Future` objects point at it.  The
client counts live ``Future`` objects per key and tells the scheduler to
release the data when the last one is garbage-collected.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import threading
import time
from collections import namedtuple
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import FutureLostError, TaskCancelledError

if TYPE_CHECKING:
    from .client import Client

PENDING = "pending"
FINISHED = "finished"
ERROR = "error"
CANCELLED = "cancelled"
LOST = "lost"
_DONE = (FINISHED, ERROR, CANCELLED, LOST)
# Guards the status/event handshake between the I/O thread and waiters.
_EVENT_LOCK = threading.Lock()


class FutureState:
    """Status of one key as this client knows it.  Written by the I/O thread."""

    __slots__ = ("key", "status", "id", "workers", "nbytes", "type_name", "exception", "traceback", "_event", "_watchers")

    def __init__(self, key: Any):
        self.key = key
        self.status = PENDING
        self.id = -1
        # Empty tuples until filled: a client may hold a million states.
        self.workers: list[str] | tuple = ()
        self.nbytes = 0
        self.type_name = ""
        self.exception: BaseException | None = None
        self.traceback = ""
        self._event: threading.Event | None = None  # made on first wait: most futures never block
        # Callables run (in the I/O thread) when the state becomes done.
        self._watchers: list[Callable[["FutureState"], None]] | tuple = ()

    def done(self) -> bool:
        return self.status in _DONE

    def _finish(self, status: str) -> None:
        with _EVENT_LOCK:
            self.status = status
            ev = self._event
        if ev is not None:
            ev.set()
        watchers, self._watchers = self._watchers, ()
        for w in watchers:
            try:
                w(self)
            except Exception:  # a watcher's bug must not stop the others
                import logging

                logging.getLogger("shoal.client").exception("error in future callback")

    def set_finished(self, tid: int, workers: list[str], nbytes: int, type_name: str) -> None:
        self.id = tid
        self.workers = workers  # the caller's own list
        self.nbytes = nbytes
        self.type_name = type_name
        self.exception = None
        self._finish(FINISHED)

    def set_error(self, exc: BaseException, tb: str = "") -> None:
        self.exception = exc
        self.traceback = tb
        self._finish(ERROR)

    def set_cancelled(self, reason: str = "cancelled") -> None:
        self.exception = TaskCancelledError(f"{self.key!r}: {reason}")
        self._finish(CANCELLED)

    def set_lost(self, reason: str) -> None:
        self.exception = FutureLostError(f"{self.key!r}: {reason}")
        self._finish(LOST)

    def reset(self) -> None:
        """Back to pending (data was lost and is being recomputed)."""
        with _EVENT_LOCK:
            self.status = PENDING
            self.workers = ()
            if self._event is not None:
                self._event.clear()

    def watch(self, fn: Callable[["FutureState"], None]) -> None:
        """Call ``fn(state)`` once done (now, if already done).  I/O thread only."""
        if self.done():
            fn(self)
        elif self._watchers:
            self._watchers.append(fn)
        else:
            self._watchers = [fn]

    def wait(self, timeout: float | None = None) -> bool:
        if self.status in _DONE:
            return True
        with _EVENT_LOCK:
            if self.status in _DONE:
                return True
            ev = self._event
            if ev is None:
                ev = self._event = threading.Event()
        return ev.wait(timeout)


def _with_remote_traceback(exc: BaseException, tb: str) -> BaseException:
    """The error to raise for a failed future: ``exc`` with the worker's
    traceback as a note, as a copy when it can be copied.

    The state keeps ``exc`` for as long as the key is known; raising that
    object itself would leave it holding the traceback of the raise, whose
    frames hold the Future -- which would then never be released."""
    if tb and hasattr(exc, "add_note") and not getattr(exc, "_shoal_noted", False):
        exc.add_note("Remote traceback (from the worker):\n" + tb.rstrip())
        try:
            exc._shoal_noted = True  # type: ignore[attr-defined]
        except Exception:
            pass
    try:
        fresh = copy.copy(exc)
    except Exception:
        return exc.with_traceback(None)
    if type(fresh) is not type(exc):
        return exc.with_traceback(None)
    fresh.__cause__, fresh.__context__ = exc.__cause__, exc.__context__
    return fresh.with_traceback(None)


class Future:
    """A remote result.  ``result()``, ``exception()``, ``done()``,
    ``cancel()``, ``add_done_callback()`` and ``await`` behave as in
    ``concurrent.futures`` / asyncio."""

    __slots__ = ("key", "client", "_state", "__weakref__")

    def __init__(self, key: Any, client: "Client", state: FutureState | None = None, *, submitted: bool = False):
        self.key = key
        self.client = client
        self._state = client._track(key, state, submitted)

    @classmethod
    def _tracked(cls, key: Any, client: "Client", state: FutureState) -> "Future":
        """A future whose key the client already counted (see ``Client._submitted_futures``)."""
        self = cls.__new__(cls)
        self.key = key
        self.client = client
        self._state = state
        return self

    # -- status ------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self._state.status

    def done(self) -> bool:
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == CANCELLED

    def _wait(self, timeout: float | None) -> None:
        if not self._state.wait(timeout):
            raise TimeoutError(f"future {self.key!r} not done after {timeout}s")

    # -- results -----------------------------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.client._result(self, deadline)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        st = self._state
        if st.status == FINISHED:
            return None
        return st.exception

    def traceback(self, timeout: float | None = None) -> str | None:
        """The remote traceback of a failed task, as text (None if it did not fail)."""
        self._wait(timeout)
        return self._state.traceback or None if self._state.status == ERROR else None

    def cancel(self, reason: str = "cancelled by the client") -> bool:
        if self.done():
            return False
        self.client._cancel([self.key], reason)
        return True

    def add_done_callback(self, fn: Callable[["Future"], Any]) -> None:
        """Call ``fn(future)`` when done, in a Shoal callback thread."""
        fut = self

        def watcher(_state: FutureState) -> None:
            fut.client._callbacks.submit(fn, fut)

        self.client._io.call_soon(self._state.watch, watcher)

    def __await__(self):
        return self._await().__await__()

    async def _await(self) -> Any:
        loop = asyncio.get_running_loop()
        if not self.done():
            waiter = loop.create_future()

            def wake(_state: FutureState) -> None:
                loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

            self.client._io.call_soon(self._state.watch, wake)
            await waiter
        return await self.client._result_async(self)

    # -- lifetime ----------------------------------------------------------------

    def release(self) -> None:
        """Drop this handle now instead of waiting for garbage collection."""
        if self.client is not None:
            self.client._untrack(self.key)
            self.client = None  # type: ignore[assignment]

    def __del__(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client._untrack(self.key)
            except Exception:
                pass

    def __reduce__(self):
        raise TypeError("shoal.Future cannot be pickled; pass it to submit() as an argument instead")

    # -- Dask integration (see shoal.integrations.dask) -----------------------------

    @property
    def __dask_future__(self) -> bool:
        """Tells Dask this is a reference to the data of ``key``: in a graph it
        becomes a dependency on that key, never a value."""
        return True

    def __dask_tokenize__(self):
        return ("shoal.Future", self.key)

    def __repr__(self) -> str:
        st = self._state
        extra = f", type: {st.type_name}" if st.status == FINISHED and st.type_name else ""
        if st.status == ERROR and st.exception is not None:
            extra = f", exception: {type(st.exception).__name__}"
        return f"<Future: {st.status}{extra}, key: {self.key!r}>"

    def __hash__(self) -> int:
        return hash(("shoal.Future", self.key))

    def __eq__(self, other) -> bool:
        return isinstance(other, Future) and other.key == self.key and other.client is self.client


# -- waiting on many ------------------------------------------------------------------

DoneAndNotDone = namedtuple("DoneAndNotDone", ["done", "not_done"])

FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"


def wait(fs: Iterable[Future], timeout: float | None = None, return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Wait for futures, like ``concurrent.futures.wait``; TimeoutError past ``timeout``
    when ``return_when`` is ALL_COMPLETED (as dask does), else return what is done."""
    fs = list(fs) if not isinstance(fs, Future) else [fs]
    if not fs:
        return DoneAndNotDone(set(), set())
    deadline = None if timeout is None else time.monotonic() + timeout
    if return_when == ALL_COMPLETED:
        for f in fs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not f._state.wait(left):
                raise TimeoutError(f"{sum(1 for x in fs if not x.done())} futures not done after {timeout}s")
        return DoneAndNotDone(set(fs), set())
    q: queue.SimpleQueue = queue.SimpleQueue()
    for f in fs:
        f.client._io.call_soon(f._state.watch, lambda st, f=f: q.put(f))
    while True:
        done = {f for f in fs if f.done()}
        if return_when == FIRST_COMPLETED and done:
            break
        if return_when == FIRST_EXCEPTION and (
            any(f.status in (ERROR, CANCELLED, LOST) for f in done) or len(done) == len(fs)
        ):
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            q.get(timeout=left)
        except queue.Empty:
            break
    done = {f for f in fs if f.done()}
    return DoneAndNotDone(done, set(fs) - done)


class as_completed:
    """Iterate over futures in the order they finish.

    ``with_results=True`` yields ``(future, result)`` pairs; ``add(f)`` adds
    more futures while iterating; ``async for`` works too.
    """

    def __init__(self, futures: Iterable[Future] = (), with_results: bool = False, raise_errors: bool = True, timeout: float | None = None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self.with_results = with_results
        self.raise_errors = raise_errors
        self.timeout = timeout
        for f in futures:
            self.add(f)

    def add(self, future: Future) -> None:
        with self._lock:
            self._pending += 1
        future.client._io.call_soon(future._state.watch, lambda st, f=future: self._queue.put(f))

    def update(self, futures: Iterable[Future]) -> None:
        for f in futures:
            self.add(f)

    def count(self) -> int:
        return self._pending

    def is_empty(self) -> bool:
        return self._pending == 0

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            if self._pending == 0:
                raise StopIteration
        try:
            f = self._queue.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no future finished within {self.timeout}s") from None
        with self._lock:
            self._pending -= 1
        if self.with_results:
            try:
                return f, f.result()
            except Exception:
                if self.raise_errors:
                    raise
                return f, f.exception()
        return f

    def __aiter__(self):
        return self

    async def __anext__(self):
        with self._lock:
            if self._pending == 0:
                raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        f = await loop.run_in_executor(None, self._queue.get)
        with self._lock:
            self._pending -= 1
        if self.with_results:
            return f, await f
        return f
