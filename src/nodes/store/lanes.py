"""Durable lanes: each lane's ledger entry per object and the state machine that moves it.

::

    queued ──claim──▶ in_flight ──Delivered──▶ delivered   (final)
      ▲   ▲              │  │ └───Skipped────▶ skipped     (final)
      │   └──due── retrying◀─Transient         (due at T: backoff + jitter, Retry-After)
      │                  └─────Permanent──▶ dead_lettered ──replay──▶ queued
      └── start: every in_flight item          dead_lettered ──purge──▶ discarded (final)

A lane's pump takes the items of its ``due`` index whose time has come, in due order: a
retrying item is parked at its due time, so the items behind it go first (no head-of-line
blocking). Every transition goes through :func:`transition`, which keeps the ``due`` index
and the per-lane state counters (read by ``flow status``) consistent in the same
transaction. All functions are blocking and take an open write (or read) transaction.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

import lmdb
import msgspec
from msgspec.structs import replace

from ..outcome import Delivered, Outcome, Permanent, Skipped, Transient
from . import audit
from .db import (DEAD, DELIVERED, DISCARDED, FINISHED, IN_FLIGHT, QUEUED, RETRYING, SKIPPED,
                 STATES, WAITING, Env, LaneItem, ObjectRecord, decode_item, decode_object,
                 due_key, due_time, encode, item_key, lane_prefix, prefixed, uid_key)

Delay = Callable[[int, "float | None"], float]  # (failures, retry_after) -> seconds


def count_name(lane: str, state: str) -> str:
    return f"count\0{lane}\0{state}"


def get(env: Env, txn: lmdb.Transaction, lane: str, uid: str) -> LaneItem | None:
    raw = txn.get(item_key(lane, uid), db=env.items)
    return decode_item(raw) if raw is not None else None


def transition(env: Env, txn: lmdb.Transaction, lane: str, uid: str, old: LaneItem | None,
               new: LaneItem, *, due: float = 0.0) -> None:
    """Store ``new`` as the lane's entry for ``uid``, replacing ``old`` (None: absent).

    Keeps the due index (``new`` waits there at ``due`` when QUEUED or RETRYING) and the
    per-lane state counters in step."""
    if old is not None and old.due_key:
        txn.delete(old.due_key, db=env.due)
    new.due_key = b""
    if new.state in WAITING:
        # next_seq is unique within a process; across processes sharing the data dir a
        # clock stepped back could repeat one: never overwrite another item's due entry.
        new.due_key = due_key(lane, due, env.next_seq(txn))
        while not txn.put(new.due_key, uid_key(uid), db=env.due, overwrite=False):
            new.due_key = due_key(lane, due, env.next_seq(txn))
    if old is not None:
        env.add(txn, count_name(lane, old.state), -1)
    env.add(txn, count_name(lane, new.state), +1)
    if new.state in (DELIVERED, SKIPPED):  # totals survive the purge of the entries
        env.add(txn, f"{new.state}_total\0{lane}")
    txn.put(item_key(lane, uid), encode(new), db=env.items)


def remove(env: Env, txn: lmdb.Transaction, lane: str, uid: str) -> None:
    """Forget the lane's entry for ``uid`` (object purged)."""
    old = get(env, txn, lane, uid)
    if old is None:
        return
    if old.due_key:
        txn.delete(old.due_key, db=env.due)
    env.add(txn, count_name(lane, old.state), -1)
    txn.delete(item_key(lane, uid), db=env.items)


def enqueue(env: Env, txn: lmdb.Transaction, lane: str, uid: str, content_hash: str,
            now: float, *, new_object: bool = False) -> None:
    """Queue (or re-queue) the version ``content_hash`` of ``uid`` for ``lane``.

    ``new_object``: the object was not stored a moment ago, so no lane holds an entry for
    it (a purge removes the entries with the object) and there is none to look up."""
    old = None if new_object else get(env, txn, lane, uid)
    new = LaneItem(state=QUEUED, content_hash=content_hash, queued_at=now, updated_at=now)
    transition(env, txn, lane, uid, old, new, due=now)


