"""The task functions every system runs.

They live in an importable module (not ``__main__``) so that Shoal, dask and
Ray all ship them by reference: a worker imports this module once, nothing is
pickled by value per task, and every system runs exactly the same Python.
"""

from __future__ import annotations

import importlib


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def sum_all(xs):
    return sum(xs)


def sum_star(*xs):
    return sum(xs)


def is_even(x):
    return x % 2 == 0


def warm(modules=()):
    """The warm-up task: import the libraries the workloads will use (a
    worker's first pandas import takes seconds and would land in run 1)."""
    for name in modules:
        importlib.import_module(name)
    return len(modules)


def apply_lists(func, shape, *flat):
    """Ray passes only top-level ObjectRefs as values; a call whose argument
    is a list of refs is sent flattened and rebuilt here.  ``shape`` gives, per
    original argument, -1 (a plain value) or the length of the list."""
    args, i = [], 0
    for n in shape:
        if n < 0:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i : i + n]))
            i += n
    return func(*args)
