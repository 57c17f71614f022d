"""Every message on the wire, as typed ``msgspec`` structs.

Messages are array-like tagged structs: on the wire a message is
``[tag, field1, field2, ...]`` with a small integer tag, so the structure
costs a few bytes.  New fields go at the end with a default so that older
peers keep decoding.  Tasks are named by integer ids between scheduler and
workers; keys (any hashable the user chose) appear only where a client is
involved or when a worker first hears of a task.

Each receiving endpoint has one union (``ToScheduler``, ``ToWorker``,
``ToClient``); the reactor checks that the sender's role may send what it sent.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec

from .serialize import Payload

Key = Any  # str, int, float, or (nested) tuples thereof; see ``as_key``


def as_key(obj: Any) -> Any:
    """Undo msgpack's tuple -> list conversion on a decoded key."""
    if type(obj) is list:
        return tuple([as_key(x) for x in obj])
    return obj


class Msg(msgspec.Struct, array_like=True, tag=True, omit_defaults=False):
    """Base of all messages.  Subclasses set an explicit integer tag."""


# -- handshakes: the first message on every connection --------------------------


class RegisterWorker(Msg, tag=1):
    name: str
    address: str  # where peers and clients reach this worker's data server
    nthreads: int
    memory_limit: int
    resources: dict[str, float] = {}
    pid: int = 0
    version: int = 1


class RegisterClient(Msg, tag=2):
    client_id: str
    name: str = ""
    version: int = 1


class PeerHello(Msg, tag=3):
    """Opens a data connection to a worker (from a peer worker or a client)."""

    name: str
    version: int = 1
    # A peer worker's own data-server address; empty for a client.  Only
    # workers are ever answered "busy": their fetchers know how to wait.
    address: str = ""


# -- client -> scheduler --------------------------------------------------------


class TaskSpec(msgspec.Struct, array_like=True):
    """One task of a submitted graph, as the scheduler sees it."""

    key: Key
    deps: list[Key]
    run_spec: Payload  # pickled spec.Node, opaque to the scheduler
    order: int = 0  # position in the graph's own priority order
    priority: int = 0  # user priority: higher runs earlier
    retries: int = 0
    workers: Optional[list[str]] = None  # names or addresses allowed to run it
    allow_other_workers: bool = False
    resources: Optional[dict[str, float]] = None
    scattered: bool = False  # data the client sent: cannot be recomputed
    # When set, the token of a function in SubmitGraph.functions (or sent
    # before): run_spec then pickles only ``(args, kwargs)``.  A function
    # shared by many tasks is pickled and sent once per graph and per worker.
    func: str = ""


class SubmitGraph(Msg, tag=10):
    tasks: list[TaskSpec]
    wanted: list[Key]  # keys the client holds futures for
    functions: dict[str, Payload] = {}  # token -> pickled function
    # A large graph arrives in parts (dependencies first) so the scheduler
    # never stalls on one huge message; parts with ``more`` set are held
    # until the last part, which carries ``wanted``.
    more: bool = False


class ReleaseKeys(Msg, tag=11):
    """The client dropped its last future for these keys."""

    keys: list[Key]


class CancelKeys(Msg, tag=12):
    keys: list[Key]


class ClientHeartbeat(Msg, tag=13):
    pass


class CloseClient(Msg, tag=14):
    pass


class RetireWorkers(Msg, tag=15):
    """Move the data only these workers hold to others, then stop them
    (or, with ``close`` unset, leave them connected but idle).  Answered by
    ``RequestDone`` once done."""

    request_id: int
    workers: list[str]  # names or addresses
    close: bool = True


class RequestInfo(Msg, tag=16):
    """Ask the scheduler for a snapshot of its state and counters."""

    request_id: int
    validate: bool = False  # also check every invariant of its state (costs a pass over all tasks)


class ResumeClient(Msg, tag=17):
    """Sent by a client that reconnected: the keys it still holds futures for.

    The scheduler answers with the current state of each key it knows, lost
    for each it does not, and releases what the client dropped while away."""

    keys: list[Key]


# -- scheduler -> client --------------------------------------------------------


