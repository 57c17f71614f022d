"""``shoal scheduler | worker | demo``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

import click
import psutil

from .comm import install_uvloop
from .utils import parse_bytes, parse_resources, parse_seconds


def _tune_gc() -> None:
    """Servers hold many long-lived records; the default thresholds make the
    cyclic collector rescan them every few hundred allocations (a large share
    of scheduler time and the longest event-loop stalls).  Collect young
    objects less often and old ones rarely, and keep start-up objects out."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


async def _serve_until_signalled(start, stop) -> None:
    """Run ``await start()``, then wait for SIGINT/SIGTERM or ``stop`` to end."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopping.set)
        except (NotImplementedError, RuntimeError):
            pass
    server = await start()
    done = asyncio.ensure_future(server.finished())
    signalled = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([done, signalled], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    await stop(server)
    done.cancel()


@click.group()
@click.version_option(package_name="shoal")
def main() -> None:
    """Shoal: a fast distributed task scheduler for Python."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 for all).")
@click.option("--port", default=8786, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option("--scheduler-file", default=None, help="Write {'address': ...} as JSON here once listening.")
@click.option("--worker-ttl", default=60.0, show_default=True, type=float,
              help="Drop workers silent (no heartbeat) for this many seconds; 0 disables.")
@click.option("--client-grace", default="30s", show_default=True,
              help="Keep the data of a client whose connection dropped this long, so it can reconnect "
                   "and carry on (e.g. 30s, 2m; 0 releases it at once).")
@click.option("--work-stealing/--no-work-stealing", default=True, show_default=True,
              help="Let workers with free threads take tasks that busy workers have not started.")
@click.option("--log-level", default="info", show_default=True)
def scheduler(
    host: str,
    port: int,
    scheduler_file: str | None,
    worker_ttl: float | None,
    client_grace: str,
    work_stealing: bool,
    log_level: str,
) -> None:
    """Run the scheduler."""
    from .scheduler.server import Scheduler

    _setup_logging(log_level)
    try:
        grace = parse_seconds(client_grace)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--client-grace") from None
    install_uvloop()
    _tune_gc()

    async def start():
        s = Scheduler(host, port, worker_ttl=worker_ttl or None, client_grace=grace, work_stealing=work_stealing)
        await s.start()
        if scheduler_file:
            tmp = scheduler_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"address": s.address, "pid": os.getpid()}, f)
            os.replace(tmp, scheduler_file)
        logging.getLogger("shoal.scheduler").info("listening at %s", s.address)
        return s

    async def stop(s):
        await s.close()

    asyncio.run(_serve_until_signalled(start, stop))


@main.command()
@click.argument("scheduler_address")
@click.option("--nthreads", default=1, show_default=True, type=int, help="Threads per worker process.")
@click.option("--nworkers", default=1, show_default=True, type=int, help="Worker processes to start.")
@click.option("--name", default=None, help="Worker name (suffixed -0, -1, ... with --nworkers > 1).")
@click.option("--memory-limit", default="auto", show_default=True,
              help="Bytes per worker, e.g. 4GB; auto = memory / nworkers; 0 = no limit.")
@click.option("--memory-target", default=0.6, show_default=True, type=click.FloatRange(0, 1),
              help="Move results to disk once they take this fraction of the limit (0: never).")
@click.option("--memory-spill", default=0.7, show_default=True, type=click.FloatRange(0, 1),
              help="Move results to disk while the process uses this fraction of the limit (0: never).")
