"""Shoal's benchmark runner: the public workloads of BENCHMARKS.md, run side by
side on Shoal and dask.distributed (and Ray when installed).

``shoal bench run merge-5000 tree-12 --repeat 3``, ``python -m benchmarks ...``
(from the repository root) and ``python -m shoal.bench ...`` are the same
command; ``main(argv)`` is its entry point and returns the exit status.
The comparison systems come with the ``bench`` extra: ``pip install 'shoal[bench]'``.
"""

from .cli import main

__all__ = ["main"]
