"""Helpers for tests of Shoal and of code built on it."""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["wait_for"]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.01, message: str | None = None) -> Any:
    """Poll ``predicate()`` until it returns something truthy, and return that.

    Raises :class:`TimeoutError` after ``timeout`` seconds, naming the
    predicate (or ``message``) and the last value it returned, so a failing
    test says what it was waiting for instead of hanging or sleeping blindly.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__qualname__", None) or repr(predicate)
            raise TimeoutError(f"{what} still false after {timeout}s (last value: {value!r})")
        time.sleep(interval)
