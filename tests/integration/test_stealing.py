"""Work stealing on a real cluster: a worker with free threads takes queued
tasks from a busy one, and nothing runs twice."""

from __future__ import annotations

import os
from pathlib import Path

from shoal.testing import wait_for

from ._helpers import SHORT, gate


def block(n):
    return list(range(n))


def gated_on(data, path, started, log):
    # One line per run: a task that ran twice would log twice.
    with open(log, "a") as f:
        f.write(f"{started} {os.getpid()}\n")
    return gate(path, started), len(data)


def test_an_idle_worker_takes_tasks_queued_behind_its_inputs(client, gates, tmp_path):
    # Every task reads an input held on local-0, so placement by locality
    # queues all of them there; local-1 has nothing to do but steal.
    data = client.submit(block, 1000, workers=["local-0"], pure=False)
    data.result(timeout=SHORT)
    log = tmp_path / "runs.log"
    blockers = [gates() for _ in range(4)]
    futs = [client.submit(gated_on, data, g, s, str(log), pure=False) for g, s in blockers]
    # Two of them start at once, each on its own worker, while every gate is shut.
    wait_for(lambda: sum(os.path.exists(s) for _, s in blockers) >= 2, SHORT, message="two gated tasks running at once")
    pids = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(pids) == 2, log.read_text()
    for g, _ in blockers:
        Path(g).touch()
    assert [f.result(timeout=SHORT) for f in futs] == [(g, 1000) for g, _ in blockers]
    runs = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(runs) == sorted(s for _, s in blockers), "a stolen task ran twice or not at all"
    assert client.scheduler_info(validate=True)["invariant_error"] == ""