@click.option("--memory-pause", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Start no task and fetch nothing above this fraction of the limit (0: never).")
@click.option("--memory-terminate", default=0.95, show_default=True, type=click.FloatRange(0, 1),
              help="The supervisor restarts a worker above this fraction of the limit (0: never).")
@click.option("--local-directory", default=None, help="Where workers spill to disk (default: the system's temp dir).")
@click.option("--resources", default="", help='Abstract resources, e.g. "GPU=2 MEM=10e9".')
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface for the worker's data server.")
@click.option("--zero", is_flag=True, help="Report tasks finished without running them (measures runtime overhead).")
@click.option("--inline-tasks/--no-inline-tasks", default=True, show_default=True,
              help="Run functions proven to take microseconds on the event loop's thread, not a task thread.")
@click.option("--nanny/--no-nanny", default=True, show_default=True,
              help="Run each worker under a supervisor that restarts it after a crash.")
@click.option("--log-level", default="info", show_default=True)
def worker(
    scheduler_address: str,
    nthreads: int,
    nworkers: int,
    name: str | None,
    memory_limit: str,
    memory_target: float,
    memory_spill: float,
    memory_pause: float,
    memory_terminate: float,
    local_directory: str | None,
    resources: str,
    host: str,
    zero: bool,
    inline_tasks: bool,
    nanny: bool,
    log_level: str,
) -> None:
    """Run workers connected to SCHEDULER_ADDRESS."""
    _setup_logging(log_level)
    if memory_limit == "auto":
        limit = psutil.virtual_memory().total // max(1, nworkers)
    else:
        limit = parse_bytes(memory_limit)
    res = parse_resources(resources)
    memory = {
        "memory_target": memory_target,
        "memory_spill": memory_spill,
        "memory_pause": memory_pause,
        "memory_terminate": memory_terminate,
    }
    if nanny or nworkers > 1:
        sys.exit(
            _supervise(
                scheduler_address, nworkers, nthreads, name, limit, resources, host, log_level, zero,
                memory=memory, local_directory=local_directory, inline_tasks=inline_tasks,
            )
        )
    install_uvloop()
    _tune_gc()
    from .worker.server import Worker

    started: list = []

    async def start():
        w = Worker(
            scheduler_address,
            nthreads=nthreads,
            name=name,
            memory_limit=limit,
            resources=res,
            host=host,
            zero=zero,
            local_directory=local_directory,
            inline_tasks=inline_tasks,
            **memory,
        )
        await w.start()
        started.append(w)
        return w

    async def stop(w):
        await w.close("stopped by signal" if not w.close_reason else w.close_reason)

    from .worker.nanny import EXIT_CLOSED, EXIT_SCHEDULER_GONE, EXIT_START_FAILED

    try:
        asyncio.run(_serve_until_signalled(start, stop))
    except Exception as e:  # e.g. the scheduler is unreachable
        click.echo(f"shoal worker: {e}", err=True)
        logging.shutdown()
        os._exit(EXIT_START_FAILED)
    lost = bool(started) and started[0].close_reason.startswith("lost the scheduler")
    # A task still running in a thread must not keep a stopped worker alive.
    logging.shutdown()
    os._exit(EXIT_SCHEDULER_GONE if lost else EXIT_CLOSED)


def _supervise(
    address, n, nthreads, name, limit, resources, host, log_level, zero=False, *, memory: dict, local_directory=None,
    inline_tasks: bool = True,
) -> int:
    """Run ``n`` worker processes under a supervisor that restarts crashed ones
    (and those past the memory limit)."""
    from .worker.nanny import Supervisor

    base = name or f"{os.uname().nodename}-{os.getpid()}"
    arg_lists = []
    for i in range(n):
        wname = base if (n == 1 and name) else f"{base}-{i}"
        args = ["worker", address, "--no-nanny", "--nthreads", str(nthreads), "--name", wname,
                "--memory-limit", str(limit), "--host", host, "--log-level", log_level]
        for option, value in memory.items():
            args += [f"--{option.replace('_', '-')}", str(value)]
        if local_directory:
            args += ["--local-directory", local_directory]
        if resources:
            args += ["--resources", resources]
        if zero:
            args.append("--zero")
        if not inline_tasks:
            args.append("--no-inline-tasks")
        arg_lists.append(args)
    supervisor = Supervisor(
        arg_lists, memory_limit=limit, terminate=memory["memory_terminate"], local_directory=local_directory
    )
    return supervisor.run()


@main.command()
@click.option("--workers", "n_workers", default=None, type=int, help="Worker processes (default: one per core).")
@click.option("--threads", "threads_per_worker", default=1, show_default=True, type=int)
def demo(n_workers: int | None, threads_per_worker: int) -> None:
    """Start a local cluster and run a small real workload on it."""
    from .demo import run_demo

    sys.exit(run_demo(n_workers, threads_per_worker))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmarks against dask.distributed (see `shoal bench --help-bench`)."""
    from .bench import main as bench_main

    sys.exit(bench_main(ctx.args))


if __name__ == "__main__":  # pragma: no cover
    main()
