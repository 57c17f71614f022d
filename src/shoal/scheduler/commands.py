"""What the scheduler core asks its reactor to do, grouped per destination."""

from __future__ import annotations

from ..protocol import messages as m


class Commands:
    """Orders produced by one ``handle()`` call.

    ``to_workers[wid]`` and ``to_clients[cid]`` are lists of wire messages to
    send, in order; ``close_workers`` lists ``(wid, reason)`` connections to
    shut.  Grouping happens here so the reactor does one send per peer.
    """

    __slots__ = ("to_workers", "to_clients", "close_workers", "_open")

    def __init__(self):
        self.to_workers: dict[int, list] = {}
        self.to_clients: dict[str, list] = {}
        self.close_workers: list[tuple[int, str]] = []
        # Per client: the KeysInMemory still taking entries (the last message
        # queued to it) and its address -> index table.
        self._open: dict[str, tuple] = {}

    def worker(self, wid: int, msg) -> None:
        lst = self.to_workers.get(wid)
        if lst is None:
            self.to_workers[wid] = [msg]
        else:
            lst.append(msg)

    def client(self, cid: str, msg) -> None:
        self._open.pop(cid, None)  # later results go in a new message: order is kept
        lst = self.to_clients.get(cid)
        if lst is None:
            self.to_clients[cid] = [msg]
        else:
            lst.append(msg)

    def in_memory(self, cid: str, key, tid: int, addresses: list, nbytes: int, type_name: str) -> None:
        """Tell client ``cid`` a result is held by workers at ``addresses``;
        consecutive results share one KeysInMemory message."""
        open_ = self._open.get(cid)
        if open_ is None:
            msg = m.KeysInMemory([], [], [], [], [], [])
            self.client(cid, msg)
            open_ = self._open[cid] = (msg, {})
        msg, index = open_
        hs = []
        for a in addresses:
            i = index.get(a)
            if i is None:
                i = index[a] = len(msg.addresses)
                msg.addresses.append(a)
            hs.append(i)
        msg.keys.append(key)
        msg.ids.append(tid)
        msg.holders.append(hs[0] if len(hs) == 1 else hs)
        msg.nbytes.append(nbytes)
        msg.type_names.append(type_name)

    def all_to_workers(self) -> list:
        return [m for msgs in self.to_workers.values() for m in msgs]

    def all_to_clients(self) -> list:
        return [m for msgs in self.to_clients.values() for m in msgs]

    def __repr__(self) -> str:
        return f"Commands(to_workers={self.to_workers!r}, to_clients={self.to_clients!r}, close_workers={self.close_workers!r})"
