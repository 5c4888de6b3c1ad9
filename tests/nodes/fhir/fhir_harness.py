"""Run a FhirStudySender in a real flow graph: a scripted feed hands it deliveries, a dict
plays the Store (``members``), a Recorder settles. Shared by the FHIR sender tests.
Behind the real Store, the graph comes from the STOW harness (``store_graph``: an arrival
feeder commits into a Store whose ``study_members`` the sender reads)."""

from __future__ import annotations

import inspect
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import trio
from pydicom import dcmread
from pydicom.dataset import Dataset

from flow import EgressConfig, EgressPolicy, Graph, Node, RestartPolicy, Runner
from nodes.arrival import Arrival, Envelope
from nodes.delivery import Delivery, Recorder
from nodes.fhir import FhirConfig, FhirStudySender
from nodes.payload import BytesPayload, Payload
from support.synth import to_part10

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "stow"))
from stow_harness import (commit_stats, preload, store_graph,  # noqa: E402,F401 - shared
                          wait_for_lane)


class ScriptedFeed(Node):
    """Source: runs its steps in order — a Delivery is sent, a number is slept (seconds),
    a callable is called (and awaited if async; a list it returns is run next) — then ends,
    which ends the sender."""

    inputs = ()

    def __init__(self, steps: Sequence[Any], **kw) -> None:
        super().__init__(**kw)
        self.steps = list(steps)

    async def run(self, ctx) -> None:
        while self.steps:
            step = self.steps.pop(0)
            if isinstance(step, Delivery):
                await ctx.send(step)
            elif isinstance(step, (int, float)):
                await trio.sleep(step)
            else:
                result = step()
                if inspect.isawaitable(result):
                    result = await result
                if isinstance(result, list):
                    self.steps[0:0] = result


class FakeStore:
    """What the Store would hold, by study: ``members`` is the sender's callable."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, tuple[Envelope, Payload]]] = {}
        self.calls: list[tuple[float, str]] = []  # (Trio time, study) of each members call

    def put(self, envelope: Envelope, payload: Payload) -> None:
        self.held.setdefault(envelope.study_instance_uid, {})[envelope.sop_instance_uid] = (
            envelope, payload)

    async def members(self, study_uid: str) -> list[tuple[Envelope, Payload]]:
        self.calls.append((trio.current_time(), study_uid))
        await trio.sleep(0)
        return list(self.held.get(study_uid, {}).values())


def envelope_of(ds: Dataset) -> Envelope:
    return Envelope(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                    series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                    modality=str(ds.get("Modality", "")))


def stored(store: FakeStore, recorder: Recorder, datasets: Sequence[Dataset],
           lane: str = "fhir") -> list[Delivery]:
    """Commit each dataset to the fake store and make its delivery."""
    out = []
    for ds in datasets:
        env, payload = envelope_of(ds), BytesPayload(to_part10(ds))
        store.put(env, payload)
        out.append(recorder.delivery(env, payload, lane))
    return out


def arrivals_of(datasets: Sequence[Dataset]) -> list[Arrival]:
    """One Arrival (Part 10 bytes, routing-safe envelope) per dataset, for the real Store."""
    return [Arrival(envelope_of(ds), BytesPayload(to_part10(ds))) for ds in datasets]


def uids_in(resource: dict) -> list[str]:
    return [i["uid"] for s in resource["series"] for i in s["instance"]]


async def run_sender(config: FhirConfig, steps: Sequence[Any], store: FakeStore, *,
                     client: httpx.AsyncClient | None = None,
                     allowed: Sequence[str] | None = None,
                     restart: RestartPolicy | None = None) -> tuple[FhirStudySender, Runner]:
    """Run feed >> sender until the feed's steps are done and every study was sent."""
    sender = FhirStudySender(config, store.members, client=client)
    graph = Graph(ScriptedFeed(steps, name="feed") >> sender, egress=EgressPolicy(
        EgressConfig(allowed_http=list(allowed if allowed is not None else [config.url]))))
    runner = Runner(graph, restart=restart or RestartPolicy(
        backoff_initial_s=0.01, backoff_max_s=0.05, max_failures=3))
    await runner.run()
    return sender, runner


def mock_client(handler: Callable[[httpx.Request], Any]) -> httpx.AsyncClient:
    """An AsyncClient answered in-process (no socket): for virtual-time tests."""
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)


def header_of(part10: bytes) -> Dataset:
    return dcmread(io.BytesIO(part10), stop_before_pixels=True)
