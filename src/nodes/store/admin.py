"""What operators see and do: ``flow status``, ``flow trace``, ``flow deadletters``,
``flow keys``.

These run in the ``flow`` CLI process, usually while the graph runs in another one: reads
use a read-only LMDB handle (LMDB allows concurrent readers in any process), writes (replay,
purge of a dead letter) take LMDB's own cross-process write lock and ring the lanes (or the
housekeeping process) they concern (:mod:`.rundir`); a pump that does not listen notices
them within ``poll_s``. Called in the process that runs the Store, they use its open
environment. Output is routing-safe: UIDs, lane names, states, reasons, times.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import lmdb

from flow import COUNTER, GAUGE, HISTOGRAM, FlowError, Metric, histogram_value

from . import audit, lanes, layout, objects
from .commit import GroupCommitter
from .config import StoreConfig
from .crypto import KeyFileError
from .db import ENV_DIR, Env
from .journal import Journal
from .keyring import Keyring, KeySource
from .rundir import HOUSEKEEPING, lane_name, ring

T = TypeVar("T")


class StoreView(Protocol):
    """What these functions read of a Store (:class:`~.node.Store` is one): where its data
    dir is, its lanes, and its environment and committer when it is open in this process."""

    name: str
    data_dir: Path
    spool_dir: Path
    config: StoreConfig

    @property
    def lanes(self) -> list[str]: ...

    @property
    def key_source(self) -> KeySource: ...

    @property
    def env(self) -> Env | None: ...

    @property
    def committer(self) -> GroupCommitter | None: ...

    @property
    def journal(self) -> Journal | None: ...


@contextmanager
def _env(store: StoreView, *, write: bool) -> Iterator[Env | None]:
    """The store's environment: its own when open here, else a handle for this call (None
    when the data dir holds no store yet)."""
    if store.env is not None:
        yield store.env
        return
    if not Env.exists(store.data_dir):
        yield None
        return
    try:
        env = Env.open(store.data_dir, map_size_mb=store.config.map_size_mb,
                  max_readers=store.config.max_readers, readonly=not write)
    except lmdb.Error as exc:
        raise FlowError(f"store {store.name!r}: cannot open {store.data_dir / ENV_DIR} "
                        f"({type(exc).__name__}; is it readable and writable by this user?)"
                        ) from None
    try:
        yield env
    finally:
        env.close()


def _read(store: StoreView, fn: Callable[[Env, Any], T], empty: T) -> T:
    with _env(store, write=False) as env:
        if env is None:
            return empty
        with env.begin() as txn:
            return fn(env, txn)


def _write(store: StoreView, fn: Callable[[Env, Any], T], empty: T) -> T:
    with _env(store, write=True) as env:
        if env is None:
            return empty
        with env.begin(write=True) as txn:
            return fn(env, txn)


def report(store: StoreView) -> dict[str, Any]:
    """``{"lanes": {lane: {queued, in_flight, retrying, delivered, dead_lettered,
    oldest_age_s, last_error_class, ...}}, "store": {...}}``."""
    now = time.time()

    def read(env: Env, txn: Any) -> dict[str, Any]:
        return {
            "lanes": {lane: lanes.lane_report(env, txn, lane, now) for lane in store.lanes},
            "store": {"objects": txn.stat(env.objects)["entries"],
                      "map_used_pct": round(100 * env.used_fraction(txn), 1)},
        }

    empty = {"lanes": {lane: _empty_lane() for lane in store.lanes},
             "store": {"objects": 0, "map_used_pct": 0.0}}
    return _read(store, read, empty)


def _empty_lane() -> dict[str, Any]:
    return {"queued": 0, "in_flight": 0, "retrying": 0, "delivered": 0, "dead_lettered": 0,
            "oldest_age_s": None, "last_error_class": None}


# The lane figures of report() that /metrics exposes as gauges and as counters.
_LANE_GAUGES = {"queued": "Items waiting in the lane's durable queue",
                "in_flight": "Items handed to the lane and not settled yet",
                "retrying": "Items waiting for a retry after a transient failure",
                "dead_lettered": "Items the lane gave up on (until replayed or purged)"}
_LANE_COUNTERS = {"delivered": "Items the lane delivered", "skipped": "Items the lane skipped"}


def metrics(store: StoreView) -> list[Metric]:
    """The Store's figures for /metrics: per lane from LMDB (any process, like
    :func:`report`), commit rounds from this process's committer when it runs here."""
    now = time.time()

    def read(env: Env, txn: Any) -> tuple[list[Any], int, float]:
        rows = [(lane, lanes.lane_report(env, txn, lane, now),
                 *lanes.attempt_figures(env, txn, lane)) for lane in store.lanes]
        return rows, txn.stat(env.objects)["entries"], env.used_fraction(txn)

    none = [0] * (len(lanes.SEND_BOUNDS_MS) + 1)
    rows, stored, used = _read(store, read, (
        [(lane, _empty_lane(), dict.fromkeys(lanes.OUTCOME_CLASSES, 0), none, 0)
         for lane in store.lanes], 0, 0.0))
    out = []
    for lane, figures, attempts, buckets, total_ms in rows:
        labels = {"lane": lane}
        for key, text in _LANE_GAUGES.items():
            out.append(Metric(f"lane_{key}", GAUGE, text, figures.get(key) or 0, labels))
        for key, text in _LANE_COUNTERS.items():
            out.append(Metric(f"lane_{key}", COUNTER, text, figures.get(key) or 0, labels))
        out.append(Metric("lane_oldest_age_seconds", GAUGE, "Age of the lane's oldest "
                          "unsettled item (0: none)", figures.get("oldest_age_s") or 0, labels))
        for outcome, count in attempts.items():
            out.append(Metric("lane_attempts", COUNTER, "Delivery attempts settled, by "
                              "outcome class", count, {**labels, "outcome": outcome}))
        out.append(Metric("lane_send_seconds", HISTOGRAM, "From hand-over to the lane until "
                          "its outcome", histogram_value([b / 1000 for b in lanes.SEND_BOUNDS_MS],
                                                         buckets, total_ms / 1000), labels))
    node = {"node": store.name}
    out.append(Metric("store_objects", GAUGE, "Objects held by the Store", stored, node))
    out.append(Metric("store_map_used_ratio", GAUGE, "Share of the LMDB map in use", used, node))
    committer = store.committer
    if committer is not None:
        out.append(Metric("store_commit_round_seconds", HISTOGRAM, "Duration of one group-"
                          "commit round (this process)", committer.round_seconds.value(), node,
                          per_process=True))
        out.append(Metric("store_commit_batch_size", HISTOGRAM, "Writes sharing one "
                          "group-commit round (this process)", committer.batch_sizes.value(), node,
                          per_process=True))
    journal = store.journal
    if journal is not None:
        out.append(Metric("store_journal_backlog", GAUGE, "Arrivals acknowledged from the "
                          "ingest journal that LMDB has not taken in yet (this process)",
                          journal.backlog, node, per_process=True))
        out.append(Metric("store_journal_appends", COUNTER, "Arrivals acknowledged once "
                          "journaled (this process, since it started)", journal.appended,
                          node, per_process=True))
        out.append(Metric("store_journal_waits", COUNTER, "Journal appends that waited for "
                          "LMDB to make room (this process)", journal.waits, node,
                          per_process=True))
    return out


