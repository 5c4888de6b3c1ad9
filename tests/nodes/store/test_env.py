"""One LMDB handle per environment per process (``Env.open``): LMDB refuses a second one
("already open in this process"), which is what the admin server of a several-process graph
met when a request and the chart's sampler opened the data dir at the same moment (a trace
answered 500)."""

from __future__ import annotations

import threading

import pytest

from nodes.store.db import Env

MAP_MB = 16


def test_threads_opening_and_closing_read_only_handles_share_one(tmp_path):
    Env.open(tmp_path, map_size_mb=MAP_MB).close()  # the environment exists
    errors: list[BaseException] = []
    handles: set[int] = set()

    def reader() -> None:
        for _ in range(200):
            try:
                env = Env.open(tmp_path, map_size_mb=MAP_MB, readonly=True)
                try:
                    handles.add(id(env))
                    with env.begin() as txn:
                        assert txn.stat(env.objects)["entries"] == 0
                finally:
                    env.close()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "an open hung"
    assert errors == []


def test_a_read_only_user_shares_the_writers_handle_and_its_close_leaves_it_open(tmp_path):
    writer = Env.open(tmp_path, map_size_mb=MAP_MB)
    try:
        reader = Env.open(tmp_path, map_size_mb=MAP_MB, readonly=True)
        assert reader is writer
        reader.close()
        with writer.begin(write=True) as txn:  # still open, still writable
            txn.put(b"probe", b"1", db=writer.meta)
        with writer.begin() as txn:
            assert txn.get(b"probe", db=writer.meta) == b"1"
    finally:
        writer.close()
    # The last user closed it: the next open is a fresh handle.
    again = Env.open(tmp_path, map_size_mb=MAP_MB, readonly=True)
    try:
        assert again is not writer and again.readonly
    finally:
        again.close()


def test_a_writable_open_waits_for_the_read_only_handles_users(tmp_path):
    Env.open(tmp_path, map_size_mb=MAP_MB).close()
    reader = Env.open(tmp_path, map_size_mb=MAP_MB, readonly=True)
    opened: list[Env] = []
    thread = threading.Thread(
        target=lambda: opened.append(Env.open(tmp_path, map_size_mb=MAP_MB)))
    thread.start()
    thread.join(timeout=0.3)
    assert thread.is_alive() and opened == []  # waits while the read-only handle is used
    reader.close()
    thread.join(timeout=10)
    assert len(opened) == 1
    writer = opened[0]
    try:
        assert writer is not reader and not writer.readonly
        with writer.begin(write=True) as txn:
            txn.put(b"probe", b"1", db=writer.meta)
    finally:
        writer.close()


def test_a_writable_open_gives_up_on_a_read_only_handle_never_closed(tmp_path, monkeypatch):
    from nodes.store import db

    monkeypatch.setattr(db, "OPEN_WAIT_S", 0.2)
    Env.open(tmp_path, map_size_mb=MAP_MB).close()
    reader = Env.open(tmp_path, map_size_mb=MAP_MB, readonly=True)
    try:
        with pytest.raises(db.lmdb.Error, match="held read-only in this process"):
            Env.open(tmp_path, map_size_mb=MAP_MB)
    finally:
        reader.close()
