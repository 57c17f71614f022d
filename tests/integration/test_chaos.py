"""Chaos against real processes: workers SIGKILLed while a tree reduction
runs, and raw TCP garbage thrown at the live scheduler and at a worker's data
server while clients keep working.

After each scenario the scheduler's invariants are checked
(``scheduler_info(validate=True)``).  Nothing waits by sleeping a fixed time:
every wait is for a condition, with a timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import Client, LocalCluster
from shoal.protocol import messages as m
from shoal.protocol.framing import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PACKET, PacketReader, PacketWriter
from shoal.protocol.serialize import Payload
from shoal.spec import Task, TaskRef
from shoal.testing import wait_for

from ._helpers import SHORT, STARTUP, add, alive, assert_valid, inc, wait_gone


# -- workers killed twice during a tree reduction -----------------------------------------

DEPTH = 10  # 2**10 leaves, 2**11 - 1 tasks
LEAF_SECONDS = 0.008  # ~4 s of leaves on 2 workers: the kills land while it runs


def logged_leaf(log: str, i: int) -> int:
    """A leaf that takes a few ms and notes each run of itself in ``log``
    (one short O_APPEND write: lines from concurrent processes do not interleave)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    time.sleep(LEAF_SECONDS)  # bounded: the leaf's own work, not a wait in the test
    return leaf_value(i)


def leaf_value(i: int) -> int:
    return i * i + 7  # distinct per leaf: a lost, doubled or misplaced leaf changes the sum


