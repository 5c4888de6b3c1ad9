"""The golden SR objects are real SR documents: DCMTK's dsrdump reads each one, and the
content tree it prints is the one our walker turned into OBX segments (same items, same
order, same nesting, same concept codes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from nodes.hl7 import SRReportHandler
from support.peers import need
from support.synth import write

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402

# "  <contains NUM:(410668003,SCT,"Length")=..." → indent, value type, code, scheme
ITEM = re.compile(r'^( *)<(?:[a-z ]+ )?([A-Z0-9]+):\(([^,]*),([^,]*),')
HL7_TYPES = {"CONTAINER": "", "TEXT": "TX", "CODE": "CE", "NUM": "NM", "DATE": "DT",
             "TIME": "TM", "DATETIME": "DTM", "PNAME": "XPN", "UIDREF": "ST"}

SAMPLES = samples.REPORTS


def dsrdump_items(path) -> list[tuple[int, str, str, str]]:
    """(depth, value type, code, scheme) of every content item below the root."""
    binary = need("dsrdump")["dsrdump"]
    done = subprocess.run([binary, "+Pc", str(path)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]
    errors = [line for line in done.stderr.decode(errors="replace").splitlines()
              if line.startswith(("E:", "F:"))]
    assert errors == []
    items = []
    for line in done.stdout.decode("utf-8", errors="replace").splitlines():
        match = ITEM.match(line)
        if match:
            indent, value_type, code, scheme = match.groups()
            items.append((len(indent) // 2, value_type, code, scheme))
    assert items and items[0][0] == 0 and items[0][1] == "CONTAINER"  # the document root
    return items[1:]


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_dsrdump_reads_the_sr_and_its_tree_is_the_oru_content(kind, tmp_path):
    ds = SAMPLES[kind]()
    path = write(ds, tmp_path / f"{kind}.dcm")
    tree = dsrdump_items(path)
    message = SRReportHandler(samples.RIS).handle(ds)
    content = [o for o in message.all("OBX") if o.get(4)]  # the UID OBXs have no sub-ID
    assert [(o.get(4).count("."), o.get(2), o.get(3), o.get(3, 3)) for o in content] == \
        [(depth - 1, HL7_TYPES[value_type], code, scheme)
         for depth, value_type, code, scheme in tree]
