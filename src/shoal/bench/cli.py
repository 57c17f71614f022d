"""``shoal bench`` / ``python -m benchmarks``: the command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

from . import report
from .runner import run_memory, run_workloads
from .systems import available_systems, versions
from .workloads import FAMILIES, parse

DESCRIPTION = """\
Shoal's benchmark runner (see BENCHMARKS.md).  Runs the public workloads on
Shoal and on dask.distributed (and Ray when installed) in one invocation, with
the same number of worker processes and threads, checks every result, and
prints per workload the median seconds, the ratio against Shoal, the
scheduler's CPU seconds per task and the scheduler<->worker bytes per task."""

EPILOG = """\
examples:
  %(prog)s list
  %(prog)s run merge-5000 tree-12 map-5000 chain-1000 --repeat 3
  %(prog)s run bag-200 numpy-4000 groupby-50 join-20 --systems shoal,dask
  %(prog)s run zero-100000 --systems shoal
  %(prog)s rss --sizes 10000,100000,1000000 --cap dask=100000
"""


def _default_prog() -> str:
    argv0 = sys.argv[0] if sys.argv else ""
    norm = argv0.replace(os.sep, "/")
    if norm.endswith("benchmarks/__main__.py"):
        return "python -m benchmarks"
    if norm.endswith("shoal/bench/__main__.py"):
        return "python -m shoal.bench"
    return "shoal bench"


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _sizes(s: str) -> list[int]:
    out = []
    for x in _csv(s):
        v = float(x.replace("_", "").lower().replace("k", "e3").replace("m", "e6"))
        if v != int(v) or v < 1:
            raise argparse.ArgumentTypeError(f"bad size {x!r}")
        out.append(int(v))
    return out


def _caps(s: str) -> dict:
    caps = {}
    for item in _csv(s):
        name, _, n = item.partition("=")
        if not n:
            raise argparse.ArgumentTypeError(f"--cap takes SYSTEM=N[,SYSTEM=N], got {item!r}")
        caps[name.strip()] = _sizes(n)[0]
    return caps


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--help-bench", action="help", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="{run,rss,list}")

    def common(sp, systems_default: str, timeout: float):
        sp.add_argument("--systems", default=systems_default,
                        help=f"comma-separated, from shoal,dask,ray (default: {systems_default})")
        sp.add_argument("--workers", type=int, default=2, help="worker processes per system (default: 2)")
        sp.add_argument("--threads", type=int, default=1, help="threads per worker process (default: 1)")
        sp.add_argument("--json", metavar="FILE", help="also write every measurement as JSON here")
        sp.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds allowed per timed run before it counts as an error (default: {timeout:g})")

    avail = ",".join(available_systems())
    r = sub.add_parser("run", help="run workloads on every system and compare",
                       description="Run WORKLOADs (see `list`) on each system; print the median seconds and ratios.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    r.add_argument("workloads", nargs="+", metavar="WORKLOAD", help="e.g. merge-5000 tree-12 map-5000 zero-100000")
    r.add_argument("--repeat", type=int, default=3, help="timed runs per workload and system; the median is reported")
    common(r, avail, 600)

    m = sub.add_parser("rss", help="scheduler peak RSS per task for merge-N graphs of several sizes",
                       description="Submit a merge-N graph (submit_graph + spec.Task; dask: its Task spec + "
                                   "Client.get) on a fresh cluster per size and report the scheduler's peak RSS "
                                   "per task.")
    m.add_argument("--sizes", type=_sizes, default=[10_000, 100_000, 1_000_000],
                   help="comma-separated N (default: 10000,100000,1000000; 10k and 1M also accepted)")
    m.add_argument("--cap", type=_caps, default={"dask": 100_000},
                   help="largest N per system, e.g. dask=100000 (default); dask's scheduler takes too long at 1M "
                        "for a few-minute run")
    common(m, ",".join(s for s in available_systems() if s in ("shoal", "dask")), 900)

    sub.add_parser("list", help="list the workloads and the systems installed here")
    sub.add_parser("help", help="show this help")
    return p


def _header(prog: str, argv: list[str], args) -> list[str]:
    v = versions()
    vs = ", ".join(f"{k} {v[k]}" for k in ("shoal", "dask", "distributed", "ray") if k in v)
    lines = [
        f"command: {prog} {shlex.join(argv)}",
        f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {vs}",
        f"cluster: {args.workers} worker process(es) x {args.threads} thread(s) per system, scheduler in its own "
        f"process; date {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    return lines


def _systems(args, parser) -> list[str]:
    systems = _csv(args.systems)
    bad = [s for s in systems if s not in ("shoal", "dask", "ray")]
    if bad:
        parser.error(f"unknown system(s) {bad}; choose from shoal, dask, ray")
    return list(dict.fromkeys(systems))


def _list() -> int:
    print("workloads (NAME-SIZE; sizes accept 10k / 1M):")
    rows = [[f.example, f.kind, ("" if f.systems is None else f"{'/'.join(f.systems)} only"), f.description]
            for f in FAMILIES.values()]
    print(report.table(rows, ["example", "kind", "systems", "what"], left=4))
    print()
    print("memory mode: rss --sizes 10000,100000,1000000  (merge-N graph, scheduler peak RSS per task)")
    print(f"systems installed here: {', '.join(available_systems())}")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark command line ``argv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or _default_prog()
    try:
        return _main(argv, prog)
    except SystemExit as e:  # --help, or a usage error from argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def _main(argv: list[str], prog: str) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.command in (None, "help"):
        parser.print_help()
        return 0 if args.command == "help" else 2
    if args.command == "list":
        return _list()
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be at least 1")
    systems = _systems(args, parser)

    if args.command == "run":
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
        try:
            workloads = [parse(w) for w in args.workloads]
        except ValueError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        names = list(dict.fromkeys(w.name for w in workloads))
        workloads = [next(w for w in workloads if w.name == n) for n in names]
        head = _header(prog, argv, args)
        head.append(f"method: median of {args.repeat} run(s); cluster warmed with one small task per worker; "
                    f"inputs/collections built before the clock; clock stops when the result is on the client "
                    f"and checked")
        results, notes = run_workloads(workloads, systems, n_workers=args.workers, threads=args.threads,
                                       repeat=args.repeat, timeout=args.timeout)
        print("\n".join(head))
        print()
        print(report.run_table(names, systems, results))
        notes = notes + report.run_notes(results)
        return _finish(prog, argv, args, head, results, notes)

    # rss
    head = _header(prog, argv, args)
    head.append("method: merge-N graph built before the clock; a fresh cluster per system and size; peak RSS is "
                "the scheduler process's high-water mark (ru_maxrss), idle RSS its RSS after warm-up")
    results, notes = run_memory(args.sizes, systems, args.cap, n_workers=args.workers, threads=args.threads,
                                timeout=args.timeout)
    print("\n".join(head))
    print()
    print(report.memory_table(results))
    notes = notes + [f"{r.system} merge-{r.size}: {r.status}: {r.reason}" for r in results if r.status != "ok"]
    return _finish(prog, argv, args, head, results, notes)


def _finish(prog, argv, args, head, results, notes) -> int:
    """Print the notes, write the JSON if asked; exit status 1 on any error or wrong result."""
    if notes:
        print()
        print("notes:")
        for n in notes:
            print(f"  {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": f"{prog} {shlex.join(argv)}", "header": head, "versions": versions(),
                       "results": [r.as_dict() for r in results], "notes": notes}, f, indent=1)
    return 1 if any(r.status in ("error", "wrong") for r in results) else 0
