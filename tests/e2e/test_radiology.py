"""The flagship graph end to end (issue 8): ``flow graphs/radiology.py`` as a child process,
real peers on 127.0.0.1 (DCMTK storescu as the modality, storescp as the PACS, Orthanc +
DICOMweb as the archive, an MLLP listener as the RIS), each started and stopped by its pid.
"""

from __future__ import annotations

import io
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import dcmread

from support.flowproc import run_flow
from support.site import RadiologySite
from support.studies import (assert_no_phi, assert_no_plaintext_phi, malformed_report,
                             mixed_study, sent)

pytestmark = [pytest.mark.peer("dcmtk"), pytest.mark.peer("orthanc")]

HERE = Path(__file__).resolve().parent


def test_mixed_study_reaches_pacs_archive_and_ris(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study")
    expected = sent(files)
    with RadiologySite(tmp_path / "site") as site:
        assert site.send(files).acknowledged == len(files)
        assert site.wait_pacs(len(files)) == expected
        assert site.wait_archive(len(files)) == expected
        messages = site.ris.wait_for(2)
        site.wait_lanes_idle()
        status = site.status()
    assert len(messages) == 2, "one ORU^R01 per SR, none for the CT images"
    for message in messages:
        parsed = parse_message(message.decode("utf-8"), find_groups=True,
                               validation_level=VALIDATION_LEVEL.STRICT)
        assert parsed.validate() is True
        assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert status["running"] is True
    lanes = status["lanes"]
    assert lanes["pacs"]["delivered"] == len(files)
    assert lanes["archive"]["delivered"] == len(files)
    assert lanes["ris"]["delivered"] == 2
    assert lanes["ris"]["dead_lettered"] == 0
    assert_no_phi(site.logs(), "the flow log")


def test_pacs_down_queues_on_disk_survives_sigkill_and_delivers_after_restart(
        tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=5, reports=1)
    expected = sent(files)
    site = RadiologySite(tmp_path / "site", start_pacs=False)
    with site:
        # Every object is acknowledged although the PACS is down: it is committed on disk.
        assert site.send(files).acknowledged == len(files)
        site.wait_archive(len(files))
        status = site.status()
        pacs = status["lanes"]["pacs"]
        assert pacs["queued"] + pacs.get("retrying", 0) + pacs.get("in_flight", 0) \
            == len(files), pacs
        site.kill_flow()  # SIGKILL: no graceful anything
        assert site.flow is not None and site.flow.popen.returncode == -signal.SIGKILL
        site.start_pacs()
        site.start_flow()
        assert site.wait_pacs(len(files)) == expected
        status = site.wait_lanes_idle()
        assert status["lanes"]["pacs"]["delivered"] == len(files)
        commands = (["status", *site.graph_args], ["deadletters", *site.graph_args, "list"],
                    ["trace", *site.graph_args, next(iter(expected))])
        with ThreadPoolExecutor(len(commands)) as pool:  # side by side: each starts Python
            outputs = list(pool.map(run_flow, commands))
        for command, out in zip(commands, outputs):
            assert out.returncode == 0, out.stderr
            assert_no_phi(out.stdout + out.stderr, f"flow {command[0]}")
    assert_no_phi(site.logs(), "the flow logs")
    assert_no_plaintext_phi(site.data_dir)


def test_slow_pacs_grows_only_its_own_queue(tmp_path: Path) -> None:
    """The PACS answers nothing (storescp paused) while a study arrives: ingest and the
    archive lane finish while the pacs lane holds every object; once the PACS answers again,
    the pacs lane delivers them all. (The timing ratios with a PACS that sleeps in each
    C-STORE are measured in bench/isolation.py.)"""
    files = mixed_study(tmp_path / "study", images=3, reports=0)
    with RadiologySite(tmp_path / "site") as site:
        site.pause_pacs()
        assert site.send(files).acknowledged == len(files)
        site.wait_archive(len(files))
        lanes = site.status()["lanes"]
        pacs = lanes["pacs"]
        assert pacs["delivered"] == 0, "the PACS took nothing yet"
        assert pacs["queued"] + pacs["in_flight"] + pacs["retrying"] == len(files), pacs
        assert lanes["archive"]["delivered"] == len(files)
        site.resume_pacs()
        assert len(site.wait_pacs(len(files), timeout=60)) == len(files)


def test_malformed_report_is_dead_lettered_on_ris_only(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=1, reports=1)
    bad = malformed_report(tmp_path / "study")
    bad_uid = str(dcmread(bad).SOPInstanceUID)
    expected = sent([*files, bad])
    with RadiologySite(tmp_path / "site") as site:
        site.send([*files, bad])
        assert site.wait_pacs(3) == expected
        assert site.wait_archive(3) == expected
        status = site.wait_lanes_idle()
        assert status["lanes"]["ris"]["dead_lettered"] == 1
        assert status["lanes"]["ris"]["delivered"] == 1
        listed = run_flow(["deadletters", *site.graph_args, "list"])
        assert listed.returncode == 0 and bad_uid in listed.stdout
        assert "ris" in listed.stdout
        assert_no_phi(listed.stdout, "flow deadletters list")
    assert len(site.ris.messages) == 1


def test_crash_loop_in_one_lane_never_cancels_another(tmp_path: Path) -> None:
    """The ris lane's mapper crashes on every object until its lane is marked failed; the
    listener, the pacs lane and the archive lane go on, and the failed lane's objects stay
    queued on disk."""
    files = mixed_study(tmp_path / "study", images=2, reports=2)
    expected = sent(files)
    restart = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_failures": 3}
    with RadiologySite(tmp_path / "site", graph=HERE / "graphs" / "crashing_ris.py",
                       sections={"runtime.restart": restart}) as site:
        site.send(files)
        assert site.wait_pacs(len(files)) == expected
        assert site.wait_archive(len(files)) == expected
        site.wait_lanes_idle(lanes=("pacs", "archive"))
        # The ris mapper fails on redeliveries too (each after the Store's retry delay), so
        # its lane reaches "failed" on its own clock, not the other lanes'.
        status = site.wait_status(lambda s: s["lanes"]["ris"]["state"] == "failed",
                                  "ris lane failed")
        assert site.flow is not None and site.flow.alive()
        assert status["lanes"]["pacs"]["state"] == "running"
        assert status["lanes"]["ris"]["delivered"] == 0
        assert site.ris.messages == []
        logs = site.flow.output()
    assert "lane.stopped" in logs and "lane=ris" in logs
    assert_no_phi(logs, "the flow log")


def test_coercion_on_the_archive_lane_only_and_pixels_untouched(tmp_path: Path) -> None:
    files = mixed_study(tmp_path / "study", images=2, reports=0)
    expected = sent(files)
    sections = {"archive_coercion": {"station_name_prefix": "ARC-",
                                     "institution_name": "Synthetic Site"}}
    with RadiologySite(tmp_path / "site", sections=sections) as site:
        site.send(files)
        assert site.wait_pacs(len(files)) == expected  # the PACS gets them as received
        site.wait_archive(len(files))
        archived = site.orthanc.stored_files_by_uid()
        site.wait_lanes_idle()
        uid = next(iter(expected))
        trace = run_flow(["trace", *site.graph_args, uid])
    originals = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in files}
    for uid, data in archived.items():
        ds = dcmread(io.BytesIO(data))
        assert ds.InstitutionName == "Synthetic Site"
        assert str(ds.StationName).startswith("ARC-")
        assert ds.PixelData == originals[uid].PixelData
    assert trace.returncode == 0
    assert "archive_coercion" in trace.stdout or "set-elements 1" in trace.stdout
    assert_no_phi(trace.stdout, "flow trace")
