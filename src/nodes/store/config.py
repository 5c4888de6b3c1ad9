"""The ``[store]`` table: where the Store draws its limits, retry schedule and key from."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from flow import Config

Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(gt=0, le=1)]


class StoreConfig(Config):
    """Store settings; every default is usable on a workstation.

    map_size_mb: LMDB map size (the most the database can hold; sparse on disk).
    high_water: refuse new arrivals (StoreFull → 0xA700) when live pages exceed this fraction
        of the map, leaving room for outcomes and purges to commit.
    min_free_disk_mb: refuse new arrivals when the data dir's file system has less free.
    spool_threshold_kb: objects above this size live in an encrypted spool file and are
        streamed, never held whole in memory.
    retention_s: how long an object stays after its last lane finished (delivered or
        skipped) before it is purged.
    audit_retention_s: how long an object's audit trail (``flow trace``) outlives the object.
    retry_initial_s / retry_max_s / retry_jitter: transient failures are retried after
        ``min(max, initial * 2**(n-1))`` seconds, scaled by a random factor in
        ``[1-jitter, 1+jitter]``; a peer's Retry-After hint is honoured up to
        retry_after_max_s.
    max_attempts: dead-letter after this many failed attempts (0: retry forever).
    key_file / key_env: the at-rest key (see docs/operations.md, "Key handling").
    input_capacity: arrivals that may wait for the next group commit.
    poll_s: how often an idle lane pump looks for work committed by another process that
        did not wake it (a lost wake-up; any process in one-process mode, e.g.
        ``flow deadletters replay``).
    purge_interval_s: how often expired objects are purged.
    lane_linger_ms: how long a lane's claim or outcome waits to ride in an arrival's commit
        round before starting one of its own, while arrivals wait for LMDB to be
        acknowledged (``journal_mb = 0``, or arrivals through the Store's channel). LMDB has
        one writer and each round ends in a sync: a lane round of its own is time such an
        arrival waits behind. Higher favours those arrivals while lanes are busy; 0 gives
        lanes the lowest latency. Each lane object pays at most this much, and only while
        such arrivals are coming (one committed within twice this time); in a lanes-only
        process (several processes) always when ingest has no journal, never with one
        (docs/operations.md, "Throughput").
    journal_mb: the ingest journal of each ingest process (``journal/ingest-N.journal`` in
        the data dir): a DICOM listener's arrival is acknowledged once its record is durable
        there, and LMDB takes it in right behind (docs/decisions.md, "session 20"). The most
        it may hold of arrivals LMDB has not taken in yet (at least 4: it grows in 4 MiB
        steps); 0: no journal, every arrival is acknowledged after its LMDB commit.
    """

    map_size_mb: Annotated[int, Meta(ge=1)] = 4096
    high_water: Fraction = 0.85
    min_free_disk_mb: Annotated[int, Meta(ge=0)] = 256
    spool_threshold_kb: Annotated[int, Meta(ge=0)] = 256
    retention_s: NonNegative = 3600.0
    audit_retention_s: NonNegative = 30 * 86400.0
    retry_initial_s: Positive = 2.0
    retry_max_s: Positive = 300.0
    retry_jitter: Annotated[float, Meta(ge=0, lt=1)] = 0.2
    retry_after_max_s: Positive = 3600.0
    max_attempts: Annotated[int, Meta(ge=0)] = 0
    key_file: str | None = None
    key_env: str | None = None
    input_capacity: Annotated[int, Meta(ge=1)] = 64
    poll_s: Positive = 1.0
    purge_interval_s: Positive = 30.0
    max_readers: Annotated[int, Meta(ge=8)] = 126
    lane_linger_ms: Annotated[float, Meta(ge=0, le=1000)] = 25.0
    journal_mb: Annotated[int, Meta(ge=0, le=4096)] = 64