class Welcome(Msg, tag=20):
    scheduler_id: str
    workers: list[str]


class KeysInMemory(Msg, tag=21):
    """Results now held by workers, one column per field (a map of 100k
    tasks would otherwise be 100k messages).  ``holders[i]`` indexes into
    ``addresses``, so each worker's address is written once per message: one
    index for a result with one holder (nearly all), a list for several."""

    keys: list[Key]
    ids: list[int]
    holders: list[Union[int, list[int]]]
    addresses: list[str]  # data-server addresses
    nbytes: list[int]
    type_names: list[str]

    def entries(self):
        """``(key, id, [addresses], nbytes, type_name)`` per result.  Results
        with one holder share one list per holder: treat the lists as read-only."""
        addrs = self.addresses
        single = [[a] for a in addrs]
        for key, tid, hs, nb, tn in zip(self.keys, self.ids, self.holders, self.nbytes, self.type_names):
            if type(key) is list:
                key = as_key(key)
            yield key, tid, single[hs] if type(hs) is int else [addrs[h] for h in hs], nb, tn


class KeyErred(Msg, tag=22):
    key: Key
    exception: Payload
    traceback: str
    blamed: Key  # the task that actually raised (may be a dependency)


class KeysCancelled(Msg, tag=23):
    keys: list[Key]
    reason: str


class KeysLost(Msg, tag=24):
    keys: list[Key]
    reason: str


class GraphRejected(Msg, tag=25):
    keys: list[Key]
    reason: str


class WorkersChanged(Msg, tag=26):
    added: list[str]
    removed: list[str]


class RequestDone(Msg, tag=27):
    request_id: int
    error: str = ""


class Info(Msg, tag=28):
    request_id: int
    data: dict[str, Any]


# -- worker -> scheduler --------------------------------------------------------


class TaskFinished(Msg, tag=30):
    id: int
    nbytes: int
    type_name: str = ""
    duration: float = 0.0


class TaskErred(Msg, tag=31):
    id: int
    exception: Payload
    traceback: str


class DataAcquired(Msg, tag=32):
    """The worker now also holds these (fetched from a peer)."""

    ids: list[int]
    nbytes: list[int]


class DataMissing(Msg, tag=33):
    """A holder the scheduler named did not have ``id``."""

    id: int
    holder: int
    stuck: bool = False  # the worker knows no other holder


class WorkerHeartbeat(Msg, tag=34):
    memory: int  # the process's resident memory (RSS), bytes
    executing: int
    stored: int
    managed: int = 0  # bytes of results held in memory (estimated by sizeof)
    spilled: int = 0  # bytes of results held on disk now (their in-memory size)
    spilled_count: int = 0  # results held on disk now
    spilled_total: int = 0  # bytes ever moved to disk
    peak_memory: int = 0  # the process's highest resident memory so far


class WorkerPaused(Msg, tag=38):
    """The worker's memory is past its pause threshold: it starts no task and
    fetches nothing, and gave back the tasks it had not started (``TasksRejected``)."""

    memory: int


class WorkerResumed(Msg, tag=39):
    memory: int


class TasksStarted(Msg, tag=36):
    """These tasks began running: if the worker dies now, they may be why."""

    ids: list[int]


class WorkerClosing(Msg, tag=37):
    """The worker is stopping on purpose: what it was running did not crash it."""

    reason: str


class TasksRejected(Msg, tag=35):
    """Tasks the worker will not run (for example, released while queued)."""

    ids: list[int]


class TasksStolen(Msg, tag=19):
    """The answer to StealTasks: ``ids`` were not started and are dropped
    here (the scheduler runs them elsewhere); ``kept`` had started, finished
    or were unknown, and stay this worker's business."""

    ids: list[int]
    kept: list[int] = []


class TasksCancelled(Msg, tag=18):
    """The answer to CancelTasks, and its sequel: ``stopped`` tasks hold no
    thread here (dropped, or finished since); ``running`` ones could not be
    stopped and keep a thread busy until a later TasksCancelled (or their
    TaskFinished) lists them."""

    stopped: list[int]
    running: list[int] = []


# -- scheduler -> worker --------------------------------------------------------