def trace(store: StoreView, uid: str) -> dict[str, Any]:
    """An object's journey: its routing-safe record, each lane's state, every audit event.

    A lane's ``attempts`` is the number of its ``attempt`` events in ``events`` (every
    delivery attempt, whatever its outcome, replays and earlier versions included);
    ``failures`` is the ledger's count of failed attempts of the current version since it
    was (re)queued, the figure the retry schedule and ``max_attempts`` go by.
    """
    def read(env: Env, txn: Any) -> dict[str, Any]:
        obj = objects.get(env, txn, uid)
        events = [_event(e) for e in audit.trail(env, txn, uid)]
        tried = Counter(e.get("lane") for e in events if e["event"] == "attempt")
        states = {}
        for lane in (obj.lanes if obj else store.lanes):
            item = lanes.get(env, txn, lane, uid)
            if item is not None:
                states[lane] = {"state": item.state, "attempts": tried[lane],
                                "failures": item.attempts, "reason": item.reason,
                                "content_hash": item.content_hash[:16]}
        return {
            "uid": uid,
            "stored": None if obj is None else {
                "sop_class_uid": obj.envelope.sop_class_uid, "size": obj.size,
                "content_hash": obj.content_hash[:16], "stored_at": obj.stored_at,
                "spooled": bool(obj.spool), "calling_ae": obj.envelope.calling_ae,
                "finished_at": obj.done_at or None},
            "lanes": states,
            "events": events,
        }

    return _read(store, read, {"uid": uid, "stored": None, "lanes": {}, "events": []})


def _event(event: Any) -> dict[str, Any]:
    doc = {f: getattr(event, f) for f in event.__struct_fields__
           if getattr(event, f) not in ("", [], 0, None, False)}
    if "content_hash" in doc:
        doc["content_hash"] = doc["content_hash"][:16]
    return doc


