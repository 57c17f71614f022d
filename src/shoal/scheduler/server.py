"""The scheduler's reactor: connections in, ``SchedulerState.handle`` once per
received batch, commands out grouped per destination."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import resource
import time
import uuid

import psutil

from ..comm import Comm, listen
from ..errors import ProtocolError
from ..protocol import messages as m
from .commands import Commands
from .events import ClientDisconnected, ClientJoined, ClientSent, Ticked, WorkerJoined, WorkerLeft, WorkerSent
from .state import SchedulerState

logger = logging.getLogger("shoal.scheduler")

_FROM_WORKER = frozenset(m.WORKER_TO_SCHEDULER)
# Tasks handled per slice of a client's backlog before yielding to the loop.
SLICE_TASKS = 4096
_FROM_CLIENT = frozenset(m.CLIENT_TO_SCHEDULER)


class Scheduler:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8786,
        *,
        tick_interval: float = 0.5,
        max_packet: int | None = None,
        **state_kwargs,
    ):
        self.host = host
        self.port = port
        self.id = uuid.uuid4().hex
        self.state = SchedulerState(**state_kwargs)
        self.tick_interval = tick_interval
        self.max_packet = max_packet
        self.address = ""
        self._listener = None
        self._worker_comms: dict[int, Comm] = {}
        self._client_comms: dict[str, Comm] = {}
        self._wids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._closed: asyncio.Event | None = None
        self.connections_refused = 0
        self._lag_max = 0.0

    async def start(self) -> "Scheduler":
        self._closed = asyncio.Event()
        kw = {"max_packet": self.max_packet} if self.max_packet else {}
        self._listener = await listen(f"tcp://{self.host}:{self.port}", self._on_connect, m.ToScheduler, **kw)
        self.address = self._listener.address
        for coro in (self._ticker(), self._watch_loop()):
            t = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(t)
        logger.info("scheduler at %s", self.address)
        return self

    async def finished(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        if self._closed is None or self._closed.is_set():
            return
        self._closed.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except BaseException:
                pass
        if self._listener is not None:
            await self._listener.close()
        for comm in list(self._worker_comms.values()):
            if not comm.closed:
                comm.send(m.CloseWorker("scheduler closing"))
                comm.close()
        for comm in list(self._client_comms.values()):
            comm.close()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            self._handle([Ticked(time.monotonic())])

    async def _watch_loop(self) -> None:
        """Measure event-loop stalls: how late a 10 ms sleep wakes up."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            lag = loop.time() - t - 0.01
            if lag > self._lag_max:
                self._lag_max = lag

    # -- connections ------------------------------------------------------------

    def _on_connect(self, comm: Comm) -> None:
        comm.handler = self._on_hello

    def _on_hello(self, comm: Comm, msgs: list) -> None:
        hello = msgs[0]
        if type(hello) is m.RegisterWorker:
            wid = next(self._wids)
            comm.info["wid"] = wid
            self._worker_comms[wid] = comm
            comm.on_closed = self._on_worker_closed
            comm.handler = self._on_worker_msgs
            self._handle(
                [
                    WorkerJoined(
                        wid,
                        hello.name,
                        hello.address,
                        hello.nthreads,
                        hello.memory_limit,
                        dict(hello.resources),
                        time.monotonic(),
                    )
                ]
            )
            logger.info("worker %s joined from %s (%d threads)", hello.name, hello.address, hello.nthreads)
        elif type(hello) is m.RegisterClient:
            cid = hello.client_id
            old = self._client_comms.pop(cid, None)
            if old is not None:
                # A client reconnecting before this side noticed its old
                # connection drop: the new connection replaces the old one.
                logger.info("client %s reconnected; dropping its previous connection", cid)
                old.abort()
            comm.info["cid"] = cid
            self._client_comms[cid] = comm
            comm.on_closed = self._on_client_closed
            comm.handler = self._on_client_msgs
            self._handle([ClientJoined(cid, hello.name)])
            comm.send(m.Welcome(self.id, [ws.address for ws in self.state.workers.values()]))
        else:
            self.connections_refused += 1
            raise ProtocolError(f"expected RegisterWorker or RegisterClient first, got {type(hello).__name__}")
        if len(msgs) > 1:
            comm.handler(comm, msgs[1:])

    def _on_worker_msgs(self, comm: Comm, msgs: list) -> None:
        for msg in msgs:
            if type(msg) not in _FROM_WORKER:
                raise ProtocolError(f"a worker may not send {type(msg).__name__}")
        if any(type(msg) is m.WorkerClosing for msg in msgs):
            # Read by _on_worker_closed: a clean stop is not a crash.
            comm.info["closing"] = True
            msgs = [msg for msg in msgs if type(msg) is not m.WorkerClosing]
            if not msgs:
                return
        self._handle([WorkerSent(comm.info["wid"], msgs, time.monotonic())])

    def _on_client_msgs(self, comm: Comm, msgs: list) -> None:
        for msg in msgs:
            if type(msg) not in _FROM_CLIENT:
                raise ProtocolError(f"a client may not send {type(msg).__name__}")
            if type(msg) in _KEYED:
                _check_keys(msg)
        backlog = comm.info.get("backlog")
        if backlog is None:
            backlog = comm.info["backlog"] = collections.deque()
        backlog.extend(msgs)
        if not comm.info.get("draining"):
            self._drain_client(comm)

    def _drain_client(self, comm: Comm) -> None:
        """Handle a client's messages in slices of about SLICE_TASKS tasks,
        returning to the event loop between slices: a huge graph never stalls
        heartbeats, workers or other clients for long."""
        backlog = comm.info["backlog"]
        budget = SLICE_TASKS
        batch: list = []
        while backlog and budget > 0:
            msg = backlog.popleft()
            if type(msg) is m.RequestInfo:
                comm.send(m.Info(msg.request_id, self.info(validate=msg.validate)))
                continue
            batch.append(msg)
            if type(msg) is m.SubmitGraph:
                budget -= len(msg.tasks)
        if batch and comm.info["cid"] in self._client_comms:
            self._handle([ClientSent(comm.info["cid"], batch)])
        if backlog and not comm.closed:
            comm.info["draining"] = True
            comm.pause_reading()
            asyncio.get_running_loop().call_soon(self._drain_client, comm)
        else:
            comm.info["draining"] = False
            comm.resume_reading()

    def info(self, validate: bool = False) -> dict:
        """State counts and wire/process counters, for clients and benchmarks;
        with ``validate``, also ``invariant_error``: "" when every invariant holds."""
        proc = psutil.Process()
        cpu = proc.cpu_times()
        mem = proc.memory_info()
        snap = self.state.snapshot()
        snap.update(
            {
                "id": self.id,
                "address": self.address,
                "pid": os.getpid(),
                "cpu_seconds": cpu.user + cpu.system,
                "rss": mem.rss,
                "peak_rss": _peak_rss(),
                "worker_bytes_sent": sum(c.bytes_sent for c in self._worker_comms.values()),
                "worker_bytes_received": sum(c.bytes_received for c in self._worker_comms.values()),
                "n_tasks": len(self.state.tasks),
                "worker_addresses": {ws.name: ws.address for ws in self.state.workers.values()},
                "connections_refused": self.connections_refused,
                "loop_lag_max": self._lag_max,
            }
        )
        self._lag_max = 0.0  # the longest stall since the previous info() call
        if validate:
            try:
                self.state.validate()
                snap["invariant_error"] = ""
            except AssertionError as e:
                snap["invariant_error"] = f"{type(e).__name__}: {e}"
        return snap

    def _on_worker_closed(self, comm: Comm, exc) -> None:
        wid = comm.info["wid"]
        if self._worker_comms.pop(wid, None) is None:
            return
        reason = f"connection lost: {exc}" if exc else "connection closed"
        expected = comm.info.get("closing", False)
        logger.info("worker %d left: %s", wid, reason)
        self._handle([WorkerLeft(wid, reason, expected)])

    def _on_client_closed(self, comm: Comm, exc) -> None:
        cid = comm.info["cid"]
        if self._client_comms.get(cid) is not comm:
            return  # replaced by a newer connection of the same client
        del self._client_comms[cid]
        # Not gone for good unless it said so (CloseClient): it may reconnect
        # within the grace period and carry on with its futures.
        self._handle([ClientDisconnected(cid, time.monotonic())])

    # -- the core call --------------------------------------------------------------

    def _handle(self, events: list) -> None:
        cmds: Commands = self.state.handle(events)
        for wid, msgs in cmds.to_workers.items():
            comm = self._worker_comms.get(wid)
            if comm is not None and not comm.closed:
                comm.send_many(msgs)
        for cid, msgs in cmds.to_clients.items():
            comm = self._client_comms.get(cid)
            if comm is not None and not comm.closed:
                comm.send_many(msgs)
        for wid, reason in cmds.close_workers:
            comm = self._worker_comms.pop(wid, None)
            if comm is not None:
                logger.warning("closing worker %d: %s", wid, reason)
                comm.abort()