class PeerInfo(msgspec.Struct, array_like=True):
    wid: int
    address: str


class WorkerWelcome(Msg, tag=40):
    wid: int
    peers: list[PeerInfo]


class PeersChanged(Msg, tag=41):
    added: list[PeerInfo]
    removed: list[int]


class Execute(Msg, tag=42):
    id: int
    key: Key
    run_spec: Payload
    priority: list[int]  # compared lexicographically, lower runs first
    deps: list[int] = []
    dep_keys: list[Key] = []
    who_has: list[list[int]] = []  # per dep: worker ids holding it
    func: int = 0  # a function sent before with DefineFunction (0: none)


class DefineFunction(Msg, tag=46):
    """A function that later Execute messages name by ``id``.

    Ids are interned per connection (small integers, from 1), so an Execute
    carries a few bytes instead of the function's 32-character token."""

    id: int
    payload: Payload
    token: str = ""  # the content token, for error messages


class ReleaseFunctions(Msg, tag=47):
    ids: list[int]


class ReleaseData(Msg, tag=43):
    ids: list[int]


class CancelTasks(Msg, tag=44):
    ids: list[int]


class CloseWorker(Msg, tag=45):
    reason: str


class AcquireData(Msg, tag=48):
    """Fetch these from the named holders and keep them (answered with
    ``DataAcquired``, or ``DataMissing`` when a holder fails)."""

    ids: list[int]
    keys: list[Key]
    who_has: list[list[int]]  # per id: worker ids holding it


class DrainWorker(Msg, tag=49):
    """The worker is being retired: hand back every task it has not started
    (``TasksRejected``); it is sent no new ones."""


class StealTasks(Msg, tag=52):
    """Another worker has free threads: give back those of these tasks not
    started yet.  Always answered with ``TasksStolen``."""

    ids: list[int]


# -- data plane: peers and clients -> worker, and its answers --------------------


class GetData(Msg, tag=50):
    request_id: int
    ids: list[int]


class DataResponse(Msg, tag=51):
    request_id: int
    ids: list[int]
    payloads: list[Payload]
    missing: list[int] = []
    errors: dict[int, str] = {}  # ids held but not serializable, with why
    # The holder is paused or already sending too much: nothing was sent; ask
    # again later or ask another holder.
    busy: bool = False
    # Held, but past the size this answer may reach (RESPONSE_BYTES): ask
    # again.  Requests may name many keys; answers stay bounded in bytes.
    later: list[int] = []


ToScheduler = Union[
    RegisterWorker,
    RegisterClient,
    SubmitGraph,
    ReleaseKeys,
    CancelKeys,
    ClientHeartbeat,
    CloseClient,
    RetireWorkers,
    RequestInfo,
    ResumeClient,
    TaskFinished,
    TaskErred,
    DataAcquired,
    DataMissing,
    WorkerHeartbeat,
    TasksRejected,
    TasksStolen,
    TasksCancelled,
    TasksStarted,
    WorkerClosing,
    WorkerPaused,
    WorkerResumed,
]

ToWorker = Union[
    WorkerWelcome,
    PeersChanged,
    Execute,
    DefineFunction,
    ReleaseFunctions,
    ReleaseData,
    CancelTasks,
    CloseWorker,
    AcquireData,
    DrainWorker,
    StealTasks,
    PeerHello,
    GetData,
    DataResponse,
]

ToClient = Union[
    Welcome,
    KeysInMemory,
    KeyErred,
    KeysCancelled,
    KeysLost,
    GraphRejected,
    WorkersChanged,
    RequestDone,
    Info,
    DataResponse,
]

CLIENT_TO_SCHEDULER = (
    SubmitGraph,
    ReleaseKeys,
    CancelKeys,
    ClientHeartbeat,
    CloseClient,
    RetireWorkers,
    RequestInfo,
    ResumeClient,
)
WORKER_TO_SCHEDULER = (
    TaskFinished,
    TaskErred,
    DataAcquired,
    DataMissing,
    WorkerHeartbeat,
    TasksRejected,
    TasksStolen,
    TasksCancelled,
    TasksStarted,
    WorkerClosing,
    WorkerPaused,
    WorkerResumed,
)
