"""What the scheduler core asks its reactor to do, grouped per destination."""

from __future__ import annotations


class Commands:
    """Orders produced by one ``handle()`` call.

    ``to_workers[wid]`` and ``to_clients[cid]`` are lists of wire messages to
    send, in order; ``close_workers`` lists ``(wid, reason)`` connections to
    shut.  Grouping happens here so the reactor does one send per peer.
    """

    __slots__ = ("to_workers", "to_clients", "close_workers")

    def __init__(self):
        self.to_workers: dict[int, list] = {}
        self.to_clients: dict[str, list] = {}
        self.close_workers: list[tuple[int, str]] = []

    def worker(self, wid: int, msg) -> None:
        lst = self.to_workers.get(wid)
        if lst is None:
            self.to_workers[wid] = [msg]
        else:
            lst.append(msg)

    def client(self, cid: str, msg) -> None:
        lst = self.to_clients.get(cid)
        if lst is None:
            self.to_clients[cid] = [msg]
        else:
            lst.append(msg)

    def all_to_workers(self) -> list:
        return [m for msgs in self.to_workers.values() for m in msgs]

    def all_to_clients(self) -> list:
        return [m for msgs in self.to_clients.values() for m in msgs]

    def __repr__(self) -> str:
        return f"Commands(to_workers={self.to_workers!r}, to_clients={self.to_clients!r}, close_workers={self.close_workers!r})"
