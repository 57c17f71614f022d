"""Turning calls into task payloads, and walking nested containers of futures."""

from __future__ import annotations

import hashlib
import pickle
from typing import Any, Callable

import cloudpickle

from ..protocol.serialize import Payload, pack_frames
from .futures import Future


def run_spec(node) -> Payload:
    """Pickle a task spec: cloudpickle, so functions defined in ``__main__``
    or interactively travel by value."""
    buffers: list = []
    head = cloudpickle.dumps(node, protocol=5, buffer_callback=buffers.append)
    return pack_frames(head, buffers)


def dumps_args(obj: Any) -> Payload:
    """Pickle arguments: plain pickle when it can, cloudpickle when the
    object refers to ``__main__`` (which a worker cannot import) or pickle fails."""
    buffers: list = []
    try:
        if by_value_modules():
            raise pickle.PicklingError("modules registered for pickling by value")
        head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        if b"__main__" in head:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers = []
        head = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pack_frames(head, buffers)


def by_value_modules() -> bool:
    """Whether ``cloudpickle.register_pickle_by_value`` is in use (plain pickle ignores it)."""
    return bool(getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None))


def token(payload: Payload, salt: str = "") -> str:
    h = hashlib.blake2b(salt.encode(), digest_size=16)
    for f in payload.frames:
        h.update(f)
    return h.hexdigest()


def funcname(func: Callable) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


def worker_names(workers) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        return [workers]
    return [str(w) for w in workers]


def collect_futures(obj: Any, out: list) -> None:
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            collect_futures(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            collect_futures(x, out)


def rebuild(obj: Any, values: dict) -> Any:
    if isinstance(obj, Future):
        return values.get(obj.key)
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        items = [rebuild(x, values) for x in obj if not (isinstance(x, Future) and x.key not in values)]
        return items if t is list else t(items)
    if t is dict:
        return {k: rebuild(v, values) for k, v in obj.items()}
    return obj
