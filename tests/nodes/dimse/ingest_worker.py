"""One ingest process of a multi-process graph, as the runtime will start it: the same graph
(DicomListener >> Store) in every process, only the listener's lane run here, placed as
replica ``REPLICA`` of ``REPLICAS``. Logs at INFO to stderr; SIGTERM stops it gracefully.

Usage: python ingest_worker.py PORT DATA_DIR SPOOL_DIR REPLICA REPLICAS
"""

from __future__ import annotations

import signal
import sys

import trio

from flow import Graph, Placement, Runner
from flow._log import configure
from nodes.dimse import DicomListener, ListenConfig
from nodes.store import Store, StoreConfig


def main(port: str, data_dir: str, spool_dir: str, replica: str, replicas: str) -> None:
    configure("INFO")
    listener = DicomListener(ListenConfig(port=int(port), ae_title="DICOMFLOW",
                                          calling_ae_titles=["MODALITY"], spool_dir=spool_dir,
                                          workers=int(replicas)))
    graph = Graph(listener >> Store(data_dir, StoreConfig(min_free_disk_mb=0)), name="ingest")
    runner = Runner(graph, placement=Placement(
        process=f"ingest-{replica}", lanes=frozenset({graph.lane_of[id(listener)]}),
        replica=int(replica), replicas=int(replicas)))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_sigterm, runner)
            await runner.run()
            nursery.cancel_scope.cancel()

    trio.run(run)


async def stop_on_sigterm(runner: Runner) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            runner.stop()
            return


if __name__ == "__main__":
    main(*sys.argv[1:6])
