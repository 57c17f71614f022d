"""The sans-IO wire: message structs, packet framing and user payloads."""

from __future__ import annotations

import pickle
import struct
import threading

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.errors import ProtocolError, SerializationError
from shoal.protocol import messages as m
from shoal.protocol.framing import INLINE_MAX, PAYLOAD_EXT, PacketReader, PacketWriter
from shoal.protocol.serialize import (
    _LZ4,
    _RAW,
    Payload,
    RemoteException,
    deserialize,
    serialize,
    serialize_exception,
    sizeof,
)

P1 = Payload([b"one frame"])
P3 = Payload([b"head", b"buffer-1", bytearray(b"buffer-2")])

# One instance of every message, with every field set to a non-default value.
SAMPLES = [
    m.RegisterWorker("w-1", "tcp://10.0.0.1:4000", 8, 2**34, {"GPU": 1.0}, 1234, 2),
    m.RegisterClient("client-abc", "my client", 3),
    m.PeerHello("peer", 2),
    m.PeerHello("worker", 1, "tcp://127.0.0.1:4000"),
    m.SubmitGraph(
        [
            m.TaskSpec("a", [], P1, 3, 5, 2, ["w-1"], True, {"GPU": 0.5}, True, "tok"),
            m.TaskSpec("b", ["a"], P3),
        ],
        ["b"],
        {"tok": P3},
    ),
    m.ReleaseKeys(["a", "b"]),
    m.CancelKeys(["c"]),
    m.ClientHeartbeat(),
    m.CloseClient(),
    m.RetireWorkers(7, ["w-1", "tcp://x:1"], False),
    m.RequestInfo(8),
    m.RequestInfo(9, validate=True),
    m.ResumeClient(["a", ["t", 1]]),
    m.Welcome("sched-1", ["tcp://a:1"]),
    m.KeysInMemory(["k", "j"], [12, 13], [[0], [0, 1]], ["tcp://a:1", "tcp://b:2"], [100, 8], ["ndarray", "int"]),
    m.KeyErred("k", P1, "Traceback ...", "blamed-key"),
    m.KeysCancelled(["k"], "client asked"),
    m.KeysLost(["k"], "holder died"),
    m.GraphRejected(["k"], "cycle"),
    m.WorkersChanged(["tcp://b:2"], ["tcp://a:1"]),
    m.RequestDone(7, "nope"),
    m.Info(8, {"tasks": 3, "nested": {"a": [1, 2]}, "name": "s"}),
    m.TaskFinished(3, 1000, "int", 0.25),
    m.TaskErred(3, P1, "Traceback ..."),
    m.DataAcquired([1, 2], [10, 20]),
    m.DataMissing(4, 2, True),
    m.WorkerHeartbeat(2**33, 3, 4),
    m.WorkerHeartbeat(2**33, 3, 4, 2**30, 2**31, 7, 2**34, 2**33 + 1),
    m.WorkerPaused(2**32),
    m.WorkerResumed(2**31),
    m.TasksCancelled([1, 2], [3]),
    m.TasksRejected([5, 6]),
    m.TasksStolen([5], [6]),
    m.TasksStarted([7, 8]),
    m.WorkerClosing("stopped by signal"),
    m.WorkerWelcome(3, [m.PeerInfo(1, "tcp://a:1"), m.PeerInfo(2, "tcp://b:2")]),
    m.PeersChanged([m.PeerInfo(4, "tcp://c:3")], [1]),
    m.Execute(9, "key-9", P3, [1, -2, 3], [1, 2], ["d1", "d2"], [[1], [2, 3]], 7),
    m.DefineFunction(1, P3, "tok"),
    m.ReleaseFunctions([1, 2]),
    m.ReleaseData([1, 2]),
    m.CancelTasks([3]),
    m.CloseWorker("bye"),
    m.AcquireData([1, 2], ["k1", "k2"], [[3], [3, 4]]),
    m.DrainWorker(),
    m.StealTasks([3, 4]),
    m.GetData(11, [1, 2, 3]),
    m.DataResponse(11, [1, 2], [P1, P3], [3], {4: "cannot pickle"}),
    m.DataResponse(12, [], [], busy=True),
]

