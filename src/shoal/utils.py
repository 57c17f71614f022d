"""Small helpers shared by the CLI, the client and cluster code."""

from __future__ import annotations

import contextlib
import gc
import re
import threading

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
}


def parse_bytes(text: str | int | float) -> int:
    """``"4GB"`` -> 4_000_000_000; ``"512MiB"``, ``"1.5 GB"`` and plain numbers work too."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a number of bytes (try '4GB' or '512MiB')")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_seconds(text: str | int | float) -> float:
    """``"30s"`` -> 30.0; ``"500ms"``, ``"2m"``, ``"1h"`` and plain numbers (seconds) work too."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SECONDS:
        raise ValueError(f"cannot read {text!r} as a duration (try '30s', '500ms' or '2m')")
    return float(match.group(1)) * _SECONDS[match.group(2).lower()]


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parse_resources(text: str | None) -> dict[str, float]:
    """``"GPU=2 MEM=10e9"`` or ``"GPU=2,MEM=10e9"`` -> ``{"GPU": 2.0, "MEM": 1e10}``."""
    out: dict[str, float] = {}
    if not text:
        return out
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"resource {part!r} is not NAME=AMOUNT")
        out[name] = float(value)
    return out


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection while building a large submission.

    Turning 100k calls into tasks allocates a few long-lived objects per
    task (futures, their states, specs); each gen-0 collection promotes them
    and the full collections that follow rescan them all -- half the
    client's CPU for a 100k-task ``map``.  The objects made here hold no
    cycles, so nothing is lost by collecting once afterwards instead.
    Nesting and threads are counted: the collector comes back on (if it was
    on) when the last caller leaves."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
