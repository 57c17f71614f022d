"""An event loop in a daemon thread, so synchronous code (scripts, Jupyter,
code already inside an event loop) can drive async Shoal internals."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

from ..comm import install_uvloop


class LoopThread:
    def __init__(self, name: str = "shoal-io"):
        self._ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                loop.close()

    def submit(self, coro: Coroutine) -> "asyncio.Future[Any]":
        """Schedule ``coro`` on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and block this thread for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking call made from Shoal's own I/O thread (inside a callback?)")
        return self.submit(coro).result(timeout)

    def call_soon(self, fn, *args) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass  # closed between the check and the call

    @property
    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 5.0) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


__all__ = ["LoopThread", "install_uvloop"]