# Client messages naming keys, and how deep a key (tuples in tuples) may nest.
_KEYED = frozenset({m.SubmitGraph, m.ReleaseKeys, m.CancelKeys, m.ResumeClient})
_MAX_KEY_DEPTH = 64


def _check_keys(msg) -> None:
    """Refuse (ProtocolError) a client message naming a key the core cannot
    use: an unhashable one (msgpack can carry a map or a payload where a key
    belongs) or one nested too deep to convert (``as_key`` recursion).

    Found by tests/integration/test_chaos.py: the core raised half-way
    through the batch, so the commands it had decided for earlier messages
    were lost (a task made ready never reached its worker: whoever wanted its
    key waited forever) and a release stopped half-done (data nobody needs
    kept).  Checked here, before any of the packet is handled, the whole
    packet is refused and the connection closed, as for any malformed packet."""
    try:
        if type(msg) is m.SubmitGraph:
            for spec in msg.tasks:
                if type(spec.key) is not str:
                    _check_key(spec.key, 0)
                for d in spec.deps:
                    if type(d) is not str:
                        _check_key(d, 0)
            keys = msg.wanted
        else:
            keys = msg.keys
        for k in keys:
            if type(k) is not str:
                _check_key(k, 0)
    except TypeError as e:
        raise ProtocolError(f"{type(msg).__name__} names a key that is not a key: {e}") from None


def _check_key(key, depth: int) -> None:
    if type(key) is not list:
        hash(key)  # TypeError for a map or a payload
        return
    if depth >= _MAX_KEY_DEPTH:
        raise ProtocolError(f"a key nested more than {_MAX_KEY_DEPTH} deep")
    for x in key:
        if type(x) is list:
            _check_key(x, depth + 1)
        else:
            hash(x)


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def run_scheduler(host: str = "127.0.0.1", port: int = 8786, *, on_started=None, **kwargs) -> None:
    s = Scheduler(host, port, **kwargs)
    await s.start()
    if on_started is not None:
        on_started(s)
    try:
        await s.finished()
    finally:
        await s.close()