UNIONS = {"ToScheduler": m.ToScheduler, "ToWorker": m.ToWorker, "ToClient": m.ToClient}


def _union_members(u) -> tuple:
    return u.__args__


def union_for(msg):
    for u in UNIONS.values():
        if type(msg) in _union_members(u):
            return u
    raise AssertionError(f"{type(msg).__name__} is in no union")


def _all_message_types() -> set:
    out, stack = set(), [m.Msg]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            out.add(sub)
            stack.append(sub)
    return out


def roundtrip(msgs: list, msg_type) -> list:
    frames = PacketWriter().encode(msgs)
    return PacketReader(msg_type).feed(b"".join(bytes(f) for f in frames))


def packet(*frames: bytes, count: int | None = None) -> bytes:
    n = len(frames) if count is None else count
    return struct.pack("<I", n) + b"".join(struct.pack("<Q", len(f)) for f in frames) + b"".join(frames)


def reader(**kw) -> PacketReader:
    return PacketReader(m.ToWorker, **kw)


# -- round trips -------------------------------------------------------------------


def test_samples_cover_every_message_type():
    assert {type(s) for s in SAMPLES} == _all_message_types()


def test_every_message_type_is_in_a_union():
    members = set()
    for u in UNIONS.values():
        members.update(_union_members(u))
    assert _all_message_types() <= members


def test_tags_are_unique_within_each_union():
    for name, u in UNIONS.items():
        tags = [t.__struct_config__.tag for t in _union_members(u)]
        assert len(tags) == len(set(tags)), name


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_every_message_round_trips(msg):
    assert roundtrip([msg], union_for(msg)) == [msg]


@pytest.mark.parametrize("name", list(UNIONS))
def test_a_whole_union_round_trips_in_one_packet(name):
    u = UNIONS[name]
    msgs = [s for s in SAMPLES if type(s) in _union_members(u)]
    assert roundtrip(msgs, u) == msgs


def test_defaults_are_filled_in():
    (msg,) = roundtrip([m.Execute(1, "k", P1, [0])], m.ToWorker)
    assert msg.deps == [] and msg.dep_keys == [] and msg.who_has == []


def test_byte_by_byte_feeding_yields_messages_only_when_complete():
    msgs = [s for s in SAMPLES if type(s) in _union_members(m.ToWorker)]
    data = b"".join(bytes(f) for f in PacketWriter().encode(msgs))
    r = reader()
    for i in range(len(data) - 1):
        assert r.feed(data[i : i + 1]) == [], i
    assert r.feed(data[-1:]) == msgs


def test_several_packets_in_one_feed_and_a_partial_one():
    w = PacketWriter()
    batches = [[m.GetData(i, [i, i + 1])] * (i + 1) for i in range(5)]
    data = b"".join(bytes(f) for b in batches for f in w.encode(b))
    extra = b"".join(bytes(f) for f in w.encode([m.CloseWorker("later")]))
    r = reader()
    out = r.feed(data + extra[:7])
    assert out == [msg for b in batches for msg in b]
    assert r.feed(extra[7:]) == [m.CloseWorker("later")]


def test_packets_split_at_every_offset():
    w = PacketWriter()
    one = b"".join(bytes(f) for f in w.encode([m.Execute(1, "k", P3, [0])]))
    two = b"".join(bytes(f) for f in w.encode([m.ReleaseData([1])]))
    data = one + two
    for cut in range(len(data) + 1):
        r = reader()
        got = r.feed(data[:cut]) + r.feed(data[cut:])
        assert got == [m.Execute(1, "k", P3, [0]), m.ReleaseData([1])], cut


