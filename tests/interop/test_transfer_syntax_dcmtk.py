"""Transfer syntaxes kept end to end (issue 17), against DCMTK, through ``flow run``:

    dcmsend / storescu ──▶ listener ──▶ Store ──▶ pacs: CStoreSender ──▶ storescp

The modality proposes each compressed syntax with the uncompressed ones as fall-backs in the
same presentation context (dcmsend's default; storescu ``+C``). The listener accepts the
syntax the modality put first, so the PACS gets every object byte-identical in the syntax it
was sent in. A PACS that refuses a syntax gets nothing converted: that object is
dead-lettered with the syntax named, and ``flow check --probe`` warns of it beforehand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless,
                         JPEGLosslessSV1, JPEGLSLossless, RLELossless)

from nodes.dimse.contexts import uid_name
from support.flowproc import FlowProcess, run_flow
from support.peers import need
from support.synth import CANARY_ID, CANARY_PARTS, ct, write

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "nodes", "dimse"))
from dimse_support import Storescp, after_meta, encapsulated, write_site  # noqa: E402

pytestmark = pytest.mark.peer("dcmtk")

COMPRESSED = (JPEGLosslessSV1, JPEGLSLossless, RLELossless, JPEG2000Lossless)
# DCMTK's names for them in its association dumps, and storescu's option proposing each.
DCMTK_NAME = {JPEGLosslessSV1: "JPEGLossless:Non-hierarchical-1stOrderPrediction",
              JPEGLSLossless: "JPEGLSLossless", RLELossless: "RLELossless",
              JPEG2000Lossless: "JPEG2000LosslessOnly"}
STORESCU_PROPOSE = {JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", RLELossless: "-xr",
                    JPEG2000Lossless: "-xv"}


def _run(tool: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need(tool)[tool], *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def compressed_objects(directory: Path) -> dict[str, Path]:
    """{transfer syntax UID: file}, one CT image (its own SOP instance) per compressed syntax,
    plus one in Explicit VR Little Endian. JPEG lossless, JPEG-LS and RLE come from DCMTK's
    encoders; the JPEG 2000 codestream from OpenJPEG's ``opj_compress``, encapsulated with
    pydicom (DCMTK has no JPEG 2000 codec, so it forwards that one as it is)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {ExplicitVRLittleEndian: write(ct(), directory / "ele.dcm")}
    for ts, tool in ((JPEGLosslessSV1, "dcmcjpeg"), (JPEGLSLossless, "dcmcjpls"),
                     (RLELossless, "dcmcrle")):
        source = write(ct(), directory / f"{tool}-in.dcm")
        out = directory / f"{tool}.dcm"
        assert _run(tool, source, out).returncode == 0
        source.unlink()
        files[ts] = out
    pgm = directory / "image.pgm"
    pgm.write_bytes(b"P5\n32 32\n255\n" + bytes((i * 7) & 0xFF for i in range(32 * 32)))
    result = _run("opj_compress", "-i", pgm, "-o", directory / "image.j2k")  # lossless 5/3
    assert result.returncode == 0, result.stdout + result.stderr
    image = encapsulated(ct(rows=32, cols=32), JPEG2000Lossless,
                         [(directory / "image.j2k").read_bytes()])
    files[JPEG2000Lossless] = write(image, directory / "j2k.dcm", JPEG2000Lossless)
    for ts, path in files.items():
        assert _syntax(path) == ts
    return files


def _syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def pacs_holds(scp: Storescp, count: int) -> dict[str, tuple[str, bytes]]:
    """{SOPInstanceUID: (transfer syntax, data set bytes)} of what storescp stored."""
    scp.wait_files(count)
    return {_uid(p): (_syntax(p), after_meta(p))
            for p in scp.directory.iterdir() if p.is_file() and not p.name.startswith(".")}


def proposed_contexts(dcmtk_debug: str) -> list[list[str]]:
    """The transfer syntaxes of every presentation context a DCMTK tool proposed, from its
    ``-d`` association dump, in its own names."""
    contexts: list[list[str]] = []
    for block in re.split(r"Context ID:\s+\d+ \(Proposed\)", dcmtk_debug)[1:]:
        listed = block.split("Proposed Transfer Syntax(es):", 1)[1]
        contexts.append(re.findall(r"^D:\s+=(\S+)", listed.split("Context ID:")[0], re.M))
    return contexts


def assert_fallbacks_proposed(debug: str, syntaxes: Sequence[str]) -> None:
    """Each syntax was proposed first in a context that also offered Explicit VR LE."""
    contexts = proposed_contexts(debug)
    for ts in syntaxes:
        assert any(c[0] == DCMTK_NAME[ts] and "LittleEndianExplicit" in c[1:]
                   for c in contexts), (ts, contexts[:4])


@contextmanager
def flow_site(tmp_path: Path, pacs_port: int, listen: str = "") -> Iterator[
        tuple[FlowProcess, int, list[str]]]:
    """``flow run`` of :func:`~dimse_support.write_site`'s site: (process, listen port,
    graph args), stopped by its pid afterwards."""
    listen_port, graph = write_site(tmp_path, pacs_port, listen)
    flow = FlowProcess(["run", *graph], tmp_path / "flow.log")
    try:
        flow.wait_for_log(r"dimse\.listening")
        yield flow, listen_port, graph
    finally:
        flow.stop()


def dcmsend(port: int, files: Sequence[Path]) -> subprocess.CompletedProcess[str]:
    """dcmsend with its defaults: each file's own syntax proposed first, with the
    uncompressed fall-backs (``--decompress-lossless``) in the same context."""
    return _run("dcmsend", "-d", "-aet", "MODALITY", "-aec", "DICOMFLOW", "127.0.0.1", port,
                *files)


