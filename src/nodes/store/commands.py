"""Operator commands added to ``flow`` (entry point ``flow.commands``: ``store``).

    flow trace GRAPH.py [--config FILE] [--json] SOP_INSTANCE_UID
    flow deadletters GRAPH.py [--config FILE] [--json] list
    flow deadletters GRAPH.py [--config FILE] replay (SOP_INSTANCE_UID | --all) [--lane LANE]
    flow deadletters GRAPH.py [--config FILE] purge SOP_INSTANCE_UID [--lane LANE]
    flow keys GRAPH.py [--config FILE] [--json] status
    flow keys GRAPH.py [--config FILE] [--json] rotate

The graph file is loaded (nothing is started) to find its Store nodes and their data dirs.
Reads and writes go straight to LMDB, safely alongside a running graph (see
:mod:`nodes.store.admin`). Everything printed is routing-safe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flow import FlowError, load

if TYPE_CHECKING:
    from .node import Store

# The Store and its LMDB reader (.admin) are imported by the commands that run, not here:
# `flow` imports this module in every process to register the commands.


def register(subparsers: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    trace = subparsers.add_parser("trace", help="an object's journey through the Store")
    _graph_args(trace)
    trace.add_argument("uid", metavar="SOP_INSTANCE_UID")
    common(trace)
    trace.set_defaults(func=cmd_trace)

    dead = subparsers.add_parser("deadletters", help="list, replay or purge dead letters")
    _graph_args(dead)
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every dead-lettered object, by lane")
    replay = actions.add_parser("replay", help="re-queue dead letters into their lane")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("uid", nargs="?", metavar="SOP_INSTANCE_UID")
    which.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--lane", default=None, help="only this lane")
    purge = actions.add_parser("purge", help="give up on a dead letter (purged after "
                               "retention once no lane needs the object)")
    purge.add_argument("uid", metavar="SOP_INSTANCE_UID")
    purge.add_argument("--lane", default=None, help="only this lane")
    common(dead)
    dead.set_defaults(func=cmd_deadletters)

    keys = subparsers.add_parser("keys", help="at-rest keys: status (fingerprints only), "
                                 "rotate")
    _graph_args(keys)
    key_actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    key_actions.add_parser("status", help="format version, current and retired key "
                           "fingerprints, objects sealed with each")
    key_actions.add_parser("rotate", help="make a new key current; older keys stay readable "
                           "and objects are re-sealed when the Store (re)starts or reloads")
    common(keys)
    keys.set_defaults(func=cmd_keys)


def _graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("graph", type=Path, help="the graph file, e.g. graphs/radiology.py")
    p.add_argument("--config", type=Path, default=None,
                   help="site TOML file (default: the graph file with .toml)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def stores(args: argparse.Namespace) -> list[Store]:
    from .node import Store

    graph = load(args.graph, args.config).graph
    found = [n for n in graph.nodes if isinstance(n, Store)]
    if not found:
        raise FlowError(f"{args.graph}: the graph has no Store node")
    return found


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _show(value: Any) -> str:
    if isinstance(value, list):
        value = "; ".join(map(str, value))
    text = str(value)
    return repr(text) if " " in text or not text else text


def cmd_trace(args: argparse.Namespace) -> int:
    from . import admin

    traces = {store.name: admin.trace(store, args.uid) for store in stores(args)}
    if args.json:
        print(json.dumps(traces, indent=1, sort_keys=True))
        return 0
    found = False
    for name, doc in traces.items():
        if doc["stored"] is None and not doc["events"]:
            continue
        found = True
        stored = doc["stored"]
        head = (f"stored {stored['size']} bytes, sop_class={stored['sop_class_uid']}, "
                f"hash={stored['content_hash']}" if stored else "not stored (purged)")
        print(f"{args.uid} in {name}: {head}")
        for lane, state in doc["lanes"].items():
            reason = f" reason={state['reason']!r}" if state["reason"] else ""
            print(f"  lane {lane}: {state['state']} attempts={state['attempts']}{reason}")
        for event in doc["events"]:
            fields = " ".join(f"{k}={_show(v)}" for k, v in event.items()
                              if k not in ("t", "event"))
            print(f"  {_when(event['t'])} {event['event']} {fields}".rstrip())
    if not found:
        print(f"{args.uid}: no record in any store")
        return 1
    return 0


def cmd_deadletters(args: argparse.Namespace) -> int:
    from . import admin

    found = stores(args)
    if args.action == "list":
        rows = [dict(store=s.name, **row) for s in found for row in admin.dead_letters(s)]
        if args.json:
            print(json.dumps(rows, indent=1, sort_keys=True))
        elif not rows:
            print("no dead letters")
        for row in rows if not args.json else ():
            print(f"{row['store']} lane {row['lane']}: {row['uid']} attempts={row['attempts']} "
                  f"since={_when(row['since'])} reason={row['reason']!r}")
        return 0
    if args.action == "replay":
        done = [(s.name, lane, uid) for s in found
                for lane, uid in admin.replay(s, None if args.all else args.uid, args.lane)]
        verb = "re-queued"
    else:
        done = [(s.name, lane, args.uid) for s in found
                for lane in admin.discard(s, args.uid, args.lane)]
        verb = "purged"
    if args.json:
        print(json.dumps([{"store": s, "lane": lane, "uid": uid} for s, lane, uid in done]))
    for store, lane, uid in done if not args.json else ():
        print(f"{store} lane {lane}: {uid} {verb}")
    if not done:
        print("no matching dead letter" if not args.json else "", end="\n" if not args.json else "")
        return 1
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from . import admin

    found = stores(args)
    if args.action == "rotate":
        rotated = []
        for store in found:
            old, new = admin.rotate_key(store)
            rotated.append({"store": store.name, "old": old, "new": new})
        if args.json:
            print(json.dumps(rotated))
        for row in rotated if not args.json else ():
            print(f"{row['store']}: key {row['new']} is current; {row['old']} retired (kept in "
                  f"the keyring to read older objects). A running graph switches on reload "
                  f"(SIGHUP) or restart, then re-seals older objects in the background.")
        return 0
    docs = {store.name: admin.key_status(store) for store in found}
    if args.json:
        print(json.dumps(docs, indent=1, sort_keys=True))
        return 0
    for name, doc in docs.items():
        print(f"{name}: data dir format {doc['format'] or '-'}, {doc['objects']} objects, "
              f"key from {doc['source']}, keyring {doc['keyring']}")
        if doc["problem"]:
            print(f"  problem: {doc['problem']}")
        for key_id, info in doc["keys"].items():
            mark = " (configured)" if key_id == doc["configured"] else ""
            readable = "" if info["readable"] else " MISSING from the keyring"
            print(f"  key {key_id}: {info['role']}{mark}, {info['objects']} objects{readable}")
    return 0