def test_tuple_keys_survive_via_as_key():
    key = ("x", 1, ("y", 2.5, ()))
    (msg,) = roundtrip(
        [m.Execute(1, key, P1, [0], [2], [("dep", 0)], [[1]])], m.ToWorker
    )
    assert msg.key != key  # msgpack has no tuples ...
    assert m.as_key(msg.key) == key  # ... as_key restores them
    assert m.as_key(msg.dep_keys[0]) == ("dep", 0)
    assert hash(m.as_key(msg.key)) == hash(key)
    (sub,) = roundtrip([m.SubmitGraph([m.TaskSpec(key, [("a", 1)], P1)], [key])], m.ToScheduler)
    assert m.as_key(sub.tasks[0].key) == key
    assert m.as_key(sub.wanted[0]) == key
    assert [m.as_key(d) for d in sub.tasks[0].deps] == [("a", 1)]


def test_as_key_leaves_scalars_alone():
    for k in ["s", 3, 2.5, ("t",)]:
        assert m.as_key(k) == k


# -- out-of-band payloads ------------------------------------------------------------


def test_payload_frames_travel_out_of_band():
    big = Payload([b"x" * (INLINE_MAX + 1)])
    w = PacketWriter()
    frames = w.encode([m.DataResponse(1, [1, 2, 3], [P3, big, P1])])
    header, body, *oob = frames
    (n,) = struct.unpack_from("<I", header)
    assert n == 1 + len(P3.frames) + 1
    for f in P3.frames:
        assert bytes(f) not in body
    assert [bytes(f) for f in oob] == [bytes(f) for f in P3.frames + big.frames]
    # A small single-frame payload rides inside frame 0 instead.
    assert bytes(P1.frames[0]) in body
    (msg,) = PacketReader(m.ToWorker).feed(b"".join(bytes(f) for f in frames))
    assert msg.payloads == [P3, big, P1]


def test_packet_of_small_payloads_is_two_buffers():
    specs = [m.TaskSpec(f"k{i}", [], Payload([b"args%d" % i])) for i in range(1000)]
    frames = PacketWriter().encode([m.SubmitGraph(specs, ["k0"])])
    assert len(frames) == 2
    (msg,) = PacketReader(m.ToScheduler).feed(b"".join(bytes(f) for f in frames))
    assert [t.run_spec for t in msg.tasks] == [s.run_spec for s in specs]


def test_large_numpy_payload_is_not_copied_into_frame_zero():
    rng = np.random.default_rng(0)
    arr = rng.random(500_000)  # 4 MB, incompressible
    payload = serialize(arr)
    frames = PacketWriter().encode([m.Execute(1, "k", payload, [0])])
    header, body = frames[0], frames[1]
    assert len(body) < 1000
    assert len(header) < 1000
    big = [f for f in frames[2:] if memoryview(f).nbytes >= arr.nbytes]
    assert len(big) == 1
    # zero copy: the frame is a view of the array's own memory
    assert np.shares_memory(np.frombuffer(big[0], dtype=np.uint8), arr)

    (msg,) = PacketReader(m.ToWorker).feed(b"".join(bytes(f) for f in frames))
    np.testing.assert_array_equal(deserialize(msg.run_spec), arr)


def test_lz4_compression_of_large_compressible_buffers_round_trips():
    arr = np.arange(1_000_000, dtype=np.int64) % 7
    payload = serialize(arr)
    assert len(payload.frames) == 3
    assert bytes(payload.frames[1]) == bytes([_LZ4])
    assert payload.nbytes < arr.nbytes // 4
    np.testing.assert_array_equal(deserialize(payload), arr)
    # ... and through the framing layer
    (msg,) = roundtrip([m.Execute(1, "k", payload, [0])], m.ToWorker)
    np.testing.assert_array_equal(deserialize(msg.run_spec), arr)


