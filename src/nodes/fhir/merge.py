"""The server's current ImagingStudy + the fresh mapping → the resource to PUT (pure, no I/O).

Why: the Store purges an object ``retention_s`` after every lane finished with it, so the
fresh mapping (:class:`~nodes.fhir.imagingstudy.ImagingStudyHandler` over
``Store.study_members``) of a study that grows late — an SR a day after its CT — lists only
the objects still stored. A conditional update *replaces* the resource, so sending the fresh
mapping alone would make the purged instances vanish from the server. The server is the
system of record for the resource: the sender reads it first and :func:`merge_study` lays the
fresh mapping over it.

Rules (both arguments are JSON-ready dicts; neither is modified):

- An instance the fresh mapping holds is taken from it whole (it is mapped from its own
  object, so nothing about it is older than ours); an instance only the server lists is kept
  in its series. An instance the fresh mapping places in another series than the server did
  (a corrected re-send) moves there; a server-only series left with no instance by such moves
  is dropped.
- A series or the study itself is built from several objects, some possibly purged: for
  those, every element of the fresh mapping wins and an element only the server has is kept
  (a late SR without StudyDescription does not erase the CT's). ``identifier`` is merged per
  kind (system and type): ours replace the server's of the same kind, others are kept.
- ``id``, ``meta`` and ``text`` of the server's resource are left out: the conditional update
  finds the resource by identifier, the version is the server's, and a narrative would
  describe the old content.
- Series are ordered by number then UID, instances by number then UID (unnumbered last);
  ``numberOfSeries``, ``numberOfInstances`` (distinct SOP Instance UIDs), each series'
  ``numberOfInstances`` and the study's ``modality`` list (distinct, in series order) are
  recomputed from the merged series.
- Series and instances without a string ``uid`` cannot be matched (and would make the PUT
  invalid): they are dropped. A series the server lists twice is one (the first one's
  elements, every instance); an instance listed twice in a series counts once.

``merge_study(None, fresh)`` is ``fresh`` for any resource the handler makes, and
``merge_study(merge_study(c, f), f) == merge_study(c, f)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["SERVER_MANAGED", "merge_study"]

SERVER_MANAGED = ("id", "meta", "text")
_SERIES_COMPUTED = ("numberOfInstances", "instance")


def merge_study(current: Mapping[str, Any] | None, fresh: Mapping[str, Any]) -> dict[str, Any]:
    """The ImagingStudy to send: ``fresh`` laid over ``current`` (see the module rules)."""
    if not isinstance(current, Mapping) or current.get("resourceType") != "ImagingStudy":
        current = {}
    out = _overlay(current, fresh, skip=SERVER_MANAGED)
    if "identifier" in out:
        out["identifier"] = _merge_identifiers(current.get("identifier"),
                                               fresh.get("identifier"))
    series = _merge_series(current.get("series"), fresh.get("series"))
    modalities: dict[tuple[Any, Any], Any] = {}
    for s in series:
        coding = s.get("modality")
        if isinstance(coding, Mapping) and isinstance(coding.get("code"), str) and coding["code"]:
            modalities.setdefault((str(coding.get("system")), coding["code"]),
                                  copy.deepcopy(coding))
    _put(out, "modality", list(modalities.values()))
    out["numberOfSeries"] = len(series)
    out["numberOfInstances"] = len({i["uid"] for s in series for i in s.get("instance", ())})
    _put(out, "series", series)
    return out


def _overlay(current: Mapping[str, Any], fresh: Mapping[str, Any],
             skip: Iterable[str] = ()) -> dict[str, Any]:
    """Fresh's elements (in its order), then the elements only ``current`` has."""
    out = {k: copy.deepcopy(v) for k, v in fresh.items()}
    for key, value in current.items():
        if key not in out and key not in skip:
            out[key] = copy.deepcopy(value)
    return out