def next_due(env: Env, txn: lmdb.Transaction, lane: str) -> float | None:
    """When the lane's earliest waiting item is due (None: nothing waits)."""
    cursor = txn.cursor(db=env.due)
    prefix = lane_prefix(lane)
    if cursor.set_range(prefix) and cursor.key().startswith(prefix):
        return due_time(cursor.key())
    return None


def claim(env: Env, txn: lmdb.Transaction, lane: str, limit: int,
          now: float) -> tuple[list[tuple[str, LaneItem]], float | None]:
    """Mark up to ``limit`` due items IN_FLIGHT, earliest due first. Returns them and when
    the next waiting item is due (None: nothing else waits), read in the same walk of the
    due index rather than a second one."""
    picked: list[tuple[bytes, str]] = []
    upcoming = None
    for key, value in prefixed(txn.cursor(db=env.due), lane_prefix(lane)):
        if len(picked) >= limit or due_time(key) > now:
            upcoming = due_time(key)
            break
        picked.append((key, value.decode("ascii")))
    claimed = []
    for _, uid in picked:
        old = get(env, txn, lane, uid)
        if old is None:
            continue
        new = replace(old, state=IN_FLIGHT, updated_at=now)
        transition(env, txn, lane, uid, old, new)
        claimed.append((uid, new))
    return claimed, upcoming


def unclaim(env: Env, txn: lmdb.Transaction, lane: str, uids: Iterable[tuple[str, str]],
            now: float) -> None:
    """Put claimed items that never reached the lane back at the head of the queue."""
    for uid, content_hash in uids:
        old = get(env, txn, lane, uid)
        if old is not None and old.state == IN_FLIGHT and old.content_hash == content_hash:
            transition(env, txn, lane, uid, old, replace(old, state=QUEUED, updated_at=now),
                       due=old.queued_at)


def requeue_in_flight(env: Env, txn: lmdb.Transaction, lanes: Iterable[str],
                      now: float) -> int:
    """At start: whatever was handed to a lane and not settled goes back to the queue
    (at-least-once). Returns how many items moved."""
    moved = 0
    for lane in lanes:
        if env.counter(txn, count_name(lane, IN_FLIGHT)) <= 0:
            continue
        stuck = [(k, decode_item(v)) for k, v in prefixed(txn.cursor(db=env.items),
                                                          lane_prefix(lane))]
        for key, old in stuck:
            if old.state != IN_FLIGHT:
                continue
            uid = key[len(lane_prefix(lane)):].decode("ascii")
            transition(env, txn, lane, uid, old, replace(old, state=QUEUED, updated_at=now),
                       due=old.queued_at)
            audit.record(env, txn, uid, "requeue", lane=lane, t=now,
                         reason="in flight when the process stopped")
            moved += 1
    return moved


