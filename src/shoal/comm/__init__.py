"""Asyncio transports (TCP, in-process) carrying batched, framed messages."""

from .core import Comm, Listener, connect, listen, parse_address

__all__ = ["Comm", "Listener", "connect", "listen", "parse_address", "install_uvloop"]


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed; return whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    import asyncio
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