def test_small_or_incompressible_buffers_are_not_compressed():
    small = np.zeros(100)
    noisy = np.random.default_rng(1).integers(0, 2**63, 100_000, dtype=np.int64)
    for arr in (small, noisy):
        payload = serialize(arr)
        assert bytes(payload.frames[1]) == bytes([_RAW])
        assert memoryview(payload.frames[2]).nbytes == arr.nbytes
        np.testing.assert_array_equal(deserialize(payload), arr)


def test_raw_buffer_that_starts_like_the_lz4_marker_round_trips():
    arr = np.frombuffer(b"\x00lz4" + bytes(range(200)), dtype=np.uint8)
    np.testing.assert_array_equal(deserialize(serialize(arr)), arr)


# -- malformed input ------------------------------------------------------------------


def body_of(obj) -> bytes:
    return msgspec.msgpack.encode(obj)


def test_garbage_msgpack_raises_protocol_error():
    with pytest.raises(ProtocolError):
        reader().feed(packet(b"\xc1\xc1\xc1"))


def test_truncated_msgpack_in_a_complete_frame_raises_protocol_error():
    good = body_of([[45, "bye"]])
    with pytest.raises(ProtocolError):
        reader().feed(packet(good[:-1]))


def test_empty_frame_zero_raises_protocol_error():
    with pytest.raises(ProtocolError):
        reader().feed(packet(b""))


def test_body_that_is_not_a_list_raises_protocol_error():
    with pytest.raises(ProtocolError):
        reader().feed(packet(body_of({"a": 1})))


def test_unknown_tag_raises_protocol_error():
    with pytest.raises(ProtocolError):
        reader().feed(packet(body_of([[99, "x"]])))


def test_message_of_another_direction_raises_protocol_error():
    # Welcome is scheduler -> client; a worker must refuse it.
    data = b"".join(bytes(f) for f in PacketWriter().encode([m.Welcome("s", [])]))
    with pytest.raises(ProtocolError):
        reader().feed(data)


@pytest.mark.parametrize(
    "body",
    [
        [[45, 12]],  # CloseWorker.reason must be a str
        [[43, "not a list"]],  # ReleaseData.ids
        [[43, ["a"]]],  # ReleaseData.ids items must be ints
        [[40, 1]],  # WorkerWelcome missing a field
        [[50, "x", [1]]],  # GetData.request_id must be an int
        [[42, 1, "k", 5, [0]]],  # Execute.run_spec must be a payload, got an int
    ],
)
def test_wrong_field_types_raise_protocol_error(body):
    with pytest.raises(ProtocolError):
        reader().feed(packet(body_of(body)))


def test_protocol_error_names_what_was_wrong():
    with pytest.raises(ProtocolError, match="str"):
        reader().feed(packet(body_of([[45, 12]])))


@pytest.mark.parametrize("count", [0, 2**20 + 1, 2**32 - 1])
def test_absurd_frame_count_raises_protocol_error(count):
    # Only the 4-byte count is sent: the reader must not wait for more.
    with pytest.raises(ProtocolError):
        reader().feed(struct.pack("<I", count))


def test_max_frames_is_configurable():
    data = packet(body_of([[45, "x"]]), b"a", b"b")
    assert reader(max_frames=3).feed(data) == [m.CloseWorker("x")]
    with pytest.raises(ProtocolError):
        reader(max_frames=2).feed(data)


def test_absurd_length_prefix_raises_protocol_error_before_the_data_arrives():
    header = struct.pack("<IQ", 1, 2**63)
    with pytest.raises(ProtocolError):
        reader().feed(header)


def test_length_sum_above_max_packet_raises_protocol_error():
    # Two frames each under the limit, but the packet is over it.
    header = struct.pack("<IQQ", 2, 600, 600)
    with pytest.raises(ProtocolError):
        reader(max_packet=1000).feed(header)


def test_max_packet_is_configurable():
    body = body_of([[45, "x" * 500]])
    assert reader(max_packet=len(body)).feed(packet(body)) == [m.CloseWorker("x" * 500)]
    with pytest.raises(ProtocolError):
        reader(max_packet=len(body) - 1).feed(packet(body))