def assert_no_phi(text: str) -> None:
    for part in (*CANARY_PARTS, CANARY_ID):
        assert part not in text


def test_dcmsend_compressed_objects_reach_the_pacs_byte_identical_in_their_syntax(tmp_path):
    files = compressed_objects(tmp_path / "objects")
    with Storescp(tmp_path / "pacs") as scp, flow_site(tmp_path, scp.port) as (flow, port, _):
        sent = dcmsend(port, list(files.values()))
        assert sent.returncode == 0, sent.stderr[-2000:]
        flow.wait_for_log(r"dimse\.sent", count=len(files))
        got = pacs_holds(scp, len(files))
    # DCMTK cannot decode JPEG 2000, so it offers no fall-back for that one.
    assert_fallbacks_proposed(sent.stdout + sent.stderr, COMPRESSED[:3])
    assert {ts: got[_uid(path)] for ts, path in files.items()} == {
        ts: (ts, after_meta(path)) for ts, path in files.items()}
    assert_no_phi(flow.output())


def test_storescu_with_combined_fallbacks_keeps_each_syntax(tmp_path):
    files = compressed_objects(tmp_path / "objects")
    with Storescp(tmp_path / "pacs") as scp, flow_site(tmp_path, scp.port) as (flow, port, _):
        for ts in COMPRESSED:
            # +C: the compressed syntax and the uncompressed fall-backs in one context.
            sent = _run("storescu", "-d", "+C", STORESCU_PROPOSE[ts], "-aet", "MODALITY",
                        "-aec", "DICOMFLOW", "127.0.0.1", port, files[ts])
            assert sent.returncode == 0, sent.stderr[-2000:]
            assert_fallbacks_proposed(sent.stdout + sent.stderr, [ts])
        flow.wait_for_log(r"dimse\.sent", count=len(COMPRESSED))
        got = pacs_holds(scp, len(COMPRESSED))
    for ts in COMPRESSED:
        assert got[_uid(files[ts])] == (ts, after_meta(files[ts])), ts


def test_site_preferring_explicit_little_endian_has_the_modality_decompress(tmp_path):
    files = compressed_objects(tmp_path / "objects")
    with Storescp(tmp_path / "pacs") as scp, flow_site(
            tmp_path, scp.port,
            'transfer_syntax_preference = "explicit-little-endian-first"') as (flow, port, _):
        sent = dcmsend(port, [files[ts] for ts in COMPRESSED])
        assert sent.returncode == 0, sent.stderr[-2000:]
        flow.wait_for_log(r"dimse\.sent", count=len(COMPRESSED))
        got = pacs_holds(scp, len(COMPRESSED))
    syntaxes = {ts: got[_uid(files[ts])][0] for ts in COMPRESSED}
    # dcmsend decompresses what it can; JPEG 2000 came without a fall-back: kept.
    assert syntaxes == {JPEGLosslessSV1: ExplicitVRLittleEndian,
                        JPEGLSLossless: ExplicitVRLittleEndian,
                        RLELossless: ExplicitVRLittleEndian,
                        JPEG2000Lossless: JPEG2000Lossless}


def test_pacs_refusing_a_syntax_dead_letters_that_object_naming_the_syntax(tmp_path):
    files = compressed_objects(tmp_path / "objects")
    jls, plain = files[JPEGLSLossless], files[ExplicitVRLittleEndian]
    # storescp without +xa accepts the uncompressed syntaxes only.
    with Storescp(tmp_path / "pacs", accept_all=False) as scp, \
            flow_site(tmp_path, scp.port) as (flow, port, graph):
        sent = dcmsend(port, [jls, plain])
        assert sent.returncode == 0, sent.stderr[-2000:]  # the listener took JPEG-LS as is
        flow.wait_for_log(r"dimse\.not_sent")
        flow.wait_for_log(r"dimse\.sent")
        got = pacs_holds(scp, 1)
        listed = run_flow(["deadletters", *graph, "--json", "list"])
    assert listed.returncode == 0, listed.stderr
    dead = json.loads(listed.stdout)
    assert [row["uid"] for row in dead] == [_uid(jls)]
    assert dead[0]["reason"] == (
        "transfer syntax not accepted by the peer: JPEG-LS Lossless Image Compression "
        f"({JPEGLSLossless}) for CT Image Storage ({CTImageStorage}); it accepts that SOP "
        "class only in Implicit VR Little Endian, Explicit VR Little Endian (objects are "
        "forwarded as received, never converted)")
    assert got == {_uid(plain): (ExplicitVRLittleEndian, after_meta(plain))}
    assert_no_phi(flow.output() + listed.stdout)


def test_probe_warns_of_compressed_syntaxes_the_pacs_refuses(tmp_path):
    with Storescp(tmp_path / "pacs", accept_all=False) as scp:
        _port, graph = write_site(tmp_path, scp.port)
        probe = run_flow(["check", *graph, "--probe"])
    assert probe.returncode == 0, probe.stderr  # the PACS works: warnings, not a failure
    warnings = [line for line in probe.stdout.splitlines()
                if line.startswith("probe pacs_sender: warning: ")]
    for ts in COMPRESSED:
        assert f"probe pacs_sender: warning: transfer syntax {uid_name(ts)} ({ts}) not " \
               "accepted for any SOP class it accepts: objects received in it will be " \
               "dead-lettered, never converted" in warnings, (ts, warnings)
    assert not any(ExplicitVRLittleEndian + ")" in line for line in warnings)

