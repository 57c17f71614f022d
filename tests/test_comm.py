"""Batched message connections (``shoal.comm``) over TCP and in-process.

pytest-asyncio is not used: every test is a plain function that runs its
coroutine with ``asyncio.run``.  Nothing sleeps a fixed time; every wait is on
a future or a queue, bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import numpy as np
import pytest

from shoal.comm import connect, listen, parse_address
from shoal.errors import CommClosedError, ProtocolError
from shoal.protocol import messages as m
from shoal.protocol.serialize import deserialize, serialize

TIMEOUT = 5.0
ADDRESSES = ["tcp://127.0.0.1:0", "inproc://"]
transports = pytest.mark.parametrize("address", ADDRESSES, ids=["tcp", "inproc"])


def run(coro):
    async def bounded():
        async with asyncio.timeout(3 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


async def within(aw):
    async with asyncio.timeout(TIMEOUT):
        return await aw


class Peer:
    """Records the batches one comm receives and how it closed."""

    def __init__(self, comm=None):
        self.batches: asyncio.Queue = asyncio.Queue()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.comm = None
        if comm is not None:
            self.attach(comm)

    def attach(self, comm) -> None:
        self.comm = comm
        comm.on_closed = self._on_closed
        comm.handler = self._on_msgs

    def _on_msgs(self, comm, msgs) -> None:
        self.batches.put_nowait(list(msgs))

    def _on_closed(self, comm, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    async def batch(self) -> list:
        return await within(self.batches.get())

    async def close_reason(self):
        return await within(asyncio.shield(self.closed))


@contextlib.asynccontextmanager
async def serving(address: str, **kw):
    """A listener whose accepted comms arrive, already recorded, on a queue."""
    accepted: asyncio.Queue = asyncio.Queue()

    def on_connect(comm):
        accepted.put_nowait(Peer(comm))

    listener = await listen(address, on_connect, m.ToWorker, **kw)
    try:
        yield listener, accepted
    finally:
        await listener.close()


@contextlib.asynccontextmanager
async def connected(address: str, **kw):
    """(listener, client Peer, server Peer) joined by one connection."""
    async with serving(address, **kw) as (listener, accepted):
        comm = await connect(listener.address, m.ToWorker)
        client = Peer(comm)
        server = None
        try:
            server = await within(accepted.get())
            yield listener, client, server
        finally:
            comm.abort()
            if server is not None and server.comm is not None:
                server.comm.abort()


def host_port(listener) -> tuple[str, int]:
    scheme, rest = parse_address(listener.address)
    assert scheme == "tcp"
    host, _, port = rest.rpartition(":")
    return host, int(port)


# -- exchanging batches ----------------------------------------------------------------


@transports
def test_messages_sent_in_one_iteration_arrive_as_one_batch(address):
    async def main():
        async with connected(address) as (_, client, server):
            first = [m.GetData(1, [1]), m.ReleaseData([2, 3]), m.CloseWorker("x")]
            for msg in first:
                client.comm.send(msg)
            assert await server.batch() == first

            client.comm.send_many([m.CancelTasks([4]), m.CancelTasks([5])])
            client.comm.send(m.GetData(2, []))
            assert await server.batch() == [m.CancelTasks([4]), m.CancelTasks([5]), m.GetData(2, [])]

            reply = [m.PeersChanged([m.PeerInfo(1, "tcp://a:1")], []), m.ReleaseData([9])]
            server.comm.send_many(reply)
            assert await client.batch() == reply

            assert server.batches.empty() and client.batches.empty()

    run(main())


@transports
def test_many_batches_keep_their_order(address):
    async def main():
        async with connected(address) as (_, client, server):
            got = []
            for i in range(50):
                client.comm.send(m.GetData(i, [i]))
                got.extend(await server.batch())
            assert got == [m.GetData(i, [i]) for i in range(50)]

    run(main())


@transports
def test_a_huge_burst_streams_out_complete_and_in_order(address):
    async def main():
        n = 12_000  # past the flush-early cap: may arrive as several batches
        async with connected(address) as (_, client, server):
            for i in range(n):
                client.comm.send(m.GetData(i, []))
            got: list = []
            while len(got) < n:
                got.extend(await server.batch())
            assert [msg.request_id for msg in got] == list(range(n))

    run(main())


@transports
def test_unencodable_message_does_not_silently_drop_its_batch(address):
    async def main():
        async with connected(address) as (_, client, server):
            raised = False
            try:
                client.comm.send(m.GetData(1, []))
                client.comm.send(m.Execute(2, object(), serialize(1), [0]))
                client.comm.send(m.GetData(3, []))
            except Exception:
                raised = True
            await asyncio.sleep(0)  # one loop iteration: the scheduled flush runs
            got: list = []
            if not client.comm.closed:
                client.comm.send(m.GetData(99, []))
                while m.GetData(99, []) not in got:
                    got.extend(await server.batch())
            told = raised or (client.comm.closed and client.comm.close_reason is not None)
            delivered = m.GetData(1, []) in got and m.GetData(3, []) in got
            assert told or delivered, got

    run(main())


@transports
def test_payload_frames_arrive_intact(address):
    async def main():
        rng = np.random.default_rng(0)
        noisy = rng.random(300_000)  # 2.4 MB, sent as is
        smooth = np.arange(500_000, dtype=np.int64) % 13  # compressed
        small = {"a": [1, 2, 3], "b": b"bytes"}
        msg = m.DataResponse(
            7, [1, 2, 3], [serialize(noisy), serialize(smooth), serialize(small)], [4], {5: "why"}
        )
        async with connected(address) as (_, client, server):
            client.comm.send(msg)
            (got,) = await server.batch()
            assert got == msg
            np.testing.assert_array_equal(deserialize(got.payloads[0]), noisy)
            np.testing.assert_array_equal(deserialize(got.payloads[1]), smooth)
            assert deserialize(got.payloads[2]) == small
            assert server.comm.bytes_received == client.comm.bytes_sent

    run(main())


@transports
def test_messages_before_a_handler_is_set_are_delivered_to_it(address):
    async def main():
        comms: asyncio.Queue = asyncio.Queue()
        listener = await listen(address, comms.put_nowait, m.ToWorker)
        try:
            client = await connect(listener.address, m.ToWorker)
            server_comm = await within(comms.get())
            client.send(m.GetData(1, [1]))
            client.send(m.GetData(2, [2]))
            # Let the bytes arrive before anyone handles them: wait until the
            # server comm has read the whole packet.
            async with asyncio.timeout(TIMEOUT):
                while server_comm.bytes_received < client.bytes_sent or client.bytes_sent == 0:
                    await asyncio.sleep(0)
            server = Peer(server_comm)  # sets the handler now
            assert await server.batch() == [m.GetData(1, [1]), m.GetData(2, [2])]
            client.abort()
            server_comm.abort()
        finally:
            await listener.close()

    run(main())


@transports
def test_close_flushes_queued_messages_then_closes_the_peer(address):
    async def main():
        async with connected(address) as (_, client, server):
            client.comm.send(m.CloseWorker("last words"))
            client.comm.close()
            assert client.comm.closed
            assert await server.batch() == [m.CloseWorker("last words")]
            assert await server.close_reason() is None
            await within(server.comm.wait_closed())
            await within(client.comm.wait_closed())
            with pytest.raises(CommClosedError):
                client.comm.send(m.GetData(1, []))
            with pytest.raises(CommClosedError):
                client.comm.send_many([m.GetData(1, [])])

    run(main())


@transports
def test_a_message_over_max_packet_closes_the_connection(address):
    async def main():
        async with connected(address, max_packet=200) as (_, client, server):
            client.comm.send(m.CloseWorker("small"))
            assert await server.batch() == [m.CloseWorker("small")]
            client.comm.send(m.CloseWorker("x" * 1000))
            assert isinstance(await server.close_reason(), ProtocolError)
            await within(client.comm.wait_closed())

    run(main())


@transports
def test_handler_raising_protocol_error_closes_that_connection(address):
    async def main():
        async with connected(address) as (_, client, server):
            def refuse(comm, msgs):
                raise ProtocolError("workers may not send that")

            server.comm.handler = refuse
            client.comm.send(m.GetData(1, []))
            reason = await server.close_reason()
            assert isinstance(reason, ProtocolError)
            assert "may not send" in str(reason)
            await within(client.comm.wait_closed())

    run(main())


@transports
def test_handler_bug_closes_the_connection_and_reports_it(address):
    async def main():
        async with connected(address) as (_, client, server):
            def buggy(comm, msgs):
                raise KeyError("oops")

            server.comm.handler = buggy
            client.comm.send(m.GetData(1, []))
            assert isinstance(await server.close_reason(), KeyError)
            await within(client.comm.wait_closed())

    run(main())


@transports
def test_deeply_nested_message_closes_the_connection_with_protocol_error(address):
    body = b"\x91\x95\x2a\x00" + b"\x91" * 5000 + b"\x00"
    bad = struct.pack("<IQ", 1, len(body)) + body

    async def main():
        async with connected(address) as (_, client, server):
            client.comm._write([bad])  # raw bytes, as a hostile peer would send
            client.comm.send(m.GetData(1, []))
            got = asyncio.ensure_future(server.batches.get())
            try:
                async with asyncio.timeout(TIMEOUT):
                    await asyncio.wait([got, server.closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                got.cancel()
            assert server.closed.done(), "connection still open after a malformed message"
            assert isinstance(server.closed.result(), ProtocolError), server.closed.result()

    run(main())


# -- hostile peers (TCP) -----------------------------------------------------------------


async def _expect_closed_by_server(reader: asyncio.StreamReader) -> None:
    """The server hangs up: EOF or a reset, promptly."""
    async with asyncio.timeout(TIMEOUT):
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            pass


HTTP = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # absurd frame count
        struct.pack("<IQ", 1, 3) + b"\xc1\xc1\xc1",  # well framed, not msgpack
        struct.pack("<IQ", 1, 2**62),  # absurd length
        HTTP,
    ],
    ids=["frame-count", "bad-msgpack", "huge-length", "http"],
)
def test_garbage_closes_that_connection_only(garbage):
    async def main():
        async with serving("tcp://127.0.0.1:0") as (listener, accepted):
            healthy = Peer(await connect(listener.address, m.ToWorker))
            healthy_server = await within(accepted.get())

            host, port = host_port(listener)
            reader, writer = await asyncio.open_connection(host, port)
            bad_server = await within(accepted.get())
            writer.write(garbage)
            await writer.drain()

            reason = await bad_server.close_reason()
            assert isinstance(reason, ProtocolError), reason
            await _expect_closed_by_server(reader)
            writer.close()
            assert bad_server.batches.empty()

            # The other connection on the same listener keeps working.
            healthy.comm.send(m.GetData(1, [1]))
            assert await healthy_server.batch() == [m.GetData(1, [1])]
            healthy_server.comm.send(m.ReleaseData([1]))
            assert await healthy.batch() == [m.ReleaseData([1])]
            assert not healthy.comm.closed and not healthy_server.comm.closed

            # ... and the listener still accepts new ones.
            fresh = Peer(await connect(listener.address, m.ToWorker))
            fresh_server = await within(accepted.get())
            fresh.comm.send(m.CloseWorker("hi"))
            assert await fresh_server.batch() == [m.CloseWorker("hi")]

            for p in (healthy, healthy_server, fresh, fresh_server):
                p.comm.abort()

    run(main())


def test_http_request_gets_no_reply_and_is_closed():
    async def main():
        async with serving("tcp://127.0.0.1:0") as (listener, accepted):
            host, port = host_port(listener)
            reader, writer = await asyncio.open_connection(host, port)
            server = await within(accepted.get())
            writer.write(HTTP)
            await writer.drain()
            assert isinstance(await server.close_reason(), ProtocolError)
            data = b""
            try:
                async with asyncio.timeout(TIMEOUT):
                    while chunk := await reader.read(65536):
                        data += chunk
            except ConnectionResetError:
                pass
            assert data == b""
            writer.close()

    run(main())


def test_peer_that_vanishes_mid_packet_closes_the_comm():
    async def main():
        async with serving("tcp://127.0.0.1:0") as (listener, accepted):
            host, port = host_port(listener)
            reader, writer = await asyncio.open_connection(host, port)
            server = await within(accepted.get())
            writer.write(struct.pack("<IQ", 1, 100) + b"\x91")  # 1 of 100 bytes
            await writer.drain()
            writer.close()
            await server.close_reason()
            assert server.comm.closed
            assert server.batches.empty()

    run(main())


# -- connecting --------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_to_a_closed_port_raises_comm_closed_error_promptly():
    async def main():
        port = _closed_port()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(CommClosedError, match=str(port)):
            await connect(f"tcp://127.0.0.1:{port}", m.ToWorker, timeout=TIMEOUT)
        assert loop.time() - start < 2.0

    run(main())


def test_connect_after_listener_closed_raises_comm_closed_error():
    async def main():
        async with serving("tcp://127.0.0.1:0") as (listener, _):
            address = listener.address
        with pytest.raises(CommClosedError):
            await connect(address, m.ToWorker, timeout=TIMEOUT)

        async with serving("inproc://") as (listener, _):
            address = listener.address
        with pytest.raises(CommClosedError):
            await connect(address, m.ToWorker)

    run(main())


def test_connect_to_unknown_inproc_name_raises_comm_closed_error():
    async def main():
        with pytest.raises(CommClosedError):
            await connect("inproc://nobody-listens-here", m.ToWorker)

    run(main())


def test_inproc_name_cannot_be_taken_twice():
    async def main():
        async with serving("inproc://taken-name") as (listener, _):
            assert listener.address == "inproc://taken-name"
            with pytest.raises(OSError):
                await listen("inproc://taken-name", lambda c: None, m.ToWorker)

    run(main())


def test_addresses():
    assert parse_address("tcp://1.2.3.4:5") == ("tcp", "1.2.3.4:5")
    assert parse_address("1.2.3.4:5") == ("tcp", "1.2.3.4:5")
    assert parse_address("inproc://x") == ("inproc", "x")

    async def main():
        with pytest.raises(ValueError, match="nope"):
            await connect("nope://x", m.ToWorker)
        with pytest.raises(ValueError, match="nope"):
            await listen("nope://x", lambda c: None, m.ToWorker)

    run(main())


@transports
def test_comm_addresses_are_filled_in(address):
    async def main():
        async with connected(address) as (listener, client, server):
            assert client.comm.peer_address == listener.address
            assert client.comm.local_address and server.comm.peer_address
            assert client.comm.local_address == server.comm.peer_address

    run(main())
