"""Small helpers: byte and duration parsing, the collector pause used by bulk submissions."""

from __future__ import annotations

import gc
import threading

import pytest

from shoal.utils import format_bytes, gc_paused, parse_bytes, parse_resources, parse_seconds


def test_parse_bytes_and_seconds():
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5 GB") == 1_500_000_000
    assert parse_bytes(123) == 123
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")
    assert parse_seconds("30s") == 30.0 and parse_seconds("500ms") == 0.5 and parse_seconds("2m") == 120.0
    with pytest.raises(ValueError, match="duration"):
        parse_seconds("soon")
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert parse_resources("GPU=2,MEM=10e9") == {"GPU": 2.0, "MEM": 1e10}


def test_gc_paused_nests_and_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def test_gc_paused_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gc_paused_restores_after_an_error_and_as_a_decorator():
    @gc_paused()
    def build():
        assert not gc.isenabled()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build()
    assert gc.isenabled()


def test_gc_paused_counts_threads():
    inside, release = threading.Event(), threading.Event()

    def other():
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with gc_paused():
        pass
    assert not gc.isenabled()  # the other thread is still building
    release.set()
    t.join(10)
    assert gc.isenabled()
