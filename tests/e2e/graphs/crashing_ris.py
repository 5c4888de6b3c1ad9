"""The flagship graph with a ris lane whose mapper node crashes on every report (fault
injection for tests/e2e): the supervisor restarts it, then marks it failed and stops the ris
lane only. Reads the same site file as graphs/radiology.py."""

import runpy
from pathlib import Path

from flow import Graph, Node
from nodes.dimse import CStoreSender, DicomListener
from nodes.hl7 import MllpSender
from nodes.route import Filter, is_structured_report
from nodes.store import Store
from nodes.stow import StowSender

Site = runpy.run_path(str(Path(__file__).resolve().parents[3] / "graphs" / "radiology.py"),
                      run_name="__flow_graph__")["Site"]


class CrashingMapper(Node):
    """Raises on every delivery it takes: a bug in a mapper, not a bad object."""

    async def run(self, ctx) -> None:
        async for _delivery in ctx.receive():
            raise RuntimeError("injected mapper crash")


site = Graph.config(Site)
store = Store(site.data_dir, site.store)
graph = Graph(DicomListener(site.listen) >> store >> {
    "pacs": CStoreSender(site.pacs),
    "archive": StowSender(site.archive),
    "ris": Filter(is_structured_report, name="only_reports") >> CrashingMapper()
    >> MllpSender(site.ris),
}, name="radiology-crashing-ris", state_dir=site.data_dir)
