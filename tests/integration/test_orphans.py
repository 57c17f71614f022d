"""Nothing outlives its owner: clusters, and scripts that are killed or interrupted."""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import pytest

from shoal import Client, LocalCluster
from shoal.testing import wait_for

from ._helpers import (
    SHORT,
    STARTUP,
    alive_of,
    inc,
    kill_leftovers,
    my_children,
    popen_logged,
    read_json_when_ready,
    wait_gone,
)

# The script under test: starts Client() (its own LocalCluster), records the
# pids of everything it started, then blocks in the way the test asks for.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import psutil
    from shoal import Client

    mode, out = sys.argv[1], Path(sys.argv[2])

    def long_task(started):
        Path(started).touch()
        time.sleep(60)
        return 1

    if __name__ == "__main__":
        client = Client(n_workers=2, threads_per_worker=1, timeout=30)
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        pids = [p.pid for p in psutil.Process().children(recursive=True)]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pids": pids, "script": os.getpid()}))
        os.replace(tmp, out)
        if mode == "idle":
            time.sleep(120)
        elif mode == "result":
            fut = client.submit(long_task, str(out) + ".started")
            fut.result()
        sys.exit(3)  # never reached in the tests
    """
)


def run_script(tmp_path, mode):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "pids.json"
    log = tmp_path / "script.log"
    proc = popen_logged([sys.executable, str(script), mode, str(out)], log, cwd=tmp_path)
    try:
        info = read_json_when_ready(out, STARTUP + 15, proc, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert len(info["pids"]) == 5, f"expected a scheduler, 2 supervisors and 2 workers, got {info}"
    assert not set(info["pids"]) & {os.getpid(), proc.pid}
    return proc, info["pids"], out, log


def test_local_cluster_close_leaves_no_children():
    before = my_children()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, timeout=STARTUP)
    try:
        # scheduler + 2 supervisors + 2 workers (each supervisor starts its own)
        wait_for(lambda: len(my_children() - before) == 5, STARTUP, message="5 cluster processes")
        started = my_children() - before
        assert set(cluster.processes_alive) == started
        with Client(cluster, timeout=STARTUP) as client:
            assert client.submit(inc, 1).result(timeout=SHORT) == 2
    finally:
        cluster.close()
    # close() waits for its processes: nothing is left, not even a zombie.
    assert cluster.processes_alive == []
    assert alive_of(started) == []
    assert my_children() <= before
    assert cluster.status == "closed"
    cluster.close()  # idempotent


def test_client_without_address_starts_its_own_cluster_and_stops_it():
    before = my_children()
    client = Client(n_workers=2, threads_per_worker=1, timeout=STARTUP)
    try:
        started = my_children() - before
        assert len(started) == 5  # scheduler + 2 supervisors + 2 workers
        assert len(client.workers) == 2
        assert client.submit(sum, client.map(inc, range(10))).result(timeout=SHORT) == 55
    finally:
        client.close()
    assert client.status == "closed"
    wait_gone(started, SHORT, "the client's own cluster")
    assert my_children() <= before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_script_leaves_no_shoal_processes(tmp_path, sig):
    proc, pids, _, log = run_script(tmp_path, "idle")
    try:
        assert alive_of(pids) == pids
        proc.send_signal(sig)
        assert proc.wait(SHORT) == -sig
        # No atexit ran in the script: the children go because their parent died.
        wait_gone(pids, SHORT, f"the cluster of a script killed with {sig.name}")
    finally:
        kill_leftovers(pids)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_of_a_script_blocked_in_result_leaves_no_shoal_processes(tmp_path):
    proc, pids, out, log = run_script(tmp_path, "result")
    try:
        started = str(out) + ".started"
        wait_for(lambda: os.path.exists(started), SHORT, message="the script's long task to start")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(STARTUP)
        text = log.read_text(errors="replace")
        assert "KeyboardInterrupt" in text, text[-3000:]
        assert rc != 0
        wait_gone(pids, SHORT, "the cluster of an interrupted script")
    finally:
        kill_leftovers(pids)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_script_with_a_running_task_leaves_no_shoal_processes(tmp_path):
    proc, pids, out, log = run_script(tmp_path, "result")
    try:
        started = str(out) + ".started"
        wait_for(lambda: os.path.exists(started), SHORT, message="the script's long task to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SHORT) == -signal.SIGTERM
        wait_gone(pids, 10, "the cluster of a script killed while a task ran")
    finally:
        kill_leftovers(pids)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
