"""Benchmarks live in the installed package :mod:`shoal.bench`; this directory
makes ``python -m benchmarks ...`` work from the repository root.  See README.md."""

from shoal.bench import main

__all__ = ["main"]
