"""TCP transport on asyncio protocols (uvloop-compatible)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from ..errors import CommClosedError
from .core import Comm, Listener, parse_address


class TCPComm(Comm):
    def __init__(self, msg_type: Any, **kw):
        super().__init__(msg_type, **kw)
        self._transport: asyncio.Transport | None = None

    def _write(self, frames: list) -> None:
        t = self._transport
        if t is None or t.is_closing():
            self._mark_closed(CommClosedError(f"connection to {self.peer_address} lost"))
            return
        t.writelines(frames)

    @property
    def unsent_bytes(self) -> int:
        t = self._transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    def pause_reading(self) -> None:
        t = self._transport
        if t is not None and not t.is_closing() and t.is_reading():
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self._transport
        if t is not None and not t.is_closing() and not t.is_reading():
            t.resume_reading()

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _Protocol(asyncio.Protocol):
    __slots__ = ("comm", "on_made")

    def __init__(self, comm: TCPComm, on_made: Callable[[TCPComm], None] | None = None):
        self.comm = comm
        self.on_made = on_made

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        comm = self.comm
        comm._transport = transport
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        if local and not comm.local_address:
            comm.local_address = f"tcp://{local[0]}:{local[1]}"
        if peer and not comm.peer_address:
            comm.peer_address = f"tcp://{peer[0]}:{peer[1]}"
        if self.on_made is not None:
            self.on_made(comm)

    def data_received(self, data: bytes) -> None:
        self.comm._on_data(data)

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.comm._mark_closed(
            CommClosedError(f"connection to {self.comm.peer_address} lost: {exc}") if exc else None
        )


def _host_port(address: str) -> tuple[str, int]:
    _, rest = parse_address(address)
    host, _, port = rest.rpartition(":")
    if not host:
        raise ValueError(f"address {address!r} has no host")
    return host.strip("[]"), int(port)


async def tcp_connect(address: str, msg_type: Any, *, timeout: float = 10.0, **kw) -> TCPComm:
    host, port = _host_port(address)
    loop = asyncio.get_running_loop()
    comm = TCPComm(msg_type, peer=address, **kw)
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: _Protocol(comm), host, port)
    except (OSError, TimeoutError) as e:
        raise CommClosedError(f"could not connect to {address}: {e or 'timed out'}") from e
    return comm


class TCPListener(Listener):
    def __init__(self, server: asyncio.base_events.Server, host: str):
        self._server = server
        port = server.sockets[0].getsockname()[1]
        self.address = f"tcp://{host}:{port}"
        self.port = port

    async def close(self) -> None:
        self._server.close()
        try:
            async with asyncio.timeout(2):
                await self._server.wait_closed()
        except TimeoutError:
            pass


async def tcp_listen(address: str, on_connect: Callable[[Comm], None], msg_type: Any, **kw) -> TCPListener:
    host, port = _host_port(address)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Protocol(TCPComm(msg_type, **kw), on_connect), host, port, reuse_address=True
    )
    shown = host if host not in ("0.0.0.0", "", "::") else _my_ip()
    return TCPListener(server, shown)


def _my_ip() -> str:
    """The address other machines would use to reach this one."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
