"""``shoal demo``: a local cluster running a map, a reduction tree and a
computation that moves data between workers, with timings."""

from __future__ import annotations

import operator
import time

import click


def inc(x: int) -> int:
    return x + 1


def make_block(i: int, n: int) -> list[int]:
    return list(range(i * n, (i + 1) * n))


def block_sum(block: list[int]) -> int:
    return sum(block)


def run_demo(n_workers: int | None, threads_per_worker: int) -> int:
    from . import Client, LocalCluster, as_completed

    t0 = time.perf_counter()
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker) as cluster:
        with Client(cluster) as client:
            click.echo(f"Started {cluster!r} in {time.perf_counter() - t0:.2f}s")
            client.submit(inc, 0).result()  # warm up

            t = time.perf_counter()
            futs = client.map(inc, range(1000))
            total = client.submit(sum, futs).result()
            expected = sum(range(1, 1001))
            _report("map: 1000 inc tasks + sum", total, expected, t)

            t = time.perf_counter()
            layer = client.map(inc, range(1024))
            while len(layer) > 1:
                layer = [client.submit(operator.add, a, b) for a, b in zip(layer[::2], layer[1::2])]
            total = layer[0].result()
            _report("tree: binary reduction of 1024 leaves (2047 tasks)", total, expected + sum(range(1001, 1025)), t)

            t = time.perf_counter()
            names = cluster.worker_names
            n = 200_000
            blocks = [client.submit(make_block, i, n, workers=[names[i % len(names)]]) for i in range(8)]
            # Each sum runs on a different worker than its block: data moves peer to peer.
            sums = [
                client.submit(block_sum, b, workers=[names[(i + 1) % len(names)]])
                for i, b in enumerate(blocks)
            ]
            done = [f.result() for f in as_completed(sums)]
            total = sum(done)
            moved = "between workers" if len(names) > 1 else "(one worker: nothing to move)"
            _report(f"transfer: 8 blocks of {n:,} ints moved {moved}", total, sum(range(8 * n)), t)

            try:
                client.submit(operator.truediv, 1, 0).result()
            except ZeroDivisionError as e:
                click.echo(f"errors: a failing task re-raised {type(e).__name__}: {e} on the client")
    click.echo(f"All done in {time.perf_counter() - t0:.2f}s; cluster stopped.")
    return 0


def _report(what: str, got, expected, t: float) -> None:
    status = "ok" if got == expected else f"WRONG (expected {expected})"
    click.echo(f"{what:<60} = {got:>16,}  {status}  {time.perf_counter() - t:.3f}s")
    if got != expected:
        raise SystemExit(1)