def settle(env: Env, txn: lmdb.Transaction, lane: str, uid: str, content_hash: str,
           outcome: Outcome, *, attempt: int, notes: tuple[str, ...], duration_ms: float,
           now: float, delay: Delay, max_attempts: int) -> bool:
    """Commit what became of one attempt. Returns True when the lane is now finished with
    the object (delivered or skipped).

    An outcome for a version that is no longer current (the object was replaced while in
    flight) is audited as stale and changes nothing: the new version is already queued.
    """
    old = get(env, txn, lane, uid)
    common: dict[str, Any] = dict(lane=lane, attempt=attempt, notes=notes, t=now,
                                  duration_ms=round(duration_ms, 1), content_hash=content_hash,
                                  outcome=type(outcome).__name__.lower())
    count_attempt(env, txn, lane, common["outcome"], duration_ms)
    if old is None or old.content_hash != content_hash or old.state != IN_FLIGHT:
        audit.record(env, txn, uid, "attempt", stale=True, **_texts(outcome), **common)
        return False
    new = replace(old, updated_at=now, outcome=common["outcome"], reason="")
    due = 0.0
    if isinstance(outcome, Delivered):
        new.state = DELIVERED
    elif isinstance(outcome, Skipped):
        new.state, new.reason = SKIPPED, outcome.reason
    elif isinstance(outcome, Permanent):
        new.state, new.reason, new.attempts = DEAD, outcome.reason, old.attempts + 1
    elif isinstance(outcome, Transient):
        new.attempts, new.reason = old.attempts + 1, outcome.reason
        if max_attempts and new.attempts >= max_attempts:
            new.state = DEAD
            new.reason = f"gave up after {new.attempts} attempts: {outcome.reason}"
        else:
            new.state = RETRYING
            due = now + delay(new.attempts, outcome.retry_after)
    else:
        raise TypeError(f"not an outcome: {type(outcome).__name__}")
    transition(env, txn, lane, uid, old, new, due=due)
    audit.record(env, txn, uid, "attempt", **_texts(outcome), **common)
    if new.state in (RETRYING, DEAD):
        txn.put(f"last_error\0{lane}".encode(),
                encode({"class": common["outcome"], "reason": new.reason, "t": now}),
                db=env.meta)
    if new.state == RETRYING:
        audit.record(env, txn, uid, "retry_scheduled", lane=lane, t=now,
                     detail=f"due in {due - now:.1f}s", attempt=attempt)
    if new.state == DEAD:
        audit.record(env, txn, uid, "dead_letter", lane=lane, t=now, reason=new.reason,
                     attempt=attempt)
    return new.state in FINISHED


# Attempts by outcome class and their send latency, per lane: counters in ``meta`` beside
# the state counts, so /metrics reads them from any process and they survive a restart.
OUTCOME_CLASSES = ("delivered", "skipped", "permanent", "transient")
SEND_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


def count_attempt(env: Env, txn: lmdb.Transaction, lane: str, outcome: str,
                  duration_ms: float) -> None:
    """Count one settled attempt; its latency only when the pump's hand-over time is known
    (``duration_ms`` 0: the attempt was handed over before a restart)."""
    env.add(txn, f"attempts\0{lane}\0{outcome}")
    if duration_ms > 0:
        env.add(txn, f"send_ms\0{lane}\0{bisect_left(SEND_BOUNDS_MS, duration_ms)}")
        env.add(txn, f"send_ms_sum\0{lane}", round(duration_ms))


def attempt_figures(env: Env, txn: lmdb.Transaction, lane: str
                    ) -> tuple[dict[str, int], list[int], int]:
    """({outcome class: attempts}, per-bucket send counts (one above the last bound), total
    send milliseconds) of ``lane``."""
    attempts = {o: env.counter(txn, f"attempts\0{lane}\0{o}") for o in OUTCOME_CLASSES}
    buckets = [env.counter(txn, f"send_ms\0{lane}\0{i}")
               for i in range(len(SEND_BOUNDS_MS) + 1)]
    return attempts, buckets, env.counter(txn, f"send_ms_sum\0{lane}")


def _texts(outcome: Outcome) -> dict[str, str]:
    reason = getattr(outcome, "reason", "")
    detail = getattr(outcome, "detail", "")
    if isinstance(outcome, Transient) and outcome.retry_after is not None:
        detail = f"retry_after={outcome.retry_after:g}s"
    return {"reason": reason, "detail": detail}


def replay(env: Env, txn: lmdb.Transaction, lanes: Iterable[str], uid: str | None,
           now: float) -> list[tuple[str, str]]:
    """Re-queue dead-lettered items (one ``uid`` or all) with a fresh attempt count."""
    done = []
    for lane, item_uid, old in dead_letters(env, txn, lanes, uid):
        new = replace(old, state=QUEUED, queued_at=now, updated_at=now, attempts=0)
        transition(env, txn, lane, item_uid, old, new, due=now)
        audit.record(env, txn, item_uid, "replay", lane=lane, t=now)
        done.append((lane, item_uid))
    return done


