"""Facts the scheduler's reactor feeds to :class:`~shoal.scheduler.state.SchedulerState`.

Events are in the past tense.  Time arrives on events (``now``), never from a
clock read inside the core.  Messages from workers and clients are passed in
batches (one event per received packet batch) so that a burst of thousands of
``TaskFinished`` costs one event, not thousands.
"""

from __future__ import annotations

import msgspec


class Event(msgspec.Struct):
    pass


class WorkerJoined(Event):
    wid: int
    name: str
    address: str
    nthreads: int
    memory_limit: int = 0
    resources: dict[str, float] = {}
    now: float = 0.0


class WorkerLeft(Event):
    wid: int
    reason: str
    expected: bool = False  # a clean shutdown, not a crash


class ClientJoined(Event):
    cid: str
    name: str = ""


class ClientLeft(Event):
    """The client is gone for good (it said goodbye, or its grace period ran out)."""

    cid: str


class ClientDisconnected(Event):
    """The client's connection dropped without a goodbye: it may come back."""

    cid: str
    now: float = 0.0


class WorkerSent(Event):
    """A batch of wire messages from one worker."""

    wid: int
    msgs: list
    now: float = 0.0


class ClientSent(Event):
    """A batch of wire messages from one client."""

    cid: str
    msgs: list


class Ticked(Event):
    """Periodic clock event: lets the core notice silent workers."""

    now: float
