"""The ingest journal file: durable appends, torn tails, numbering across resets, the lock,
and the room it leaves (src/nodes/store/journal.py). Store-level behaviour (acknowledged
before LMDB, replay at open): test_journal_store.py."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nodes.store import journal as jf
from nodes.store.journal import (CHUNK, DATA_START, Journal, JournalBusy, JournalFull, Record,
                                 RecordTooLarge)
from support.storenodes import envelope


def record(uid: str, size: int = 100, spool: str = "") -> Record:
    return Record(envelope(uid), f"{len(uid):064x}", size, os.urandom(size) if not spool else None,
                  spool, "k1", 1_700_000_000.0)


def fresh(path, capacity: int = 64 << 20, applied: int = 0) -> Journal:
    journal = Journal(path, capacity)
    found, last = journal.resume(applied)
    journal.reset(max(applied, last))
    return journal


def reopen(path, applied: int = 0) -> tuple[list[tuple[int, Record]], int]:
    journal = Journal(path, 64 << 20)
    try:
        return journal.resume(applied)
    finally:
        journal.close()


def test_records_read_back_in_order_after_a_reopen_as_written(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path)
    written = [record(f"1.2.{i}", 50 + i) for i in range(20)]
    seqs = [journal.append(r, 1.0) for r in written]
    journal.close()  # as a crash would leave it: nothing taken in, no reset
    assert seqs == list(range(1, 21))
    found, last = reopen(path)
    assert last == 20 and [s for s, _ in found] == seqs
    assert [r for _, r in found] == written
    assert reopen(path, applied=15)[0] == list(zip(seqs[15:], written[15:]))
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_torn_last_record_is_not_read_and_its_number_is_written_again(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path)
    for i in range(3):
        journal.append(record(f"1.2.{i}"), 1.0)
    journal.close()
    data = bytearray(path.read_bytes())
    ends = [end for _, end, _ in jf.records(bytes(data))]
    data[ends[2] - 5] ^= 0xFF  # the last record's body: a torn write
    path.write_bytes(bytes(data))
    found, last = reopen(path)
    assert [s for s, _ in found] == [1, 2] and last == 2
    journal = Journal(path, 64 << 20)
    found, last = journal.resume(0)
    journal.reset(last)  # what the Store does once LMDB holds 1 and 2
    again = record("1.2.99")
    assert journal.append(again, 1.0) == 3
    journal.close()
    assert reopen(path, applied=2)[0] == [(3, again)]


def test_after_a_reset_older_records_are_never_read_as_new(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path)
    for i in range(5):
        journal.append(record(f"1.2.{i}", 400), 1.0)
    journal.applied_up_to(5)
    journal.reset(5)
    newer = record("1.3.1", 10)  # shorter than what it overwrites: old bytes follow it
    assert journal.append(newer, 1.0) == 6
    journal.close()
    found, last = reopen(path, applied=5)
    assert found == [(6, newer)] and last == 6
    assert jf.read_base(path.read_bytes()) == 6


def test_a_bad_header_reads_as_empty_and_restarts_after_what_lmdb_holds(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path)
    journal.append(record("1.2.1"), 1.0)
    journal.close()
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    assert reopen(path) == ([], 0)
    journal = fresh(path, applied=41)  # LMDB says 41 were taken in from this journal
    assert journal.append(record("1.2.2"), 1.0) == 42  # never a number at or below 41
    journal.close()


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path):
    path = tmp_path / "ingest-0.journal"
    first = fresh(path)
    with pytest.raises(JournalBusy):
        Journal(path, 64 << 20)
    started = time.monotonic()
    with pytest.raises(JournalBusy):
        Journal(path, 64 << 20, wait_s=0.3)
    assert time.monotonic() - started >= 0.3
    threading.Timer(0.2, first.close).start()
    second = Journal(path, 64 << 20, wait_s=10)  # taken once the first closes
    second.close()


def test_the_file_stays_within_its_capacity_starting_over_once_lmdb_holds_it_all(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path, capacity=DATA_START + CHUNK)
    sizes = set()
    for i in range(200):  # 200 x 100 KB = 20 MB through a 1 MiB journal
        seq = journal.append(record(f"1.2.{i}", 100_000), 1.0)
        assert seq == i + 1
        journal.applied_up_to(seq)
        sizes.add(os.path.getsize(path))
    journal.close()
    assert max(sizes) <= DATA_START + CHUNK
    found, last = reopen(path, applied=200)
    assert found == [] and 190 < last <= 200  # the records since the last start-over


def test_a_full_journal_waits_for_lmdb_then_refuses_within_the_time_allowed(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path, capacity=DATA_START + 4 * CHUNK)
    n = 0
    with pytest.raises(JournalFull):
        while True:  # nothing taken in: the journal fills
            journal.append(record(f"1.2.{n}", 250_000), 0.2)
            n += 1
    assert 10 < n <= 4 * CHUNK // 250_000
    assert os.path.getsize(path) == DATA_START + 4 * CHUNK
    assert journal.backlog == n
    # One waits; LMDB takes the rest in meanwhile; the wait ends and the journal starts over.
    threading.Timer(0.3, journal.applied_up_to, (n,)).start()
    started = time.monotonic()
    assert journal.append(record("1.3.1", 250_000), 10.0) == n + 1
    assert 0.2 < time.monotonic() - started < 5
    assert journal.waits == 2 and journal.backlog == 1
    journal.close()
    found, _ = reopen(path, applied=n)
    assert [s for s, _ in found] == [n + 1]


def test_a_record_larger_than_the_journal_is_refused_without_writing(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path, capacity=DATA_START + CHUNK)
    with pytest.raises(RecordTooLarge):
        journal.append(record("1.2.1", CHUNK), 1.0)
    assert journal.append(record("1.2.2"), 1.0) == 1
    journal.close()


def test_then_runs_under_the_lock_in_record_order(tmp_path):
    journal = fresh(tmp_path / "ingest-0.journal")
    seen: list[int] = []

    def append(k: int) -> None:
        for i in range(50):
            journal.append(record(f"1.{k}.{i}"), 5.0, then=lambda seq, _: seen.append(seq))

    threads = [threading.Thread(target=append, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    assert seen == list(range(1, 201))


def test_pending_lists_records_above_what_lmdb_holds_without_taking_the_lock(tmp_path):
    path = tmp_path / "ingest-0.journal"
    journal = fresh(path)
    journal.append(record("1.2.1", spool="a.spool"), 1.0)
    journal.append(record("1.2.2"), 1.0)
    # The owner still holds the file: a reader (the orphan spool sweep) sees its records.
    assert [(s, r.spool) for s, r in jf.pending(path, 0)] == [(1, "a.spool"), (2, "")]
    assert [s for s, _ in jf.pending(path, 1)] == [2]
    assert jf.pending(tmp_path / "missing.journal", 0) == []
    journal.close()
