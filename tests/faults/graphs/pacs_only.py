"""The flagship graph cut to its pacs lane (listener → Store → CStoreSender), for fault tests
that need only the PACS as a peer. Reads the same site file as graphs/radiology.py."""

import runpy
from pathlib import Path

from flow import Graph
from nodes.dimse import CStoreSender, DicomListener
from nodes.store import Store

Site = runpy.run_path(str(Path(__file__).resolve().parents[3] / "graphs" / "radiology.py"),
                      run_name="__flow_graph__")["Site"]

site = Graph.config(Site)
store = Store(site.data_dir, site.store)
graph = Graph(DicomListener(site.listen) >> store >> {"pacs": CStoreSender(site.pacs)},
              name="radiology-pacs-only", state_dir=site.data_dir)
