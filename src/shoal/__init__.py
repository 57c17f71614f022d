"""Shoal: a fast distributed task scheduler for Python.

>>> from shoal import Client
>>> client = Client()                     # starts a local cluster
>>> client.submit(sum, [1, 2, 3]).result()
6
"""

from .client import Client, Future, as_completed, default_client, wait
from .cluster import LocalCluster
from .errors import (
    CommClosedError,
    CycleError,
    FutureLostError,
    GraphError,
    KilledWorkerError,
    MissingDependencyError,
    ProtocolError,
    RetirementError,
    SchedulerUnavailableError,
    SerializationError,
    ShoalError,
    TaskCancelledError,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Future",
    "LocalCluster",
    "as_completed",
    "wait",
    "default_client",
    "ShoalError",
    "GraphError",
    "CycleError",
    "MissingDependencyError",
    "SerializationError",
    "TaskCancelledError",
    "FutureLostError",
    "KilledWorkerError",
    "ProtocolError",
    "CommClosedError",
    "SchedulerUnavailableError",
    "RetirementError",
]
