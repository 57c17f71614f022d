"""Every exception Shoal raises, in one place.

Each type names the party at fault: the user's graph, the user's code, the
network peer, or a cluster member that went away.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base class of every error Shoal raises itself."""


# -- the user's graph ---------------------------------------------------------


class GraphError(ShoalError, ValueError):
    """A task graph is malformed; the message names the offending keys."""


class CycleError(GraphError):
    """The graph has a cycle; ``keys`` are the tasks on it."""

    def __init__(self, keys):
        self.keys = list(keys)
        super().__init__(f"task graph has a cycle through {self.keys[:10]!r}")


class MissingDependencyError(GraphError):
    """A task depends on a key that is neither in the graph nor known to the cluster."""

    def __init__(self, missing: dict):
        # missing: {task key: [missing dependency keys]}
        self.missing = missing
        sample = dict(list(missing.items())[:5])
        super().__init__(f"tasks depend on keys that do not exist: {sample!r}")


# -- the user's code ----------------------------------------------------------


class SerializationError(ShoalError):
    """A function, argument or result could not be (de)serialized."""


class TaskCancelledError(ShoalError):
    """The future was cancelled before it produced a result."""


class FutureLostError(ShoalError):
    """The data behind a future is gone and cannot be recomputed (for example
    scattered data whose only holder died, or a scheduler that restarted)."""


class KilledWorkerError(ShoalError):
    """A task crashed the worker processes that ran it too many times."""


# -- the network and the cluster ----------------------------------------------


class ProtocolError(ShoalError):
    """A peer sent bytes that are not a valid Shoal message."""


class CommClosedError(ShoalError, ConnectionError):
    """The connection was closed (by us, the peer, or the network)."""


class SchedulerUnavailableError(ShoalError, ConnectionError):
    """The scheduler could not be reached within the timeout."""


class RetirementError(ShoalError):
    """Workers could not be retired: unknown names, or no other worker would
    remain to take their data."""