def _ext(start: int, count: int, code: int = PAYLOAD_EXT, raw: bytes | None = None):
    return msgspec.msgpack.Ext(code, struct.pack("<II", start, count) if raw is None else raw)


@pytest.mark.parametrize(
    "ext",
    [
        _ext(5, 1),  # past the last frame
        _ext(1, 2),  # runs past the last frame
        _ext(0, 1),  # frame 0 is the message body itself
        _ext(1, 0),  # an empty payload
        _ext(2**32 - 1, 2),  # overflow-ish
        _ext(1, 1, code=7),  # unknown extension type
        _ext(0, 0, raw=b"\x01\x00\x00\x00"),  # wrong size
    ],
    ids=["past-end", "runs-past-end", "frame-zero", "count-zero", "huge", "unknown-code", "short"],
)
def test_bad_payload_placeholder_raises_protocol_error(ext):
    body = body_of([[42, 1, "k", ext, [0]]])
    with pytest.raises(ProtocolError):
        reader().feed(packet(body, b"only-oob-frame"))


def test_valid_handmade_payload_placeholder_decodes():
    body = body_of([[42, 1, "k", _ext(1, 2), [0]]])
    (msg,) = reader().feed(packet(body, b"f1", b"f2"))
    assert msg.run_spec == Payload([b"f1", b"f2"])


def test_payload_placeholder_in_a_non_payload_field_raises_protocol_error():
    body = body_of([[43, [_ext(1, 1)]]])  # ReleaseData.ids: list[int]
    with pytest.raises(ProtocolError):
        reader().feed(packet(body, b"x"))


@pytest.mark.parametrize("cut", [1, 3, 4, 11, 12, 20, -1])
def test_truncated_input_yields_nothing_until_complete(cut):
    data = b"".join(bytes(f) for f in PacketWriter().encode([m.Execute(1, "k", P3, [0])]))
    cut = cut % len(data)
    r = reader()
    assert r.feed(data[:cut]) == []
    assert r.feed(b"") == []
    assert r.feed(data[cut:]) == [m.Execute(1, "k", P3, [0])]


def test_deeply_nested_key_raises_protocol_error():
    depth = 5000
    # [[42, 0, [[[...0...]]], ...]]: an Execute whose key nests `depth` lists
    body = b"\x91\x95\x2a\x00" + b"\x91" * depth + b"\x00"
    with pytest.raises(ProtocolError):
        reader().feed(packet(body))


# -- fuzzing ---------------------------------------------------------------------------


def _feed_all(r: PacketReader, chunks) -> None:
    try:
        for c in chunks:
            r.feed(c)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_decode_or_raise_protocol_error(chunks):
    _feed_all(reader(max_packet=1 << 16), chunks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.binary(max_size=16), max_size=3))
def test_arbitrary_frame_zero_decodes_or_raises_protocol_error(body, oob):
    # A well-formed header, so the fuzzing reaches the msgpack decoder.
    _feed_all(reader(), [packet(body, *oob)])