def discard(env: Env, txn: lmdb.Transaction, lanes: Iterable[str], uid: str,
            now: float) -> list[str]:
    """Drop ``uid``'s dead-lettered entries (the operator gave up on them). Returns lanes."""
    done = []
    for lane, item_uid, old in dead_letters(env, txn, lanes, uid):
        transition(env, txn, lane, item_uid, old, replace(old, state=DISCARDED, updated_at=now))
        audit.record(env, txn, item_uid, "discard", lane=lane, t=now)
        done.append(lane)
    return done


def dead_letters(env: Env, txn: lmdb.Transaction, lanes: Iterable[str],
                 uid: str | None = None) -> list[tuple[str, str, LaneItem]]:
    """(lane, uid, entry) of every dead-lettered item, or of ``uid``'s."""
    found = []
    for lane in lanes:
        if uid is not None:
            item = get(env, txn, lane, uid)
            if item is not None and item.state == DEAD:
                found.append((lane, uid, item))
            continue
        if env.counter(txn, count_name(lane, DEAD)) <= 0:
            continue
        for key, raw in prefixed(txn.cursor(db=env.items), lane_prefix(lane)):
            item = decode_item(raw)
            if item.state == DEAD:
                found.append((lane, key[len(lane_prefix(lane)):].decode("ascii"), item))
    return found


def finished_everywhere(env: Env, txn: lmdb.Transaction, uid: str, *,
                        obj: ObjectRecord | None = None, finished_lane: str = "") -> bool:
    """Every lane the object was queued for is done with its current version.

    ``obj``: the object's record as the caller read it in ``txn``; ``finished_lane``: a lane
    the caller just settled as finished with the current version (not read back)."""
    if obj is None:
        raw = txn.get(uid_key(uid), db=env.objects)
        if raw is None:
            return False
        obj = decode_object(raw)
    for lane in obj.lanes:
        if lane == finished_lane:
            continue
        item = get(env, txn, lane, uid)
        if item is not None and (item.state not in FINISHED
                                 or item.content_hash != obj.content_hash):
            return False
    return True


def lane_report(env: Env, txn: lmdb.Transaction, lane: str, now: float) -> dict[str, Any]:
    """The figures ``flow status`` shows for one lane (routing-safe)."""
    counts = {state: env.counter(txn, count_name(lane, state)) for state in STATES}
    oldest = None
    for _, uid in prefixed(txn.cursor(db=env.due), lane_prefix(lane)):
        item = get(env, txn, lane, uid.decode("ascii"))
        if item is not None and (oldest is None or item.queued_at < oldest):
            oldest = item.queued_at
    for key, raw in (prefixed(txn.cursor(db=env.items), lane_prefix(lane))
                     if counts[IN_FLIGHT] > 0 else ()):
        item = decode_item(raw)
        if item.state == IN_FLIGHT and (oldest is None or item.queued_at < oldest):
            oldest = item.queued_at
    raw_error = txn.get(f"last_error\0{lane}".encode(), db=env.meta)
    last = _decode_any(raw_error) if raw_error else {}
    return {
        "queued": counts[QUEUED],
        "in_flight": counts[IN_FLIGHT],
        "retrying": counts[RETRYING],
        "delivered": env.counter(txn, f"delivered_total\0{lane}"),
        "skipped": env.counter(txn, f"skipped_total\0{lane}"),
        "dead_lettered": counts[DEAD],
        "oldest_age_s": round(max(0.0, now - oldest), 1) if oldest is not None else None,
        "last_error_class": last.get("class"),
        "last_error_reason": last.get("reason"),
    }


def _decode_any(raw: bytes) -> dict[str, Any]:
    return msgspec.msgpack.decode(raw)
