"""A full disk, end to end: the data dir on a small tmpfs that really fills up.

A real ``flow`` process (listener → Store → pacs lane) has its data dir, and the listener's
spool for objects over 2 MiB, on an 8 MiB tmpfs mounted by the test; a real ``storescu``
sends a study of large (spooled) and small (sealed in LMDB) objects that cannot all fit, to
a real ``storescp`` PACS. What cannot be committed is refused with 0xA7xx (the modality
retries), Success only for what was committed; every acknowledged object reaches the PACS
byte-identical; no partial file is left; once the tmpfs is made larger (space returns) the
same process takes the refused objects on a re-send, and they are delivered too.

Mounting needs root (CI runs the suite as root): without it the test skips, or fails under
``DICOMFLOW_REQUIRE_PEERS=1`` like a missing peer.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support.peers import REQUIRE_PEERS, need
from support.site import RadiologySite
from support.synth import CANARY_PARTS, ct, dataset_bytes_after_meta, large_ct, write

ROOT = Path(__file__).resolve().parents[2]
PACS_ONLY = ROOT / "tests" / "faults" / "graphs" / "pacs_only.py"
LARGE, SMALL = 6, 20  # 6 × 3 MB + 20 × 9 KB: more than an 8 MiB file system holds


def _unavailable(why: str) -> None:
    if REQUIRE_PEERS:
        pytest.fail(why + " (DICOMFLOW_REQUIRE_PEERS=1)")
    pytest.skip(why)


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        _unavailable("mounting a size-limited tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                             str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        _unavailable(f"cannot mount a tmpfs: {result.stderr.strip()}")


def store_statuses(output: str) -> dict[str, str]:
    """{file: status text} from ``storescu -v``: each "Sending file" and the Store Response
    that follows it (no response: the association ended first)."""
    statuses: dict[str, str] = {}
    for part in output.split("Sending file: ")[1:]:
        name = part.splitlines()[0].strip()
        found = re.search(r"Received Store Response \(([^)]*)\)", part)
        statuses[name] = found.group(1) if found else "no response"
    return statuses


def send(site: RadiologySite, files: list[Path]) -> dict[str, str]:
    result = subprocess.run(
        [need("storescu")["storescu"], "-v", "--no-halt", "-aet", "MODALITY", "-aec", "DICOMFLOW",
         "127.0.0.1", str(site.listen_port), *map(str, files)],
        capture_output=True, text=True, timeout=120)
    statuses = store_statuses(result.stdout + result.stderr)
    assert set(statuses) == {str(f) for f in files}, result.stdout + result.stderr
    return statuses


def study(directory: Path) -> tuple[list[Path], list[Path]]:
    """Large and small objects of one study, interleaved as a modality would send them."""
    directory.mkdir()
    large = [large_ct(directory / f"large{i}.dcm", megabytes=3) for i in range(LARGE)]
    small = [write(ct(instance_number=i), directory / f"small{i}.dcm") for i in range(SMALL)]
    return large, small


def uid_and_bytes(path: Path) -> tuple[str, bytes]:
    from pydicom import dcmread

    return (str(dcmread(path, stop_before_pixels=True).SOPInstanceUID),
            dataset_bytes_after_meta(path.read_bytes()))


def leftovers(data_dir: Path) -> list[str]:
    """Partial files: spool temporaries of the Store, spill files of the listener."""
    temps = [p.name for p in (data_dir / "spool").iterdir() if p.name.endswith(".spool-tmp")]
    spills = [p.name for p in (data_dir / "incoming").iterdir()]
    return temps + spills


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no room left (ENOSPC)."""
    block = os.urandom(64 << 10)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    assert shutil.disk_usage(path.parent).free < len(block)


def answered(logs: str) -> dict[str, str]:
    """{SOPInstanceUID: status the listener answered} from the flow log (the last one)."""
    return dict(re.findall(r"dimse\.(?:not_)?stored .*?sop_instance_uid=(\S+) status=(\S+)",
                           logs))


def test_full_disk_refuses_what_it_cannot_commit_loses_nothing_and_resumes(tmp_path):
    large, small = study(tmp_path / "study")
    files = [f for pair in zip(large, small) for f in pair] + small[LARGE:-8]
    later = small[-8:]  # sent once the disk is completely full
    site = RadiologySite(tmp_path / "site", graph=PACS_ONLY, start_pacs=False, sections={
        "listen": {"spool_dir": str(tmp_path / "site" / "data" / "incoming")},
        # The real file system, not the early refusal, must be what fills up here.
        "store": {"min_free_disk_mb": 0, "retention_s": 3600},
    })
    mount_tmpfs(site.data_dir, "8m")
    try:
        flow = site.start_flow()
        # 1. Room for some: the spool writes of large objects run out of space first.
        first = send(site, files)
        acked = [Path(f) for f, status in first.items() if status == "Success"]
        assert any(f in acked for f in large) and any(f in acked for f in small), first
        assert any(f not in acked for f in large), first
        assert leftovers(site.data_dir) == []
        # 2. No room at all: LMDB's own writes fail (ENOSPC), and the listener's spill file.
        fill(site.data_dir / "filler")
        second = send(site, [*later, large[-1]])
        acked += [Path(f) for f, status in second.items() if status == "Success"]
        refused = [f for f in [*files, *later] if f not in acked]
        assert any(f in refused for f in later), second
        assert leftovers(site.data_dir) == []
        # What the modality sees: Success or out of resources (0xA700: it retries), never a
        # failure that tells it to give up, and never an unanswered C-STORE.
        assert set(first.values()) | set(second.values()) <= {
            "Success", "Refused: OutOfResources"}, (first, second)
        uids = dict(uid_and_bytes(f) for f in [*files, *later])
        statuses = answered(site.logs())
        assert {statuses[uid_and_bytes(f)[0]] for f in refused} == {"0xA700"}

        # 3. The PACS comes up while the disk is still full: the lane delivers, its outcomes
        # wait for room; then space returns (the filler goes) and everything settles.
        site.start_pacs()
        (site.data_dir / "filler").unlink()
        expected = dict(map(uid_and_bytes, acked))
        assert site.wait_pacs(len(expected)) == expected  # every acknowledged one, exactly
        spooled = [p for p in (site.data_dir / "spool").iterdir() if p.suffix == ".spool"]
        assert len(spooled) == len([f for f in acked if f in large])

        # 4. Ingest resumed in the same process: a re-send of the refused ones succeeds.
        subprocess.run(["mount", "-o", "remount,size=64m", str(site.data_dir)], check=True)
        again = send(site, refused)
        assert set(again.values()) == {"Success"}, again
        assert flow.alive()
        expected.update(map(uid_and_bytes, refused))
        assert site.wait_pacs(len(uids)) == expected
        assert leftovers(site.data_dir) == []
        logs = site.logs()
        assert "store.full" in logs and "store.space_returned" in logs
        assert "node.crashed" not in logs and "lane.stopped" not in logs
        assert not any(part in logs for part in CANARY_PARTS)
        assert site.stop_flow() == 0
    finally:
        site.close()
        subprocess.run(["umount", str(site.data_dir)], check=False)
