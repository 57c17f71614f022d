"""The values a worker holds: in memory, or spilled to a local directory.

The store obeys, it never decides: ``WorkerState`` chooses which values go to
disk and which come back (see ``memory.py``), and the reactor carries that out
here.  A spilled value is kept as the serialized frames a peer would receive
(large buffers already lz4-compressed by ``serialize``; the pickle stream is
compressed here when that pays), so serving it to a peer unpickles nothing.

Each worker process spills into its own directory, named after its pid, so
that whoever outlives a crashed worker (its supervisor, or the next worker
started on the same machine) can tell the directory is garbage and remove it.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from typing import Any

import lz4.block
import psutil

from ..protocol.serialize import COMPRESS_MIN, Payload, deserialize, serialize

logger = logging.getLogger("shoal.worker")

SPILL_PREFIX = "shoal-spill-"
_MAGIC = b"SHS1"
_COUNT = struct.Struct("<I")
_FRAME = struct.Struct("<BQ")  # codec, stored length
_RAW, _LZ4 = 0, 1


def spill_directory(local_dir: str, pid: int) -> str:
    """Where the worker process ``pid`` spills."""
    return os.path.join(local_dir, f"{SPILL_PREFIX}{pid}")


def remove_spill_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def purge_stale_spill(local_dir: str) -> list[str]:
    """Remove spill directories of worker processes that no longer run
    (killed without a supervisor to clean up after them); return them."""
    removed = []
    try:
        names = os.listdir(local_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SPILL_PREFIX):
            continue
        try:
            pid = int(name[len(SPILL_PREFIX):])
        except ValueError:
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            path = os.path.join(local_dir, name)
            remove_spill_directory(path)
            removed.append(path)
    return removed


class DataStore:
    """Values by task id: ``memory`` holds live objects, ``disk`` the sizes of
    the files of spilled ones."""

    def __init__(self, directory: str):
        self.directory = directory  # created on the first spill
        self.memory: dict[int, Any] = {}
        self.disk: dict[int, int] = {}  # id -> bytes on disk
        self.disk_bytes = 0
        self._made_dir = False

    def __contains__(self, id: int) -> bool:
        return id in self.memory or id in self.disk

    def __len__(self) -> int:
        return len(self.memory) + len(self.disk)

    def __iter__(self):
        yield from self.memory
        yield from self.disk

    def put(self, id: int, value: Any) -> None:
        if id in self.disk:
            self._remove_file(id)
        self.memory[id] = value

    def get(self, id: int, what: str = "a spilled value") -> Any:
        """The value; read from disk (and left there) if spilled."""
        try:
            return self.memory[id]
        except KeyError:
            if id not in self.disk:
                raise
        return deserialize(self._read(id), what=what)

    def payload(self, id: int, what: str = "object") -> Payload:
        """The value serialized, as sent to peers: a spilled one is read, not unpickled."""
        if id in self.memory:
            return serialize(self.memory[id], what=what)
        if id in self.disk:
            return self._read(id)
        raise KeyError(id)

    def spill(self, id: int, what: str = "object") -> int:
        """Move ``id`` to disk; return the bytes written.  Raises
        ``SerializationError`` or ``OSError`` and keeps the value if it cannot."""
        if id in self.disk:
            return 0
        payload = serialize(self.memory[id], what=what)
        n = self._write(id, payload)
        del self.memory[id]
        return n

    def unspill(self, id: int, what: str = "a spilled value") -> None:
        if id in self.disk:
            self.memory[id] = deserialize(self._read(id), what=what)
            self._remove_file(id)

    def forget(self, id: int) -> None:
        if self.memory.pop(id, None) is None and id in self.disk:
            self._remove_file(id)

    def close(self) -> None:
        self.memory.clear()
        self.disk.clear()
        self.disk_bytes = 0
        remove_spill_directory(self.directory)

    # -- files ----------------------------------------------------------------------

    def _path(self, id: int) -> str:
        return os.path.join(self.directory, str(id))

    def _write(self, id: int, payload: Payload) -> int:
        if not self._made_dir:
            os.makedirs(self.directory, exist_ok=True)
            self._made_dir = True
        frames = list(payload.frames)
        codecs = [_RAW] * len(frames)
        head = memoryview(frames[0])
        if head.nbytes >= COMPRESS_MIN:
            # Large buffers arrive compressed already; a pickle stream of
            # plain Python objects does not.
            packed = lz4.block.compress(head, store_size=True)
            if len(packed) < head.nbytes * 0.9:
                frames[0], codecs[0] = packed, _LZ4
        header = [_MAGIC, _COUNT.pack(len(frames))]
        header += [_FRAME.pack(c, memoryview(f).nbytes) for c, f in zip(codecs, frames)]
        path = self._path(id)
        try:
            with open(path, "wb") as f:
                f.write(b"".join(header))
                for frame in frames:
                    f.write(frame)
        except BaseException:
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        n = sum(len(h) for h in header) + sum(memoryview(f).nbytes for f in frames)
        self.disk[id] = n
        self.disk_bytes += n
        return n

    def _read(self, id: int) -> Payload:
        with open(self._path(id), "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise OSError(f"spill file {self._path(id)} is damaged")
            (count,) = _COUNT.unpack(f.read(_COUNT.size))
            specs = [_FRAME.unpack(f.read(_FRAME.size)) for _ in range(count)]
            frames: list = []
            for codec, length in specs:
                buf = bytearray(length)
                if f.readinto(buf) != length:
                    raise OSError(f"spill file {self._path(id)} is truncated")
                frames.append(lz4.block.decompress(buf) if codec == _LZ4 else buf)
        return Payload(frames)

    def _remove_file(self, id: int) -> None:
        self.disk_bytes -= self.disk.pop(id)
        try:
            os.unlink(self._path(id))
        except OSError as e:
            logger.warning("could not remove spill file %s: %s", self._path(id), e)
