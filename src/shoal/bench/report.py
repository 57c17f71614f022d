"""Plain-text tables of the results."""

from __future__ import annotations

from .runner import MemoryResult, Result

DASH = "-"


def _s(v) -> str:
    if v is None:
        return DASH
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _ratio(a, b) -> str:
    if a is None or b is None or not b:
        return DASH
    return f"{a / b:.1f}x" if a / b >= 10 else f"{a / b:.2f}x"


def _us(v) -> str:
    return DASH if v is None else f"{v * 1e6:.1f}"


def _int(v) -> str:
    return DASH if v is None else f"{v:,.0f}"


def _mib(v) -> str:
    return DASH if v is None else f"{v / 2**20:.1f}"


def table(rows: list[list[str]], header: list[str], left: int = 1) -> str:
    """Columns before ``left`` are left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for j, r in enumerate([header, *rows]):
        cells = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(res: Result | None) -> str:
    if res is None:
        return DASH
    if res.status == "ok":
        return _s(res.median)
    return {"skipped": "skip", "error": "ERROR", "wrong": "WRONG"}[res.status]


def run_table(workloads: list[str], systems: list[str], results: list[Result]) -> str:
    by = {(r.workload, r.system): r for r in results}
    others = [s for s in systems if s != "shoal"]
    header = ["workload", "tasks"]
    header += [f"{s} s" for s in systems]
    header += [f"{s}/shoal" for s in others] if "shoal" in systems else []
    header += ["shoal tasks/s"] if "shoal" in systems else []
    header += [f"{s} sched CPU us/task" for s in systems if s != "ray"]
    header += [f"{s} sched<->wkr B/task" for s in systems if s != "ray"]
    rows = []
    for w in workloads:
        rs = {s: by.get((w, s)) for s in systems}
        tasks = next((r.n_tasks for r in rs.values() if r is not None and r.n_tasks), None)
        row = [w, _int(tasks)]
        row += [_cell(rs[s]) for s in systems]
        if "shoal" in systems:
            base = rs["shoal"].median if rs["shoal"] is not None else None
            row += [_ratio(rs[s].median if rs[s] is not None else None, base) for s in others]
            row += [_int(rs["shoal"].tasks_per_second if rs["shoal"] is not None else None)]
        row += [_us(rs[s].cpu_per_task if rs[s] is not None else None) for s in systems if s != "ray"]
        row += [_int(rs[s].wire_per_task if rs[s] is not None else None) for s in systems if s != "ray"]
        rows.append(row)
    return table(rows, header)


def run_notes(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.status != "ok":
            out.append(f"{r.workload} on {r.system}: {r.status}: {r.reason}")
        else:
            out.extend(f"{r.workload} on {r.system}: {n}" for n in r.notes)
    return out


def memory_table(results: list[MemoryResult]) -> str:
    header = ["system", "tasks", "seconds", "tasks/s", "idle RSS MiB", "peak RSS MiB", "peak B/task",
              "(peak-idle) B/task", "sched CPU us/task", "sched<->wkr B/task"]
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([r.system, _int(r.size + 1), r.status] + [DASH] * (len(header) - 3))
            continue
        growth = None if r.peak_rss is None or r.idle_rss is None else r.peak_rss - r.idle_rss
        rows.append([
            r.system,
            _int(r.size + 1),
            _s(r.seconds),
            _int((r.size + 1) / r.seconds if r.seconds else None),
            _mib(r.idle_rss),
            _mib(r.peak_rss),
            _int(r.per_task(r.peak_rss)),
            _int(r.per_task(growth)),
            _us(r.per_task(r.cpu_seconds)),
            _int(r.per_task(r.wire_bytes)),
        ])
    return table(rows, header)
