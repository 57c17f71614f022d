"""Message connections: the batched, framed link every reactor talks through.

A :class:`Comm` delivers whole batches of decoded messages to its
``handler(comm, msgs)`` callback straight from the transport's read callback:
no asyncio task or coroutine per message.  ``send`` appends to an outbox that
is flushed once at the end of the current event-loop iteration (or at once
past a size cap), so everything a reactor produces while handling one batch
leaves in one packet per destination without adding latency.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..errors import CommClosedError, ProtocolError
from ..protocol.framing import DEFAULT_MAX_PACKET, PacketReader, PacketWriter

logger = logging.getLogger("shoal.comm")

Handler = Callable[["Comm", list], None]
ClosedHandler = Callable[["Comm", "BaseException | None"], None]

# Flush early once this many messages wait, so huge bursts stream out.
FLUSH_AT_MESSAGES = 5000


def _drop(comm: "Comm", msgs: list) -> None:  # default handler until one is set
    comm._early.extend(msgs)


class Comm:
    """One end of a message connection.  Subclasses move the bytes."""

    def __init__(self, msg_type: Any, *, local: str = "", peer: str = "", max_packet: int = DEFAULT_MAX_PACKET):
        self.local_address = local
        self.peer_address = peer
        self._reader = PacketReader(msg_type, max_packet=max_packet)
        self._writer = PacketWriter()
        self._outbox: list = []
        self._flush_scheduled = False
        self._handler: Handler = _drop
        self._early: list = []  # messages that arrived before a handler was set
        self.on_closed: ClosedHandler | None = None
        self.closed = False
        self.close_reason: BaseException | None = None
        self._closed_event: asyncio.Event | None = None
        self._loop = asyncio.get_running_loop()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.info: dict = {}  # reactors keep per-connection state here

    # -- receiving --------------------------------------------------------------

    @property
    def handler(self) -> Handler:
        return self._handler

    @handler.setter
    def handler(self, fn: Handler) -> None:
        self._handler = fn
        if self._early and fn is not _drop:
            early, self._early = self._early, []
            fn(self, early)

    def _on_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.bytes_received += len(data)
        try:
            msgs = self._reader.feed(data)
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", self.peer_address or "?", e)
            self.abort(e)
            return
        except Exception as e:  # the decoder must never take the server down
            err = ProtocolError(f"undecodable input: {type(e).__name__}: {e}")
            logger.warning("closing connection from %s: %s", self.peer_address or "?", err)
            self.abort(err)
            return
        if msgs:
            try:
                self._handler(self, msgs)
            except ProtocolError as e:
                logger.warning("closing connection from %s: %s", self.peer_address or "?", e)
                self.abort(e)
            except Exception as e:  # a reactor bug must not kill the transport silently
                logger.exception("error handling messages from %s", self.peer_address)
                self.abort(e)

    # -- sending ----------------------------------------------------------------

    def send(self, msg: Any) -> None:
        if self.closed:
            raise CommClosedError(f"connection to {self.peer_address} is closed")
        self._outbox.append(msg)
        if len(self._outbox) >= FLUSH_AT_MESSAGES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def send_many(self, msgs: list) -> None:
        if self.closed:
            raise CommClosedError(f"connection to {self.peer_address} is closed")
        self._outbox.extend(msgs)
        if len(self._outbox) >= FLUSH_AT_MESSAGES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox or self.closed:
            self._outbox = []
            return
        msgs, self._outbox = self._outbox, []
        try:
            frames = self._writer.encode(msgs)
        except Exception:
            # A message we cannot encode is our own bug: log it, send the rest.
            good = []
            for msg in msgs:
                try:
                    self._writer.encode([msg])
                    good.append(msg)
                except Exception:
                    logger.exception("dropping unencodable %s to %s", type(msg).__name__, self.peer_address)
            if not good:
                return
            frames = self._writer.encode(good)
        for f in frames:
            self.bytes_sent += memoryview(f).nbytes
        self._write(frames)

    # -- flow control -------------------------------------------------------------

    @property
    def unsent_bytes(self) -> int:
        """Bytes handed to the transport that the kernel has not taken yet."""
        return 0

    @property
    def sending(self) -> bool:
        """Whether anything queued here has not reached the kernel yet."""
        return bool(self._outbox) or self.unsent_bytes > 0

    def pause_reading(self) -> None:
        """Stop taking input until ``resume_reading`` (the reactor has a backlog)."""

    def resume_reading(self) -> None:
        pass

    # -- closing ----------------------------------------------------------------

    def _mark_closed(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = exc
        if self._closed_event is not None:
            self._closed_event.set()
        cb = self.on_closed
        if cb is not None:
            try:
                cb(self, exc)
            except Exception:
                logger.exception("error in close callback for %s", self.peer_address)

    async def wait_closed(self) -> None:
        if self.closed:
            return
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
        await self._closed_event.wait()

    def close(self) -> None:
        """Flush what is queued, then close."""
        if not self.closed:
            self.flush()
            self._close_transport()
            self._mark_closed(None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Close at once, dropping anything unsent."""
        if not self.closed:
            self._outbox = []
            self._abort_transport()
            self._mark_closed(exc)

    # -- transport hooks ----------------------------------------------------------

    def _write(self, frames: list) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_transport(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _abort_transport(self) -> None:
        self._close_transport()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.local_address} -> {self.peer_address}{' closed' if self.closed else ''}>"


class Listener:
    """A listening endpoint; ``address`` is where peers connect."""

    address: str

    async def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def parse_address(address: str) -> tuple[str, str]:
    """``"tcp://host:port"`` -> ``("tcp", "host:port")``; bare ``host:port`` means tcp."""
    if "://" in address:
        scheme, rest = address.split("://", 1)
        return scheme, rest
    return "tcp", address


async def connect(address: str, msg_type: Any, *, timeout: float = 10.0, **kw) -> Comm:
    scheme, _ = parse_address(address)
    if scheme == "tcp":
        from .tcp import tcp_connect

        return await tcp_connect(address, msg_type, timeout=timeout, **kw)
    if scheme == "inproc":
        from .inproc import inproc_connect

        return await inproc_connect(address, msg_type, **kw)
    raise ValueError(f"unknown address scheme {scheme!r} in {address!r}")


async def listen(address: str, on_connect: Callable[[Comm], None], msg_type: Any, **kw) -> Listener:
    scheme, _ = parse_address(address)
    if scheme == "tcp":
        from .tcp import tcp_listen

        return await tcp_listen(address, on_connect, msg_type, **kw)
    if scheme == "inproc":
        from .inproc import inproc_listen

        return await inproc_listen(address, on_connect, msg_type, **kw)
    raise ValueError(f"unknown address scheme {scheme!r} in {address!r}")
