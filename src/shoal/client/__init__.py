"""The client side: ``Client``, ``Future``, ``wait``, ``as_completed``."""

from .client import Client, default_client
from .futures import Future, as_completed, wait

__all__ = ["Client", "Future", "as_completed", "wait", "default_client"]
