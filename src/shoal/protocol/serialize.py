"""User payloads: Python objects as out-of-band frames.

A :class:`Payload` is an opaque list of frames (a pickle stream plus any
protocol-5 buffers).  Messages carry payloads as fields; the framing layer
moves their frames out of band, so the scheduler forwards a task's pickled
function without ever unpickling it, and large buffers (NumPy arrays, Arrow
tables) are never copied into the message body.
"""

from __future__ import annotations

import pickle
import sys
import traceback as tb_module
from typing import Any

import cloudpickle
import lz4.block

from ..errors import SerializationError

__all__ = ["Payload", "serialize", "deserialize", "serialize_exception", "RemoteException", "sizeof"]

# Buffers larger than this are compressed when compression saves at least 10%.
COMPRESS_MIN = 64 * 1024
# With out-of-band buffers, frame 1 holds one byte per buffer: how it is stored.
_RAW = 0
_LZ4 = 1


class Payload:
    """Frames of one serialized object: ``frames[0]`` is the pickle stream."""

    __slots__ = ("frames",)

    def __init__(self, frames: list):
        self.frames = frames

    @property
    def nbytes(self) -> int:
        return sum(memoryview(f).nbytes for f in self.frames)

    def __repr__(self) -> str:
        return f"<Payload {len(self.frames)} frames, {self.nbytes} bytes>"

    def __eq__(self, other) -> bool:
        return type(other) is Payload and [bytes(f) for f in self.frames] == [
            bytes(f) for f in other.frames
        ]


def pack_frames(head: bytes, buffers: list) -> Payload:
    """A payload from a pickle stream and its protocol-5 buffers (codec flags
    in frame 1, large compressible buffers lz4-compressed)."""
    if not buffers:
        return Payload([head])
    codecs = bytearray()
    frames = [head, codecs]
    for buf in buffers:
        raw = buf.raw() if isinstance(buf, pickle.PickleBuffer) else memoryview(buf)
        if raw.nbytes >= COMPRESS_MIN:
            packed = lz4.block.compress(raw, store_size=True)
            if len(packed) < raw.nbytes * 0.9:
                codecs.append(_LZ4)
                frames.append(packed)
                continue
        codecs.append(_RAW)
        frames.append(raw)
    frames[1] = bytes(codecs)
    return Payload(frames)


def serialize(obj: Any, *, what: str = "object") -> Payload:
    """Pickle ``obj`` (protocol 5, buffers out of band), falling back to cloudpickle.

    Raises :class:`SerializationError` naming ``what`` when neither can.
    """
    buffers: list = []
    try:
        head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception:
        buffers = []
        try:
            head = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception as e:
            raise SerializationError(f"cannot serialize {what}: {type(e).__name__}: {e}") from e
    return pack_frames(head, buffers)


def deserialize(payload: Payload, *, what: str = "object") -> Any:
    frames = payload.frames
    try:
        if len(frames) == 1:
            return pickle.loads(frames[0])
        codecs = bytes(frames[1])
        if len(codecs) != len(frames) - 2:
            raise ValueError(f"{len(frames) - 2} buffers but {len(codecs)} codec flags")
        buffers = []
        for codec, f in zip(codecs, frames[2:]):
            if codec == _LZ4:
                buffers.append(lz4.block.decompress(f))
            elif codec == _RAW:
                buffers.append(memoryview(f))
            else:
                raise ValueError(f"unknown buffer codec {codec}")
        return pickle.loads(frames[0], buffers=buffers)
    except Exception as e:
        raise SerializationError(f"cannot deserialize {what}: {type(e).__name__}: {e}") from e


class RemoteException(Exception):
    """Stands in for an exception that could not be pickled on the worker."""

    def __init__(self, type_name: str, text: str):
        self.type_name = type_name
        self.text = text
        super().__init__(f"{type_name}: {text}")

    def __reduce__(self):
        return RemoteException, (self.type_name, self.text)


def serialize_exception(exc: BaseException) -> tuple[Payload, str]:
    """The exception as a payload, and its formatted traceback as text."""
    tb_text = "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = serialize(exc, what="exception")
        # An exception that pickles but cannot be rebuilt is useless to the client.
        deserialize(payload)
    except Exception:
        payload = serialize(RemoteException(type(exc).__qualname__, str(exc)))
    return payload, tb_text


def sizeof(obj: Any) -> int:
    """A cheap estimate of ``obj``'s memory: never walks containers deeply."""
    n = getattr(obj, "nbytes", None)
    if isinstance(n, int):
        return n
    t = type(obj)
    if t is bytes or t is bytearray or t is str:
        return len(obj) + 49
    if t is list or t is tuple or t is set or t is dict:
        # Sample at most a few items; the container itself costs getsizeof.
        size = sys.getsizeof(obj)
        if obj:
            items = obj.values() if t is dict else obj
            sample = []
            for i, x in enumerate(items):
                if i == 8:
                    break
                sample.append(x)
            size += len(obj) * sum(sizeof(x) for x in sample) // len(sample)
        return size
    mu = getattr(obj, "memory_usage", None)
    if mu is not None and hasattr(obj, "dtypes"):  # pandas objects
        try:
            r = mu(deep=False, index=True)
            return int(r.sum()) if hasattr(r, "sum") else int(r)
        except Exception:
            pass
    try:
        return sys.getsizeof(obj)
    except Exception:
        return 64
