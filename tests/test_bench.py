"""The benchmark runner still runs (numbers are not checked here: benchmarks
report numbers, tests check behaviour)."""

from __future__ import annotations

import re

import pytest

from shoal.bench import main
from shoal.bench.workloads import WrongResult, parse


def _row(out: str, workload: str) -> list[str]:
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == [workload]]
    assert len(rows) == 1, f"expected one table row for {workload}:\n{out}"
    return rows[0]


def test_parse_workload_names():
    assert parse("merge-5000").n_tasks == 5001
    assert parse("tree-12").n_tasks == 8191
    assert parse("zero-100k").n == 100_000
    assert parse("merge-1M").n == 1_000_000
    with pytest.raises(ValueError, match="unknown workload"):
        parse("nope-3")
    wl = parse("merge-10")
    with pytest.raises(WrongResult):
        wl.check(54, None)
    wl.check(55, None)


def test_help_and_list(capsys):
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "merge-5000" in capsys.readouterr().out
    assert main(["run", "nope-3"]) == 2


@pytest.mark.timeout(60)
def test_run_shoal_only(capsys):
    code = main(["run", "merge-200", "map-200", "--systems", "shoal", "--repeat", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "command: shoal bench run merge-200 map-200 --systems shoal --repeat 1" in out
    for name, tasks in [("merge-200", "201"), ("map-200", "200")]:
        row = _row(out, name)
        assert row[1] == tasks
        assert float(row[2]) > 0  # shoal median seconds


@pytest.mark.timeout(60)
def test_run_zero_workers(capsys):
    code = main(["run", "zero-300", "--systems", "shoal", "--repeat", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    row = _row(out, "zero-300")
    assert row[1] == "301" and float(row[2]) > 0


@pytest.mark.timeout(90)
def test_run_shoal_and_dask(capsys):
    pytest.importorskip("distributed")
    code = main(["run", "merge-100", "--systems", "shoal,dask", "--repeat", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    row = _row(out, "merge-100")
    shoal_s, dask_s, ratio = float(row[2]), float(row[3]), row[4]
    assert shoal_s > 0 and dask_s > 0
    assert re.fullmatch(r"[0-9.]+x", ratio), row