def _put(out: dict[str, Any], key: str, values: list[Any]) -> None:
    """Set a list element, or leave it out when empty (FHIR forbids empty arrays)."""
    if values:
        out[key] = values
    else:
        out.pop(key, None)


def _identifier_kind(identifier: Mapping[str, Any]) -> list[Any]:
    """System and type codings: compared with ==, as a server may send anything in them."""
    kind = identifier.get("type")
    codings = kind.get("coding") if isinstance(kind, Mapping) else None
    return [identifier.get("system"), [(c.get("system"), c.get("code")) for c in (
        codings if isinstance(codings, list) else ()) if isinstance(c, Mapping)]]


def _merge_identifiers(current: Any, fresh: Any) -> list[Any]:
    ours = [copy.deepcopy(i) for i in fresh or () if isinstance(i, Mapping)]
    kinds = [_identifier_kind(i) for i in ours]
    for identifier in current if isinstance(current, list) else ():
        if (isinstance(identifier, Mapping) and _identifier_kind(identifier) not in kinds
                and identifier not in ours):
            ours.append(copy.deepcopy(identifier))
    return ours


def _by_uid(items: Any) -> dict[str, Mapping[str, Any]]:
    """Items with a string uid, first one of each uid, in order."""
    found: dict[str, Mapping[str, Any]] = {}
    for item in items if isinstance(items, list) else ():
        if isinstance(item, Mapping) and isinstance(item.get("uid"), str) and item["uid"]:
            found.setdefault(item["uid"], item)
    return found


def _number(item: Mapping[str, Any]) -> int | None:
    number = item.get("number")
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def _ordered(items: Iterable[Mapping[str, Any]]) -> list[Any]:
    """By number (numbered first), then uid: the handler's order."""
    def key(item: Mapping[str, Any]) -> tuple[bool, int, str]:
        number = _number(item)
        return (number is None, number or 0, item["uid"])
    return sorted(items, key=key)


def _merge_series(current: Any, fresh: Any) -> list[dict[str, Any]]:
    ours, theirs = _by_uid(fresh), _joined(current)
    placed = {uid for s in ours.values() for uid in _by_uid(s.get("instance"))}
    merged = []
    for uid in {**ours, **theirs}:
        series = _merge_one_series(theirs.get(uid), ours.get(uid), placed)
        if series is not None:
            merged.append(series)
    return _ordered(merged)


def _joined(series: Any) -> dict[str, Mapping[str, Any]]:
    """Series by uid; a uid listed twice is one series: the first's elements, all instances."""
    joined: dict[str, Mapping[str, Any]] = {}
    for item in series if isinstance(series, list) else ():
        if not (isinstance(item, Mapping) and isinstance(item.get("uid"), str) and item["uid"]):
            continue
        first = joined.get(item["uid"])
        if first is None:
            joined[item["uid"]] = item
        elif isinstance(item.get("instance"), list):
            joined[item["uid"]] = {**first, "instance": [
                *(first.get("instance") if isinstance(first.get("instance"), list) else ()),
                *item["instance"]]}
    return joined


def _merge_one_series(current: Mapping[str, Any] | None, fresh: Mapping[str, Any] | None,
                      placed: set[str]) -> dict[str, Any] | None:
    theirs = _by_uid(current.get("instance")) if current is not None else {}
    kept = {uid: i for uid, i in theirs.items() if uid not in placed}
    if fresh is None and theirs and not kept:
        return None  # every instance it listed is now in the series our objects name
    out = _overlay(current or {}, fresh or {}, skip=_SERIES_COMPUTED)
    ours = _by_uid(fresh.get("instance")) if fresh is not None else {}
    instances = [copy.deepcopy(i) for i in _ordered(_chain(ours, kept))]
    out["numberOfInstances"] = len(instances)
    _put(out, "instance", instances)
    return out


def _chain(*groups: Mapping[str, Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for group in groups:
        yield from group.values()
