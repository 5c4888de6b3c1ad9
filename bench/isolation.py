"""Lane isolation: does a slow PACS slow ingest or the archive lane? Same run, two sites.

    .venv/bin/python bench/isolation.py [--objects 20]

Both runs send the same study with ``storescu`` into ``flow graphs/radiology.py``; in the
second, the PACS (``storescp --sleep-during 1``) takes over a second per C-STORE. Figures:
ingest time (until storescu has every Success) and archive-lane completion time (until
Orthanc holds every object), fast vs slow; a ratio of 1.0 means the slow lane costs the
others nothing (target ≥ 0.9). Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]
os.environ["TCP_NODELAY"] = "1"

from route import make_files  # noqa: E402
from support.site import RadiologySite  # noqa: E402


def run(work: Path, files: list[Path], delay: int) -> dict[str, float]:
    with RadiologySite(work, pacs_delay_s=delay) as site:
        started = time.perf_counter()
        site.send(files)
        ingest = time.perf_counter() - started
        while len(site.orthanc.instance_ids()) < len(files):
            time.sleep(0.02)
        archive = time.perf_counter() - started
        pacs_done = len(list(site.pacs_dir.iterdir()))
    return {"ingest_s": ingest, "archive_s": archive, "pacs_done_when_archive_done": pacs_done}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        work = Path(tmp)
        files = make_files(work / "study", args.objects)
        fast = run(work / "fast", files, 0)
        slow = run(work / "slow", files, 1)
    print(json.dumps({
        "bench": "isolation", "objects": args.objects, "slow_pacs_delay_s": 1,
        "fast": {k: round(v, 3) for k, v in fast.items()},
        "slow": {k: round(v, 3) for k, v in slow.items()},
        "ratio_ingest": round(fast["ingest_s"] / slow["ingest_s"], 3),
        "ratio_archive": round(fast["archive_s"] / slow["archive_s"], 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