_VALID = b"".join(
    bytes(f)
    for f in PacketWriter().encode([s for s in SAMPLES if type(s) in _union_members(m.ToWorker)])
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_valid_packets_decode_or_raise_protocol_error(flips):
    data = bytearray(_VALID)
    for pos, val in flips:
        data[pos] = val
    _feed_all(reader(), [bytes(data)])


# -- serialize / deserialize -------------------------------------------------------------


class _Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


class _NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")

    def __reduce__(self):
        # Explicit, so that libraries patching exception pickling (tblib, which
        # distributed installs) cannot make it rebuildable.
        return type(self), (self.args[0],)


def test_serialize_round_trips_plain_objects():
    obj = {"a": [1, 2.5, None], "b": ("x", b"bytes"), 3: {4, 5}}
    payload = serialize(obj)
    assert len(payload.frames) == 1
    assert deserialize(payload) == obj


def test_serialize_falls_back_to_cloudpickle_for_lambdas():
    offset = 10
    f = lambda x: x + offset  # noqa: E731
    with pytest.raises(Exception):
        pickle.dumps(f)
    g = deserialize(serialize(f))
    assert g(5) == 15


def test_serialize_unpicklable_raises_serialization_error_naming_what():
    with pytest.raises(SerializationError, match="my argument"):
        serialize(threading.Lock(), what="my argument")


def test_deserialize_garbage_raises_serialization_error():
    with pytest.raises(SerializationError, match="result"):
        deserialize(Payload([b"not a pickle"]), what="result")


def test_serialize_exception_keeps_a_picklable_exception():
    try:
        raise KeyError("missing")
    except KeyError as e:
        payload, tb = serialize_exception(e)
    exc = deserialize(payload)
    assert type(exc) is KeyError and exc.args == ("missing",)
    assert "KeyError" in tb and "test_serialize_exception_keeps" in tb




def test_serialize_exception_of_unpicklable_exception_gives_remote_exception():
    try:
        raise _Unpicklable("the reason")
    except _Unpicklable as e:
        payload, tb = serialize_exception(e)
    exc = deserialize(payload)
    assert isinstance(exc, RemoteException)
    assert exc.type_name == "_Unpicklable"
    assert "the reason" in str(exc)
    assert "_Unpicklable" in tb


def test_serialize_exception_that_cannot_be_rebuilt_gives_remote_exception():
    payload, _ = serialize_exception(_NeedsTwoArgs("x", "y"))
    exc = deserialize(payload)
    assert isinstance(exc, RemoteException)
    assert exc.type_name == "_NeedsTwoArgs"
    assert "x/y" in str(exc)


def test_serialize_exception_of_unpicklable_exception_returns_a_payload_and_traceback():
    # The part of the fallback that works today: no exception escapes.
    try:
        raise _Unpicklable("the reason")
    except _Unpicklable as e:
        payload, tb = serialize_exception(e)
    assert isinstance(payload, Payload)
    assert "_Unpicklable" in tb and "the reason" in tb


def test_remote_exception_pickles():
    exc = pickle.loads(pickle.dumps(RemoteException("ValueError", "bad value")))
    assert exc.type_name == "ValueError" and exc.text == "bad value"


def test_payload_equality_and_nbytes():
    assert Payload([b"ab", bytearray(b"c")]) == Payload([memoryview(b"ab"), b"c"])
    assert Payload([b"ab"]) != Payload([b"ab", b""])
    assert Payload([b"ab", b"cde"]).nbytes == 5


# -- sizeof ----------------------------------------------------------------------------


def test_sizeof_bytes_and_strings():
    assert 1000 <= sizeof(b"x" * 1000) < 1200
    assert 1000 <= sizeof(bytearray(1000)) < 1200
    assert 1000 <= sizeof("y" * 1000) < 1200


def test_sizeof_numpy_uses_nbytes():
    arr = np.zeros((100, 100))
    assert sizeof(arr) == arr.nbytes
    view = arr[::2]
    assert sizeof(view) == view.nbytes


def test_sizeof_containers_scale_with_contents():
    item = b"z" * 1000
    small = sizeof([item] * 10)
    big = sizeof([item] * 10_000)
    assert 10 * 1000 <= small < 20 * 1000
    assert 10_000 * 1000 <= big < 20_000 * 1000
    assert sizeof({i: item for i in range(100)}) >= 100 * 1000
    assert sizeof((item, item)) >= 2000
    assert sizeof([]) > 0 and sizeof({}) > 0
    assert sizeof(12) > 0 and sizeof(None) > 0


def test_sizeof_samples_containers_instead_of_walking_them():
    seen = []

    class Counted:
        @property
        def nbytes(self):
            seen.append(1)
            return 100

    items = [Counted() for _ in range(100_000)]
    size = sizeof(items)
    assert len(seen) <= 16
    assert size >= 100_000 * 100
