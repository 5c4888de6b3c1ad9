"""Instructions per call of the DICOM byte layer's hot paths, for ``valgrind --tool=callgrind``
(a driver for callgrind, not a rate bench: ``run_all.py`` skips it, as every ``_`` script).

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.WHAT.N \\
        .venv/bin/python bench/_bytes_cost.py WHAT N

Runs the setup (imports, sample objects, 20 warm-up calls of each), then ``N`` calls of
``WHAT``:
the instructions of one call are (total for N − total for 0) / N, a figure that does not
depend on the neighbours of a shared machine (run with ``PYTHONHASHSEED=0``; figures in
docs/decisions.md, "issue 15"). ``WHAT``:

- ``sr``: the HL7 lane's mapping of a 50-item SR in memory (``handle(ds).encode()``);
- ``part10``: the lane's whole per-delivery work from that SR's Part 10 bytes
  (``nodes.hl7.node.map_delivery``: the header read with ``nodes.dicom.read_header``);
- ``check``: ``check_complete`` of a 64×64 CT data set as the listener receives it;
- ``scan``: ``scan_envelope`` of that data set;
- ``meta``: ``parse_file_meta`` of that object's Part 10 bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "tests" / "nodes" / "hl7")]

from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

import hl7_samples as samples  # noqa: E402
from nodes.arrival import Envelope  # noqa: E402
from nodes.delivery import Recorder  # noqa: E402
from nodes.dicom import check_complete, parse_file_meta, scan_envelope  # noqa: E402
from nodes.hl7 import SRReportHandler  # noqa: E402
from nodes.hl7.node import map_delivery  # noqa: E402
from nodes.payload import BytesPayload  # noqa: E402
from support.synth import ct, dataset_bytes_after_meta, to_part10  # noqa: E402


def calls() -> dict:
    handler = SRReportHandler(samples.RIS)
    sr = samples.fifty_items()
    envelope = Envelope(sr.SOPInstanceUID, sr.SOPClassUID, ExplicitVRLittleEndian)
    delivery = Recorder().delivery(envelope, BytesPayload(to_part10(sr)), "ris")
    image = to_part10(ct())
    data = dataset_bytes_after_meta(image)
    return {
        "sr": lambda: handler.handle(sr).encode(),
        "part10": lambda: map_delivery(handler, delivery),
        "check": lambda: check_complete(data, False),
        "scan": lambda: scan_envelope(data, False),
        "meta": lambda: parse_file_meta(image),
    }


def main() -> None:
    what, n = sys.argv[1], int(sys.argv[2])
    table = calls()
    for warm in table.values():  # every run does the same setup: one N=0 run serves all
        for _ in range(20):
            warm()
    fn = table[what]
    for _ in range(n):
        fn()


if __name__ == "__main__":
    main()
