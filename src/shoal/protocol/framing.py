"""Packets: a batch of messages plus their out-of-band payload frames.

Layout of one packet on a byte stream::

    u32 nframes | u64 length * nframes | frame 0 | frame 1 | ...

Frame 0 is the msgpack encoding of ``list[Message]``; every :class:`Payload`
inside it is replaced by an msgpack extension ``(PAYLOAD_EXT, start, count)``
naming the frames that follow -- or, for a small single-frame payload (a
task's pickled arguments, a small result), by an extension
``(PAYLOAD_INLINE_EXT, bytes)`` holding it: tens of thousands of tiny frames
would cost a length and a slice each on both ends.  No I/O here: :class:`PacketReader` is fed
bytes and returns decoded batches (sans-IO, like h11).
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from ..errors import ProtocolError
from .serialize import Payload

PAYLOAD_EXT = 1
PAYLOAD_INLINE_EXT = 2
INLINE_MAX = 2048  # bytes: single-frame payloads up to this travel inside frame 0
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EXT = struct.Struct("<II")

DEFAULT_MAX_FRAMES = 1 << 20
DEFAULT_MAX_PACKET = 4 << 30  # bytes: a length prefix beyond this is refused


class PacketWriter:
    """Encodes batches of messages into packets (a list of buffers to write)."""

    def __init__(self):
        self._oob: list = []
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def _enc_hook(self, obj: Any) -> Any:
        if type(obj) is Payload:
            frames = obj.frames
            if len(frames) == 1 and type(frames[0]) is bytes and len(frames[0]) <= INLINE_MAX:
                return msgspec.msgpack.Ext(PAYLOAD_INLINE_EXT, frames[0])
            start = len(self._oob) + 1
            self._oob.extend(frames)
            return msgspec.msgpack.Ext(PAYLOAD_EXT, _EXT.pack(start, len(frames)))
        raise NotImplementedError(f"cannot encode {type(obj).__name__} in a message")

    def encode(self, msgs: list) -> list:
        self._oob = []
        try:
            body = self._encoder.encode(msgs)
            oob = self._oob
        finally:
            self._oob = []
        n = 1 + len(oob)
        if n == 1:
            return [_U32.pack(1) + _U64.pack(len(body)), body]
        lengths = [len(body)]
        lengths.extend(memoryview(f).nbytes for f in oob)
        return [struct.pack(f"<I{n}Q", n, *lengths), body, *oob]


class PacketReader:
    """Turns a byte stream into decoded message batches.

    ``feed(data)`` returns a list of messages (possibly from several packets).
    Invalid input raises :class:`ProtocolError`; the reader is then unusable.
    """

    def __init__(self, msg_type: Any, *, max_packet: int = DEFAULT_MAX_PACKET, max_frames: int = DEFAULT_MAX_FRAMES):
        self._decoder = msgspec.msgpack.Decoder(
            list[msg_type], ext_hook=self._ext_hook, dec_hook=self._dec_hook
        )
        self._buf = bytearray()
        self._pos = 0
        self._frames: list = []
        self.max_packet = max_packet
        self.max_frames = max_frames
        # Header of the packet being read, once known: (header_size, lengths).
        self._pending: tuple | None = None

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code == PAYLOAD_INLINE_EXT:
            return Payload([bytes(data)])
        if code != PAYLOAD_EXT or len(data) != _EXT.size:
            raise ValueError(f"unknown extension type {code}")
        start, count = _EXT.unpack(data)
        if start < 1 or count < 1 or start + count > len(self._frames):
            raise ValueError("payload placeholder points outside the packet")
        return Payload(self._frames[start : start + count])

    def _dec_hook(self, typ: type, obj: Any) -> Any:
        if typ is Payload and type(obj) is Payload:
            return obj
        raise NotImplementedError(f"expected {typ.__name__}, got {type(obj).__name__}")

    def feed(self, data: bytes) -> list:
        self._buf += data
        out: list = []
        while True:
            batch = self._next_packet()
            if batch is None:
                break
            out.extend(batch)
        if self._pos > (1 << 16) and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def _next_packet(self) -> list | None:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if self._pending is None:
            if avail < 4:
                return None
            (n,) = _U32.unpack_from(buf, pos)
            if n < 1 or n > self.max_frames:
                raise ProtocolError(f"packet announces {n} frames (allowed 1..{self.max_frames})")
            hsize = 4 + 8 * n
            if avail < hsize:
                return None
            lengths = struct.unpack_from(f"<{n}Q", buf, pos + 4)
            total = sum(lengths)
            if total > self.max_packet:
                raise ProtocolError(
                    f"packet announces {total} bytes, above the limit of {self.max_packet}"
                )
            self._pending = (hsize, lengths, total)
        hsize, lengths, total = self._pending
        if avail < hsize + total:
            return None
        start = pos + hsize
        frames = []
        for length in lengths:
            frames.append(bytes(buf[start : start + length]))
            start += length
        self._pos = start
        self._pending = None
        self._frames = frames
        try:
            msgs = self._decoder.decode(frames[0])
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, NotImplementedError) as e:
            raise ProtocolError(f"malformed message: {e}") from None
        except RecursionError:
            raise ProtocolError("malformed message: nested too deeply") from None
        finally:
            self._frames = []
        return msgs
