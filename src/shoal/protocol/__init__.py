"""The sans-IO wire: typed messages, packet framing and user payloads."""

from .framing import PacketReader, PacketWriter
from .serialize import Payload, deserialize, serialize

__all__ = ["PacketReader", "PacketWriter", "Payload", "serialize", "deserialize"]
