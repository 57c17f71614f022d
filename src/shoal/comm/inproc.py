"""In-process transport: two comms joined inside one event loop.

Every batch is still encoded and decoded exactly as on TCP, so tests that run
over it also prove the wire format (like the test double of HyperQueue's tako).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable

from ..errors import CommClosedError
from .core import Comm, Listener, parse_address

_listeners: dict[str, "InprocListener"] = {}
_ids = itertools.count()


class InprocComm(Comm):
    def __init__(self, msg_type: Any, **kw):
        super().__init__(msg_type, **kw)
        self.other: InprocComm | None = None

    def _write(self, frames: list) -> None:
        other = self.other
        if other is None or other.closed:
            self._mark_closed(CommClosedError(f"connection to {self.peer_address} lost"))
            return
        data = b"".join(bytes(f) for f in frames)
        self._loop.call_soon(other._on_data, data)

    def _close_transport(self) -> None:
        other = self.other
        if other is not None and not other.closed:
            # Deliver after data already in flight, as a socket would.
            self._loop.call_soon(other._mark_closed, None)


class InprocListener(Listener):
    def __init__(self, name: str, on_connect: Callable[[Comm], None], msg_type: Any, kw: dict):
        self.address = f"inproc://{name}"
        self.on_connect = on_connect
        self.msg_type = msg_type
        self.kw = kw

    async def close(self) -> None:
        _listeners.pop(self.address, None)


async def inproc_listen(address: str, on_connect, msg_type: Any, **kw) -> InprocListener:
    _, name = parse_address(address)
    if not name:
        name = f"listener-{next(_ids)}"
    listener = InprocListener(name, on_connect, msg_type, kw)
    if listener.address in _listeners:
        raise OSError(f"{listener.address} is already listening")
    _listeners[listener.address] = listener
    return listener


async def inproc_connect(address: str, msg_type: Any, **kw) -> InprocComm:
    listener = _listeners.get(address)
    if listener is None:
        raise CommClosedError(f"could not connect to {address}: nothing listens there")
    n = next(_ids)
    client_side = InprocComm(msg_type, local=f"{address}/c{n}", peer=address, **kw)
    server_side = InprocComm(listener.msg_type, local=address, peer=f"{address}/c{n}", **listener.kw)
    client_side.other, server_side.other = server_side, client_side
    listener.on_connect(server_side)
    await asyncio.sleep(0)
    return client_side