def tree_graph(log: str, depth: int) -> tuple[dict, tuple]:
    """A binary ``add`` reduction over ``2**depth`` logged leaves; returns (graph, root key)."""
    layer = [("leaf", i) for i in range(2**depth)]
    graph: dict = {k: Task(k, logged_leaf, log, k[1]) for k in layer}
    for d in range(1, depth + 1):
        nxt = []
        for i in range(len(layer) // 2):
            k = ("add", d, i)
            graph[k] = Task(k, add, TaskRef(layer[2 * i]), TaskRef(layer[2 * i + 1]))
            nxt.append(k)
        layer = nxt
    return graph, layer[0]


def leaf_runs(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split()]


def test_tree_reduction_survives_two_worker_kills_mid_run(private_cluster, tmp_path):
    cluster = private_cluster
    log = tmp_path / "leaf-runs"
    n_leaves = 2**DEPTH
    with Client(cluster, timeout=STARTUP) as client:
        graph, root_key = tree_graph(str(log), DEPTH)
        [root] = client.submit_graph(graph, [root_key])
        kills: list[dict] = []

        def kill(name: str) -> None:
            pid = cluster.worker_pids(timeout=SHORT)[name]
            address = client.scheduler_info()["worker_addresses"][name]
            # Leaves not started yet at the moment of the kill mean the root
            # cannot have been computed: the kill lands mid-run.
            distinct_before = len(set(leaf_runs(log)))
            assert not root.done() and distinct_before < n_leaves, "the graph finished before the kill"
            os.kill(pid, signal.SIGKILL)
            kills.append(
                {"name": name, "pid": pid, "address": address, "distinct_leaves_run": distinct_before,
                 "root_done_after": root.done()}
            )

        # First kill: once the computation is well under way.
        wait_for(lambda: len(leaf_runs(log)) >= 100 or root.done(), STARTUP, message="100 leaves to have run")
        kill("local-0")

        # Second kill: once the supervisor has restarted local-0 (a new process,
        # registered with the scheduler under a new address, and given work)
        # and the graph has moved on, while it still runs; kill the other
        # worker, which by then holds most results.
        def restarted_and_working():
            if root.done():
                return True
            new_pid = cluster.worker_pids(timeout=0).get("local-0")
            info = client.scheduler_info()
            address = info["worker_addresses"].get("local-0")
            load = info["workers"].get("local-0", {})
            return (
                new_pid not in (None, kills[0]["pid"])
                and address not in (None, kills[0]["address"])
                and load.get("processing", 0) + load.get("stored", 0) > 0
                and len(set(leaf_runs(log))) >= 400
            )

        wait_for(restarted_and_working, STARTUP, message="local-0 to be restarted and 400 leaves to have run")
        assert not root.done(), "the graph finished before local-0 was restarted: make the leaves slower"
        kill("local-1")

        result = root.result(timeout=60)
        assert result == sum(leaf_value(i) for i in range(n_leaves))

        # The kills really happened, while the root was not ready.
        assert [k["name"] for k in kills] == ["local-0", "local-1"]
        assert not any(k["root_done_after"] for k in kills), kills
        assert all(k["distinct_leaves_run"] < n_leaves for k in kills), kills
        wait_gone([k["pid"] for k in kills], SHORT, "the killed workers")
        # Every leaf ran; work lost with the killed processes ran again.
        runs = leaf_runs(log)
        assert set(runs) == set(range(n_leaves))
        assert len(runs) > n_leaves, "no leaf ran twice: the kills lost nothing"

        # Both supervisors restarted their workers; the cluster is consistent and works.
        wait_for(lambda: len(client.workers) == 2, STARTUP, message="both killed workers to be restarted")
        new_pids = set(cluster.worker_pids().values())
        assert len(new_pids) == 2 and not new_pids & {k["pid"] for k in kills}
        assert_valid(client)
        assert client.submit(inc, 41, pure=False).result(timeout=SHORT) == 42
        del root
        wait_for(lambda: client.scheduler_info()["n_tasks"] == 0, SHORT, message="the graph to be forgotten")
        assert_valid(client)


# -- raw TCP garbage at the live scheduler and at a worker ----------------------------------
#
# Each example opens a raw connection to the real server, sends one attack,
# and then waits for the server to drop the connection (where the protocol
# says it must), or for its answer, or closes it itself, with a FIN or a
# reset.  After every example the test's client still computes; a second
# client computes in a thread the whole time.  An attack is
# ``(kind, bytes, must_close)``, must_close being True, False or ANSWER.

FUZZ_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def encode(msgs: list) -> bytes:
    return b"".join(bytes(f) for f in PacketWriter().encode(msgs))


def header(*lengths: int, count: int | None = None) -> bytes:
    n = len(lengths) if count is None else count
    return struct.pack("<I", n) + b"".join(struct.pack("<Q", x) for x in lengths)


RANDOM = "random bytes"
AFTER_HEADER = "random frame 0 after a valid header"
ABSURD = "absurd length prefix"
BIG = "huge but legal length, never sent"
HTTP = "HTTP request"
CUT = "valid packet cut short"
HELLO_GARBAGE = "handshake, then random bytes"
REFUSED = "well-formed, but not a handshake first"
FORBIDDEN = "handshake, then a message this peer may not send"
RANDOM_MSGS = "handshake, then random client messages"
NOT_A_KEY = "handshake, then a key that is not a key"

random_bytes = st.tuples(st.just(RANDOM), st.binary(min_size=1, max_size=512), st.just(False))
after_header = st.builds(
    # The frame's length as announced: exactly what follows, or more than is ever sent.
    lambda body, extra: (AFTER_HEADER, header(len(body) + extra) + body, False),
    st.binary(max_size=512),
    st.sampled_from([0, 0, 1, 100]),
)
absurd = st.builds(
    lambda prefix, tail: (ABSURD, prefix + tail, True),
    st.one_of(
        st.just(header(count=0)),  # no frames at all
        st.integers(DEFAULT_MAX_FRAMES + 1, 2**32 - 1).map(lambda n: struct.pack("<I", n)),
        st.integers(DEFAULT_MAX_PACKET + 1, 2**64 - 1).map(lambda n: header(n)),
        st.integers(DEFAULT_MAX_PACKET // 2 + 1, 2**63 - 1).map(lambda n: header(n, n)),
    ),
    st.binary(max_size=64),
)
# Legal but huge: the server waits for the rest, without reserving room for it.
big = st.builds(
    lambda n, tail: (BIG, header(n) + tail, False),
    st.integers(1 << 20, DEFAULT_MAX_PACKET),
    st.binary(max_size=64),
)
http = st.builds(
    lambda method, path: (HTTP, f"{method} /{path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), True),
    st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "CONNECT"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-", max_size=30),
)


def cut_short(packets: list[bytes]):
    return st.sampled_from(packets).flatmap(
        lambda data: st.integers(1, len(data) - 1).map(lambda cut: (CUT, data[:cut], False))
    )


def fixed(kind: str, packets: list[bytes], must_close: bool):
    return st.sampled_from(packets).map(lambda data: (kind, data, must_close))


def hello_then_garbage(hellos):
    return st.builds(lambda h, tail: (HELLO_GARBAGE, h + tail, False), hellos, st.binary(min_size=1, max_size=256))


def common_attacks(*specific):
    return st.one_of(random_bytes, after_header, absurd, big, http, *specific)


ANSWER = "answer"  # must_close: wait for the scheduler's Info, or for it to drop the connection


def send_attack(address: str, data: bytes, must_close: bool | str, abort: bool) -> None:
    """Send ``data`` on a new raw connection to ``address``; then, if
    ``must_close``, wait for the server to drop it (or, for ANSWER, to
    answer a RequestInfo or drop it), else close it from this side
    (``abort``: with a reset instead of a FIN)."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=SHORT)
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # dropped already, before all of it was sent
        if must_close == ANSWER:
            reader = PacketReader(m.ToClient)
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise AssertionError(f"the scheduler neither answered nor dropped {data[:80]!r}") from None
                if not chunk or any(type(msg) is m.Info for msg in reader.feed(chunk)):
                    break  # (a malformed answer raises ProtocolError here)
        elif must_close:
            while True:  # read (and discard any answer) until the server closes; recv is bounded
                try:
                    if not sock.recv(1 << 16):
                        break
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise AssertionError(f"the server kept the connection open after {data[:80]!r}") from None
        elif abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


class Busy:
    """A second client computing in a thread the whole time (a Client of its
    own: each is used from one thread only)."""

    def __init__(self, address: str):
        self.client = Client(address, timeout=STARTUP)
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy-client", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                n = self.rounds % 17 + 3
                futs = self.client.map(inc, range(n), pure=False)
                total = self.client.submit(sum, futs, pure=False)
                assert total.result(timeout=SHORT) == sum(range(1, n + 1))
                self.rounds += 1
        except BaseException as e:  # reported by the test thread
            self.errors.append(e)

    def __enter__(self) -> "Busy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(STARTUP)
        if self._thread.is_alive():
            self.errors.append(TimeoutError("the busy client's round did not finish"))
        self.client.close()


@pytest.fixture(scope="module")
def fuzzed_cluster():
    """A process cluster and a client of their own: the fuzzing counts refusals."""
    cl = LocalCluster(n_workers=2, threads_per_worker=1, timeout=STARTUP)
    try:
        with Client(cl, timeout=STARTUP) as client:
            yield cl, client
    finally:
        pids = set(cl.processes_alive)
        cl.close()
        wait_gone(pids, STARTUP, "the fuzzed cluster's processes")


# -- the scheduler

def register_client(u: uuid.UUID, *more) -> bytes:
    # Ids drawn per example, never a real client's (which would replace its connection).
    return encode([m.RegisterClient(f"fuzz-{u.hex}", "fuzz"), *more])


SCHEDULER_HELLOS = st.uuids().map(register_client)


def nested(depth: int):
    k: list = ["bottom"]
    for _ in range(depth):
        k = [k]
    return k


NOT_KEYS = {
    "map": {"a": 1},
    "map inside a tuple": ["t", {"b": 2}],
    "payload": Payload([b"x"]),
    "nested 600 deep": nested(600),
}


# Keys as msgpack can carry them: scalars, arrays (tuples), and maps (never keys).
any_keys = st.recursive(
    st.one_of(
        st.text(max_size=8), st.integers(-(2**63), 2**64 - 1), st.floats(), st.booleans(), st.none(),
        st.binary(max_size=8),
    ),
    lambda inner: st.one_of(  # a map now and then
        *[st.lists(inner, max_size=3)] * 4, st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=6,
)
# Mostly none: unknown inputs or wanted keys get the whole graph rejected.
few_keys = st.one_of(*[st.just([])] * 3, st.lists(any_keys, max_size=2))
random_specs = st.builds(
    # Garbage run specs: the tasks that get to run fail on their worker.
    lambda key, deps, spec, priority, retries, workers, resources: m.TaskSpec(
        key, deps, Payload([spec]), 0, priority, retries, workers, False, resources
    ),
    any_keys,
    few_keys,
    st.binary(max_size=32),
    st.integers(-(2**31), 2**31),
    st.integers(0, 3),
    st.none() | st.lists(st.sampled_from(["local-0", "local-1", "fuzz-nobody"]), max_size=2),
    st.none() | st.dictionaries(st.sampled_from(["GPU", "X"]), st.floats(), max_size=2),
)
random_client_msgs = st.one_of(
    st.builds(
        # Wanting its own tasks (so that they run), and maybe more.
        lambda specs, more: m.SubmitGraph(specs, [s.key for s in specs] + more),
        st.lists(random_specs, min_size=1, max_size=3),
        few_keys,
    ),
    st.builds(m.ReleaseKeys, st.lists(any_keys, max_size=3)),
    st.builds(m.CancelKeys, st.lists(any_keys, max_size=3)),
    st.builds(m.ResumeClient, st.lists(any_keys, max_size=3)),
    st.builds(m.RequestInfo, st.integers(0, 2**32), st.booleans()),
    st.builds(m.RetireWorkers, st.integers(0, 2**32), st.lists(st.just("fuzz-nobody"), max_size=2), st.booleans()),
    st.just(m.ClientHeartbeat()),
    st.just(m.CloseClient()),
)
random_session = st.builds(
    # Ends with a RequestInfo: the attack waits for its answer (or for the
    # connection to be dropped), so that the scheduler has handled the rest.
    lambda u, msgs: (RANDOM_MSGS, register_client(u, *msgs, m.RequestInfo(4242)), ANSWER),
    st.uuids(),
    st.lists(random_client_msgs, min_size=1, max_size=3),
)
# A valid message, then one naming a key that is not a key: refused whole.
not_a_key = st.builds(
    lambda u, bad, make: (
        NOT_A_KEY, register_client(u, m.SubmitGraph([], []), make(NOT_KEYS[bad])), True
    ),
    st.uuids(),
    st.sampled_from(sorted(NOT_KEYS)),
    st.sampled_from([
        lambda k: m.ReleaseKeys(["x", k]),
        lambda k: m.CancelKeys([k]),
        lambda k: m.ResumeClient([k]),
        lambda k: m.SubmitGraph([], [k]),
        lambda k: m.SubmitGraph([m.TaskSpec(k, [], Payload([b"x"]))], []),
        lambda k: m.SubmitGraph([m.TaskSpec("k", [k], Payload([b"x"]))], ["k"]),
    ]),
)
SCHEDULER_CUT = [
    register_client(uuid.UUID(int=1)),
    encode([m.RegisterWorker("fuzz-worker", "tcp://127.0.0.1:1", 1, 1 << 30, {"X": 1.0}, 1)]),
    register_client(uuid.UUID(int=2), m.SubmitGraph([], ["k"])),
]
# Well-formed packets whose first message is not a handshake: refused, and counted.
SCHEDULER_REFUSED = [
    encode(msgs)
    for msgs in (
        [m.ClientHeartbeat()],
        [m.RequestInfo(1, True)],
        [m.TaskFinished(1, 8)],
        [m.WorkerHeartbeat(1, 0, 0)],
        [m.ReleaseKeys(["x"]), m.RegisterClient("fuzz-late-hello")],
    )
]
# A client connection that sends a worker's messages is dropped (after its Welcome).
SCHEDULER_FORBIDDEN = [
    register_client(uuid.UUID(int=3), msg)
    for msg in (m.TaskFinished(1, 8), m.DataAcquired([1], [8]), m.WorkerClosing("fuzz"))
]
scheduler_attacks = common_attacks(
    cut_short(SCHEDULER_CUT),
    hello_then_garbage(SCHEDULER_HELLOS),
    fixed(REFUSED, SCHEDULER_REFUSED, True),
    fixed(FORBIDDEN, SCHEDULER_FORBIDDEN, True),
    random_session,
    not_a_key,
)


def test_live_scheduler_survives_garbage_connections(fuzzed_cluster):
    cluster, client = fuzzed_cluster
    before = client.scheduler_info()
    worker_pids = cluster.worker_pids()
    held = client.submit(sum, [1, 2, 3])  # data held across the whole fuzzing
    assert held.result(timeout=SHORT) == 6
    sent = {"connections": 0, REFUSED: 0}

    def one(attack, abort):
        kind, data, must_close = attack
        sent["connections"] += 1
        sent[kind] = sent.get(kind, 0) + 1
        send_attack(cluster.scheduler_address, data, must_close, abort)
        i = sent["connections"]
        assert client.submit(inc, i, pure=False).result(timeout=SHORT) == i + 1, kind

    with Busy(cluster.scheduler_address) as busy:
        FUZZ_SETTINGS(given(attack=scheduler_attacks, abort=st.booleans())(one))()
        # Every kind at least once, whatever was drawn.
        for kind, data, must_close in [
            (RANDOM, b"\x00\xff" * 7, False),
            (AFTER_HEADER, header(3) + b"\xc1\xc1\xc1", True),  # 0xc1: never valid msgpack
            (ABSURD, header(2**63), True),
            (BIG, header(DEFAULT_MAX_PACKET) + b"x", False),
            (HTTP, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", True),
            (CUT, SCHEDULER_CUT[0][:-3], False),
            (HELLO_GARBAGE, SCHEDULER_CUT[0] + b"\xff" * 16, True),
            *((REFUSED, data, True) for data in SCHEDULER_REFUSED),
            *((FORBIDDEN, data, True) for data in SCHEDULER_FORBIDDEN),
            (
                RANDOM_MSGS,
                register_client(
                    uuid.UUID(int=4), m.ReleaseKeys([0, ["t", 1.5]]), m.ResumeClient([None]), m.RequestInfo(1)
                ),
                ANSWER,
            ),
            *((NOT_A_KEY, register_client(uuid.UUID(int=5), m.ReleaseKeys([k])), True) for k in NOT_KEYS.values()),
        ]:
            one(attack=(kind, data, must_close), abort=False)
    assert not busy.errors, busy.errors
    assert busy.rounds > 0

    # The same scheduler process and the same workers, all still right.
    info = assert_valid(client)
    assert info["pid"] == before["pid"] and alive(before["pid"])
    assert cluster.worker_pids() == worker_pids
    assert held.result(timeout=SHORT) == 6
    assert client.gather(client.map(inc, range(100), pure=False)) == list(range(1, 101))
    # Each connection whose first message was well-formed but not a handshake
    # was refused and counted (garbage that does not decode is dropped, not counted).
    refused = info["connections_refused"] - before["connections_refused"]
    assert sent[REFUSED] >= len(SCHEDULER_REFUSED)
    assert sent[REFUSED] <= refused <= sent["connections"], (refused, sent)
    # Half-open connections announcing huge packets reserved no memory.
    assert info["rss"] - before["rss"] < 256 << 20, (before["rss"], info["rss"])


# -- a worker's data server

PEER_CUT = [
    encode([m.PeerHello("fuzz-peer")]),
    encode([m.PeerHello("fuzz-peer", 1, "tcp://127.0.0.1:1"), m.GetData(1, [0, 1, 2])]),
]
# A data connection must start with PeerHello and carry only GetData.
PEER_REFUSED = [
    encode(msgs)
    for msgs in (
        [m.GetData(1, [0])],
        [m.RegisterClient("fuzz-not-a-peer")],
        [m.CloseWorker("fuzz says so")],
        [m.PeerHello("fuzz-peer"), m.ReleaseData([0, 1, 2])],
        [m.PeerHello("fuzz-peer"), m.GetData(2, [0]), m.CloseWorker("fuzz says so")],
    )
]
worker_attacks = common_attacks(
    cut_short(PEER_CUT),
    hello_then_garbage(st.sampled_from(PEER_CUT[:1])),
    fixed(REFUSED, PEER_REFUSED, True),
)


def raw_get_data(address: str, request_id: int, ids: list[int]) -> list:
    """Ask a worker for data as a client would, over a raw socket."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    reader = PacketReader(m.ToClient)
    with socket.create_connection((host, int(port)), timeout=SHORT) as sock:
        sock.sendall(encode([m.PeerHello("fuzz-raw-client"), m.GetData(request_id, ids)]))
        msgs: list = []
        while not msgs:  # recv is bounded by the socket's timeout
            chunk = sock.recv(1 << 16)
            assert chunk, "the worker closed a well-formed data connection"
            msgs = reader.feed(chunk)
    return msgs


def test_live_worker_data_server_survives_garbage_connections(fuzzed_cluster):
    cluster, client = fuzzed_cluster
    target, other = "local-0", "local-1"
    address = client.scheduler_info()["worker_addresses"][target]
    worker_pids = cluster.worker_pids()
    # Held only by the fuzzed worker: the client fetches it from there after every example.
    held = client.submit(list, range(1000), workers=[target], pure=False)
    assert held.result(timeout=SHORT) == list(range(1000))
    sent = {"connections": 0}

    def one(attack, abort):
        kind, data, must_close = attack
        sent["connections"] += 1
        send_attack(address, data, must_close, abort)
        i = sent["connections"]
        assert held.result(timeout=SHORT) == list(range(1000)), kind
        # A new result on the fuzzed worker, read by the client and by the other
        # worker (a peer fetch from the fuzzed worker's data server).
        fresh = client.submit(inc, i, workers=[target], pure=False)
        moved = client.submit(inc, fresh, workers=[other], pure=False)
        assert (moved.result(timeout=SHORT), fresh.result(timeout=SHORT)) == (i + 2, i + 1), kind

    with Busy(cluster.scheduler_address) as busy:
        FUZZ_SETTINGS(given(attack=worker_attacks, abort=st.booleans())(one))()
        # Every kind at least once, whatever was drawn.
        for kind, data, must_close in [
            (RANDOM, b"\x00\xff" * 7, False),
            (AFTER_HEADER, header(3) + b"\xc1\xc1\xc1", True),
            (ABSURD, header(2**63), True),
            (BIG, header(DEFAULT_MAX_PACKET) + b"x", False),
            (HTTP, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", True),
            (CUT, PEER_CUT[1][:-2], False),
            (HELLO_GARBAGE, PEER_CUT[0] + b"\xff" * 16, True),
            *((REFUSED, data, True) for data in PEER_REFUSED),
        ]:
            one(attack=(kind, data, must_close), abort=False)
    assert not busy.errors, busy.errors
    assert busy.rounds > 0

    # A well-behaved raw client is still answered, and the worker was never
    # restarted: the same process, at the same address, still holding its data.
    [reply] = raw_get_data(address, 7, [999_999])
    assert type(reply) is m.DataResponse and reply.request_id == 7 and reply.missing == [999_999]
    assert cluster.worker_pids() == worker_pids
    assert client.scheduler_info()["worker_addresses"][target] == address
    assert held.result(timeout=SHORT) == list(range(1000))
    assert_valid(client)


# -- well-formed packets whose keys are not keys --------------------------------------------
#
# msgpack can carry a map (or a payload) where a key belongs, or a key nested
# hundreds deep; neither can be a key on the scheduler (unhashable, or too
# deep to convert).  Such a message must be refused as a whole, with nothing
# else from its packet half-done.


class RawClient:
    """A client speaking the protocol by hand over a raw socket."""

    def __init__(self, address: str, client_id: str):
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=SHORT)
        self.reader = PacketReader(m.ToClient)
        self.received: list = []
        self.send(m.RegisterClient(client_id, "raw"))

    def send(self, *msgs) -> None:
        self.sock.sendall(encode(list(msgs)))

    def receive_until(self, predicate) -> list:
        while not any(predicate(msg) for msg in self.received):  # recv is bounded by the timeout
            chunk = self.sock.recv(1 << 16)
            assert chunk, f"the scheduler closed the connection; received {self.received}"
            self.received += self.reader.feed(chunk)
        return self.received

    def assert_dropped(self) -> None:
        """The scheduler closes this connection (whatever it sent first)."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError("the scheduler kept a connection that sent a malformed message") from None

    def close(self) -> None:
        self.sock.close()


def task_spec(key, func, *args, deps=()) -> m.TaskSpec:
    from shoal.client.tasks import run_spec

    # The pickled spec names a plain key: only the message's key may be bad.
    return m.TaskSpec(key, list(deps), run_spec(Task(key if type(key) is str else "bad-key", func, *args)))


@pytest.mark.parametrize("bad", list(NOT_KEYS), ids=list(NOT_KEYS))
def test_a_key_that_is_not_a_key_refuses_its_whole_packet(private_cluster, bad):
    cluster = private_cluster
    poison = NOT_KEYS[bad]
    with Client(cluster, timeout=STARTUP) as client:
        x = client.submit(add, 1, 2, key="real-x")
        assert x.result(timeout=SHORT) == 3

        # 1. A task made ready by the first message of a packet, poison in the
        # second: the packet is refused whole.  Had the task been accepted with
        # its Execute lost, the real client asking for the same key would wait forever.
        raw = RawClient(cluster.scheduler_address, f"raw-{uuid.uuid4().hex}")
        try:
            raw.send(
                m.SubmitGraph([task_spec("shared-key", add, TaskRef("real-x"), 10, deps=["real-x"])], ["shared-key"]),
                m.ReleaseKeys([poison]),
            )
            raw.assert_dropped()
        finally:
            raw.close()
        same = client.submit(add, x, 10, key="shared-key")
        assert same.result(timeout=SHORT) == 13
        assert_valid(client)

        # 2. A release (or cancel, or resume) naming a held key, then poison:
        # the key stays held, not half-released ("data kept that nobody needs").
        for i, make in enumerate((m.ReleaseKeys, m.CancelKeys, m.ResumeClient)):
            key = f"raw-held-{i}"
            raw = RawClient(cluster.scheduler_address, f"raw-{uuid.uuid4().hex}")
            try:
                raw.send(m.SubmitGraph([task_spec(key, add, 20, i)], [key]))
                raw.receive_until(lambda msg: type(msg) is m.KeysInMemory and key in msg.keys)
                raw.send(make([key, poison]))
                raw.assert_dropped()
            finally:
                raw.close()
            assert_valid(client)

        # 3. Poison in each key-carrying message, alone in its packet, after a handshake.
        for msg in (
            m.SubmitGraph([task_spec(poison, add, 1, 1)], []),
            m.SubmitGraph([task_spec("k", add, 1, 1, deps=[poison])], ["k"]),
            m.SubmitGraph([], [poison]),
            m.ReleaseKeys([poison]),
            m.CancelKeys(["real-x", poison]),
            m.ResumeClient(["real-x", poison]),
        ):
            raw = RawClient(cluster.scheduler_address, f"raw-{uuid.uuid4().hex}")
            try:
                raw.send(msg)
                raw.assert_dropped()
            finally:
                raw.close()
        assert_valid(client)
        assert x.result(timeout=SHORT) == 3
        assert client.submit(inc, 41, pure=False).result(timeout=SHORT) == 42
