"""Run a StowSender in a real flow graph: a feed node hands it deliveries, a Recorder
settles them. Shared by the sender tests, the Orthanc interop tests and bench/stow.py."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from pydicom import dcmread

from flow import EgressConfig, EgressPolicy, Graph, Node, RestartPolicy, Runner
from nodes.arrival import Envelope
from nodes.delivery import Delivery, Recorder
from nodes.payload import BytesPayload, Payload
from nodes.stow import StowConfig, StowSender


class Feed(Node):
    """Source: sends the given deliveries, then ends (which ends the sender)."""

    inputs = ()

    def __init__(self, deliveries: Sequence[Delivery], **kw) -> None:
        super().__init__(**kw)
        self.deliveries = list(deliveries)

    async def run(self, ctx) -> None:
        while self.deliveries:
            await ctx.send(self.deliveries.pop(0))


def envelope_of(part10: bytes | str | os.PathLike) -> Envelope:
    """The routing-safe envelope of Part 10 bytes or a Part 10 file."""
    src = io.BytesIO(part10) if isinstance(part10, bytes) else part10
    ds = dcmread(src, stop_before_pixels=True)
    return Envelope(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    study_instance_uid=str(ds.StudyInstanceUID), modality=str(ds.Modality))


def deliveries(recorder: Recorder, files: Sequence[bytes | tuple[Envelope, Payload]],
               lane: str = "archive") -> list[Delivery]:
    out = []
    for f in files:
        env, payload = (envelope_of(f), BytesPayload(f)) if isinstance(f, bytes) else f
        out.append(recorder.delivery(env, payload, lane))
    return out


async def run_sender(config: StowConfig, items: Sequence[Delivery], *,
                     allowed: Sequence[str] | None = None, running: EgressPolicy | None = None,
                     restart: RestartPolicy | None = None,
                     sender: StowSender | None = None) -> tuple[StowSender, Runner]:
    """Run feed >> sender until every item went through; returns (sender, runner)."""
    sender = sender or StowSender(config)
    graph = Graph(Feed(items, name="feed") >> sender, egress=EgressPolicy(
        EgressConfig(allowed_http=list(allowed if allowed is not None else [config.url]))))
    runner = Runner(graph, egress=running, restart=restart or RestartPolicy(
        backoff_initial_s=0.01, backoff_max_s=0.05, max_failures=3))
    await runner.run()
    return sender, runner