def dead_letters(store: StoreView) -> list[dict[str, Any]]:
    def read(env: Env, txn: Any) -> list[dict[str, Any]]:
        rows = []
        for lane, uid, item in lanes.dead_letters(env, txn, store.lanes):
            obj = objects.get(env, txn, uid)
            rows.append({"lane": lane, "uid": uid, "reason": item.reason,
                         "attempts": item.attempts, "since": item.updated_at,
                         "sop_class_uid": obj.envelope.sop_class_uid if obj else ""})
        return rows

    return _read(store, read, [])


def replay(store: StoreView, uid: str | None, lane: str | None = None) -> list[tuple[str, str]]:
    """Re-queue dead letters (``uid``'s, or all); returns (lane, uid) pairs."""
    chosen = _lanes(store, lane)
    done = _write(store, lambda env, txn: lanes.replay(env, txn, chosen, uid, time.time()), [])
    ring(store.data_dir, sorted({lane_name(lane) for lane, _ in done}))
    return done


def discard(store: StoreView, uid: str, lane: str | None = None) -> list[str]:
    """Drop ``uid``'s dead letters; the object is purged after the retention time once no
    lane needs it. Returns the lanes it was dropped from."""
    chosen = _lanes(store, lane)

    def write(env: Env, txn: Any) -> list[str]:
        now = time.time()
        dropped = lanes.discard(env, txn, chosen, uid, now)
        if dropped and lanes.finished_everywhere(env, txn, uid):
            objects.mark_done(env, txn, uid, now)
        return dropped

    dropped = _write(store, write, [])
    if dropped and store.config.retention_s == 0:
        ring(store.data_dir, [HOUSEKEEPING])
    return dropped


def _lanes(store: StoreView, lane: str | None) -> list[str]:
    if lane is None:
        return store.lanes
    if lane not in store.lanes:
        raise FlowError(f"store {store.name!r} has no lane {lane!r} "
                        f"(lanes: {', '.join(store.lanes) or 'none'})")
    return [lane]


def key_status(store: StoreView) -> dict[str, Any]:
    """The data dir's format and keys, by fingerprint only (never key material):
    ``{"format", "current", "configured", "source", "keyring", "keys": {id: {...}}}``."""
    source = store.key_source
    configured: str | None = None
    problem = "" if source.exists() else f"{source.describe()} is missing"
    try:
        configured = source.load(create=False).key_id if not problem else None
    except KeyFileError as exc:
        problem = str(exc)
    try:
        in_keyring = set(Keyring.load(source, create=False).retired) if configured else set()
    except KeyFileError as exc:
        in_keyring, problem = set(), str(exc)
    in_keyring |= {p.stem for p in source.keyring_dir.glob("*.key")}

    def read(env: Env, txn: Any) -> dict[str, Any]:
        ledger = layout.read_ledger(env, txn)
        usage = layout.key_usage(env, txn, ledger) if ledger else {}
        return {"format": layout.read_format(env, txn),
                "current": ledger.current if ledger else None,
                "pending": (ledger.pending or None) if ledger else None,
                "rotated_at": (ledger.rotated_at or None) if ledger else None,
                "usage": usage,
                "objects": txn.stat(env.objects)["entries"]}

    doc = _read(store, read, {"format": None, "current": None, "pending": None,
                              "rotated_at": None, "usage": {}, "objects": 0})
    usage = doc.pop("usage")
    ids = sorted(set(usage) | in_keyring | ({configured} if configured else set()))
    doc.update(source=source.describe(), keyring=str(source.keyring_dir),
               configured=configured, problem=problem or None,
               keys={k: {"objects": usage.get(k, 0),
                         "role": _role(k, doc["current"]),
                         "readable": k == configured or k in in_keyring}
                     for k in ids})
    return doc


def _role(key_id: str, current: str | None) -> str:
    if current is None:  # format 1 (upgraded at the next start) or no store yet
        return "not recorded yet"
    return "current" if key_id == current else "retired"


def rotate_key(store: StoreView) -> tuple[str, str]:
    """``flow keys rotate``: a new current key; the old one stays readable from the keyring.
    Returns ``(old, new)`` fingerprints. See :func:`nodes.store.layout.rotate`."""
    with _env(store, write=True) as env:
        if env is None:
            raise FlowError(f"store {store.name!r}: data dir {str(store.data_dir)!r} holds no "
                            f"store yet; start the graph once (it creates the key)")
        return layout.rotate(env, store.key_source, store.spool_dir,
                             where=f"store {store.name!r}")
