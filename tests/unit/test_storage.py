"""One contract test for every Store: RocksDB and its in-memory twin behave alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potboiler.server.storage import MemoryStore, RocksStore, Store, clear, clearing, prefix_end


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else RocksStore(tmp_path / "db")
    yield s
    s.close()


def test_get_missing_is_none(store: Store) -> None:
    assert store.get(b"nope") is None


def test_batch_puts_and_deletes(store: Store) -> None:
    store.write([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    store.write([(b"b", None), (b"a", b"9"), (b"zz", None)], sync=True)
    assert store.get(b"a") == b"9"
    assert store.get(b"b") is None
    assert list(store.scan(b"", b"\xff")) == [(b"a", b"9"), (b"c", b"3")]


def test_sync_keeps_what_was_written(store: Store) -> None:
    store.write([(b"a", b"1")])
    store.sync()
    assert store.get(b"a") == b"1"


def test_clear_deletes_every_key_a_chunk_at_a_time(store: Store) -> None:
    store.write([(bytes([c]) + bytes([i]), b"v") for c in b"acsz" for i in range(10)])
    clear(store, chunk=3)
    assert list(store.scan(b"", b"\xff")) == []
    assert not clearing(store)
    store.write([(b"k", b"after")])
    assert store.get(b"k") == b"after"


def test_a_clear_cut_short_says_so_until_one_finishes(store: Store) -> None:
    store.write([(bytes([c]) + bytes([i]), b"v") for c in b"acsz" for i in range(10)])

    class PowerCut(Exception):
        pass

    writes = 0
    write = store.write

    def failing_write(batch: Any, *, sync: bool = False) -> None:
        nonlocal writes
        writes += 1
        if writes == 3:  # the mark, the first chunk, then the cut
            raise PowerCut
        write(batch, sync=sync)

    with pytest.raises(PowerCut):
        clear(cast(Store, SimpleNamespace(write=failing_write, scan=store.scan)), chunk=3)
    assert clearing(store)
    assert list(store.scan(b"a", b"\xff"))  # keys left over
    clear(store)
    assert not clearing(store)
    assert list(store.scan(b"", b"\xff")) == []


def test_writes_of_one_key_in_a_batch_apply_in_their_order(store: Store) -> None:
    store.write([(b"k", b"1"), (b"a", b"x"), (b"k", None), (b"b", b"y"), (b"k", b"3"), (b"j", b"1")])
    store.write([(b"j", None), (b"j", b"2"), (b"a", b"z"), (b"a", None)])
    assert list(store.scan(b"", b"\xff")) == [(b"b", b"y"), (b"j", b"2"), (b"k", b"3")]


def test_scan_is_ordered_bounded_and_limited(store: Store) -> None:
    store.write([(bytes([i]), bytes([i])) for i in range(50, 0, -1)])
    assert [k[0] for k, _ in store.scan(bytes([10]), bytes([15]))] == [10, 11, 12, 13, 14]
    assert [k[0] for k, _ in store.scan(bytes([10]), bytes([40]), limit=3)] == [10, 11, 12]
    assert list(store.scan(bytes([60]), bytes([70]))) == []


def test_last(store: Store) -> None:
    assert store.last(b"x/", prefix_end(b"x/")) is None
    store.write([(b"w/9", b""), (b"x/1", b"a"), (b"x/2", b"b"), (b"y/0", b"")])
    assert store.last(b"x/", prefix_end(b"x/")) == (b"x/2", b"b")
    assert store.last(b"x/", b"x/2") == (b"x/1", b"a")
    assert store.last(b"v/", b"w/") is None


def test_prefix_end() -> None:
    assert prefix_end(b"ab") == b"ac"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") > b"\xff\xff\xff"[:1]


def test_rocks_store_is_durable_across_reopen(tmp_path: Path) -> None:
    s = RocksStore(tmp_path / "db")
    s.write([(b"k", b"v")])
    s.close()
    s = RocksStore(tmp_path / "db")
    assert s.get(b"k") == b"v"
    s.close()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(min_size=1, max_size=3), st.one_of(st.none(), st.binary(max_size=3))),
        max_size=30,
    ),
    st.binary(max_size=2),
    st.binary(max_size=2),
)
def test_memory_and_rocks_agree(tmp_path_factory: pytest.TempPathFactory, writes, start, end) -> None:  # type: ignore[no-untyped-def]
    rocks = RocksStore(tmp_path_factory.mktemp("agree"))
    mem = MemoryStore()
    try:
        for s in (rocks, mem):
            s.write(writes)
        assert list(rocks.scan(start, end)) == list(mem.scan(start, end))
        assert rocks.last(start, end) == mem.last(start, end)
    finally:
        rocks.close()


def test_a_store_held_by_another_is_an_os_error_that_says_so(tmp_path: Path) -> None:
    held = RocksStore(tmp_path / "db")
    try:
        with pytest.raises(OSError, match="in use by another process"):
            RocksStore(tmp_path / "db")
    finally:
        held.close()
